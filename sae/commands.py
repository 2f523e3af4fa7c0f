"""CLI commands `train`, `eval` and `features` (registered in workbench/cli.py's COMMANDS).

    python -m workbench train --site blocks.1.hook_resid_post --arch topk --d-sae 2048 --k 32 --tokens 2000000
    python -m workbench train --site blocks.1.ln2.hook_normalized --target blocks.1.hook_mlp_out --arch topk --skip ...
    python -m workbench train --site blocks.1.hook_resid_post --arch topk,batchtopk,jumprelu ...   # one pass, several
    python -m workbench train --site blocks.0.attn.hook_z --arch codebook --heads all ...         # one codebook per head
    torchrun --nproc_per_node 2 -m workbench train ...                                           # DDP
    python -m workbench eval --dictionary NAME            # L0, FVU, CE recovered, KL, density
    python -m workbench eval --toy                        # superposition recovery per variant
    python -m workbench eval --mlp-sparsity --model M     # the model's own MLP activation sparsity
    python -m workbench features --dictionary NAME        # per-feature tables into DuckDB
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from workbench.errors import WorkbenchError


def _count(text: str) -> int:
    """'100000', '100k', '2M' -> an integer (argparse type; the same spelling `cache --tokens` takes)."""
    from workbench.caching import token_count

    return token_count(text)


# ====================================================================== train
def configure_train(parser: argparse.ArgumentParser) -> None:
    from sae.dictionary import ARCHS

    g = parser.add_argument_group("what to train")
    g.add_argument("--model", default=None, help="model whose cached activations to use (default: ref-gpt2)")
    g.add_argument("--site", help="input site (hook name), e.g. blocks.1.hook_resid_post")
    g.add_argument("--target", default=None, help="output site for a transcoder (e.g. blocks.1.hook_mlp_out); default: an SAE")
    g.add_argument("--arch", default="topk", help=f"variant(s), comma-separated for one pass: {', '.join(ARCHS)}")
    g.add_argument("--d-sae", default="", help="features per dictionary (comma-separated to match --arch); default 8 x input width")
    g.add_argument("--k", default="", help="active features per token (jumprelu: the starting L0; default 32, codebooks 8); comma-separated to match --arch")
    g.add_argument("--heads", default=None, help="per-head dictionaries on attn.hook_z: 'all' or a list like 0,3")
    g.add_argument("--skip", action="store_true", help="transcoders: add a linear skip connection")
    g.add_argument("--prefixes", default=None, help="matryoshka nested sizes, comma-separated, ending at d_sae")
    g.add_argument("--name", default=None, help="dictionary name (suffixed per variant when training several)")
    g.add_argument("--run", default=None, help="cached run to read when the model has several")
    g.add_argument("--toy", action="store_true", help="train on the superposition toy instead of cached activations")
    t = parser.add_argument_group("how to train")
    t.add_argument("--tokens", type=_count, default=2_000_000, help="activations to train on, e.g. 500k, 2M (default 2M)")
    t.add_argument("--batch-size", type=int, default=4096, help="activations per step and process")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 2e-4 / sqrt(d_sae / 16384))")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--l1-coef", type=float, default=None, help="relu: L1 coefficient")
    t.add_argument("--l0-coef", type=float, default=None, help="jumprelu: L0 coefficient")
    t.add_argument("--auxk-coef", type=float, default=None, help="aux-k loss weight")
    t.add_argument("--aux-zipf-coef", type=float, default=None, help="aux_zipf loss weight (mutual/feature choice)")
    t.add_argument("--dead-tokens", type=int, default=None, help="tokens without firing before a feature counts as dead")
    t.add_argument("--resample-every", type=int, default=None, help="resample dead features every N steps (0 = never)")
    t.add_argument("--no-normalize", action="store_true", help="do not scale inputs to a fixed norm during training")
    t.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    t.add_argument("--log-every", type=int, default=20, help="steps between metric rows")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing dictionary of the same name")


def run_train(args: argparse.Namespace) -> dict:
    from sae.train import World, train_dictionaries
    from workbench.workspace import Workspace

    workspace = Workspace(args.workspace)
    world = World.from_env(args.device)
    cfg = _train_config(args)
    if args.toy:
        configs, source = _toy_plan(args)
    else:
        configs, source = _store_plan(args, workspace, cfg)
    try:
        result = train_dictionaries(configs, source, cfg, workspace, overwrite=args.overwrite, world=world)
    finally:
        _leave_process_group(world)
    if not world.is_main:
        sys.stdout = open(os.devnull, "w")  # one summary per job: rank 0's
        return {}
    return {"dictionaries": [_summary(d, workspace) for d in result.dictionaries], "steps": result.steps,
            "tokens": result.tokens, "seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9)), "resumed_from_step": result.resumed_from,
            "processes": world.size, "device": str(world.device)}


def _train_config(args):
    from sae.train import TrainConfig

    overrides = {k: v for k, v in {"l1_coef": args.l1_coef, "l0_coef": args.l0_coef, "auxk_coef": args.auxk_coef,
                                   "aux_zipf_coef": args.aux_zipf_coef}.items() if v is not None}
    for name in ("tokens", "batch_size", "checkpoint_every", "log_every"):
        if getattr(args, name) <= 0:
            raise WorkbenchError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return TrainConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr, seed=args.seed, normalize=not args.no_normalize,
                       dead_tokens=args.dead_tokens, resample_every=args.resample_every, checkpoint_every=args.checkpoint_every,
                       log_every=args.log_every, device=args.device, **overrides)


def _store_plan(args, workspace, cfg):
    from sae.train import iterator_source
    from workbench.model import DEFAULT_MODEL
    from workbench.store import ActivationStore, model_name

    if not args.site:
        raise WorkbenchError("give --site (the hook to read), or --toy for the superposition toy")
    store = ActivationStore(workspace)
    model = model_name(args.model or DEFAULT_MODEL)
    sites = [args.site] + ([args.target] if args.target and args.target != args.site else [])
    run = store.run(model, sites, args.run)
    shape_in = tuple(run.manifest.shapes[args.site])
    d_out = run.manifest.width(args.target) if len(sites) > 1 else None
    provenance = {"corpus": run.manifest.corpus, "split": run.manifest.split, "context": run.manifest.context,
                  "store_run": run.name}
    configs = dictionary_configs(args, model=model, site_shape=shape_in, d_out=d_out, metadata=provenance)
    seed, batch = cfg.seed, cfg.batch_size

    def epochs():
        epoch = 0
        while True:
            if len(sites) > 1:
                yield from store.pairs(model, sites[0], sites[1], batch, seed=seed + epoch, drop_last=True, run=run.name)
            else:
                yield from store.batches(model, args.site, batch, seed=seed + epoch, drop_last=True, run=run.name)
            epoch += 1

    if run.rows < batch:
        raise WorkbenchError(f"run {run.name!r} holds {run.rows} rows, fewer than one batch of {batch}; cache more or lower --batch-size")
    return configs, iterator_source(epochs)


def _toy_plan(args):
    from sae.toy import Toy, ToyConfig
    from sae.train import toy_source

    toy = Toy(ToyConfig(seed=args.seed, d_out=32 if args.target else 0))
    configs = dictionary_configs(args, model="toy", site_shape=(toy.cfg.d_in,), d_out=toy.cfg.d_out or None,
                                 metadata={"corpus": "superposition toy"}, site=args.site or "toy", target=args.target)
    return configs, toy_source(toy, args.batch_size)


def dictionary_configs(args, *, model: str, site_shape: tuple[int, ...], d_out: int | None, metadata: dict,
                       site: str | None = None, target: str | None = None) -> list:
    """One DictionaryConfig per requested (variant, head), checked before any work starts."""
    import math

    from sae.dictionary import K_ARCHS, DictionaryConfig

    site = site or args.site
    target = target if target is not None else args.target
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    d_saes = _per_arch(args.d_sae, archs, "--d-sae")
    ks = _per_arch(args.k, archs, "--k")
    heads = _heads(args.heads, site, site_shape)
    width = math.prod(site_shape) if heads == [None] else site_shape[-1]
    prefixes = tuple(int(p) for p in args.prefixes.split(",")) if args.prefixes else None
    configs = []
    for arch, d_sae, k in zip(archs, d_saes, ks):
        k = (k or _default_k(arch)) if arch in K_ARCHS | {"jumprelu"} else None
        for head in heads:
            name = _name(args.name, site, target, arch, d_sae or 8 * width, k, head, several=len(archs) > 1 or len(heads) > 1)
            configs.append(DictionaryConfig(
                name=name, arch=arch, d_in=width, d_sae=d_sae or 8 * width, d_out=d_out or 0, k=k,
                model=model, site=site, target_site=target if target != site else None,
                site_shape=site_shape if len(site_shape) > 1 else None, head=head, skip=args.skip,
                prefixes=prefixes if arch == "matryoshka" else None, metadata=dict(metadata)))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"two dictionaries of this pass would share a name ({', '.join(names)}); vary --arch/--d-sae/--k")
    return configs


def _per_arch(text: str, archs: list[str], flag: str) -> list[int | None]:
    values = [int(v) for v in str(text).split(",") if v.strip()] if text else []
    if not values:
        return [None] * len(archs)
    if len(values) == 1:
        return values * len(archs)
    if len(values) != len(archs):
        raise WorkbenchError(f"{flag} lists {len(values)} values for {len(archs)} architectures; give one or one per --arch")
    return values


def _heads(text: str | None, site: str, shape: tuple[int, ...]) -> list[int | None]:
    if text is None:
        return [None]
    if len(shape) != 2:
        raise WorkbenchError(f"--heads needs a per-head site such as blocks.0.attn.hook_z; {site} has shape {shape}")
    if text == "all":
        return list(range(shape[0]))
    heads = [int(h) for h in text.split(",")]
    bad = [h for h in heads if not 0 <= h < shape[0]]
    if bad:
        raise WorkbenchError(f"head(s) {bad} out of range: {site} has {shape[0]} heads")
    return heads


def _default_k(arch: str) -> int:
    """32 active features per token (jumprelu: its starting L0); 8 codes per token for a codebook."""
    return 8 if arch == "codebook" else 32


def _name(given, site, target, arch, d_sae, k, head, several: bool) -> str:
    from workbench.workspace import check_name

    suffix = f"{arch}-{d_sae}" + (f"-k{k}" if k else "") + (f"-h{head}" if head is not None else "")
    if given:
        return check_name(f"{given}-{suffix}" if several else given, "dictionary name")
    base = site if not target or target == site else f"{site}-to-{target}"
    return check_name(f"{base}-{suffix}".replace("/", "_"), "dictionary name")


def _summary(d, workspace) -> dict:
    final = d.cfg.metadata.get("final", {})
    return {"name": d.cfg.name, "arch": d.cfg.arch, "site": d.cfg.site, "target_site": d.cfg.target_site, "head": d.cfg.head,
            "d_sae": d.cfg.d_sae, "k": d.cfg.k, "fvu": final.get("fvu"), "l0": final.get("l0"),
            "dead_fraction": final.get("dead_fraction"), "path": str(workspace.dictionaries_dir / d.cfg.name)}


def _leave_process_group(world) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ====================================================================== eval
def configure_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dictionary", default=None, help="dictionary name(s), comma-separated")
    parser.add_argument("--model", default=None, help="model to splice into (default: the one the dictionary was trained on)")
    parser.add_argument("--tokens", type=_count, default=32_768, help="evaluation tokens, e.g. 32k (default 32768)")
    parser.add_argument("--context", type=int, default=128, help="tokens per evaluation row")
    parser.add_argument("--corpus", default="reference", help="corpus for evaluation rows")
    parser.add_argument("--split", default="heldout", help="corpus split (default heldout)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--dense-threshold", type=float, default=0.1, help="a feature firing on more than this fraction is dense")
    parser.add_argument("--toy", action="store_true", help="the superposition check: train every variant on the toy, report recovery")
    parser.add_argument("--archs", default=None, help="with --toy: variants to check (default all)")
    parser.add_argument("--toy-tokens", type=_count, default=400_000, help="with --toy: training tokens per variant")
    parser.add_argument("--mlp-sparsity", action="store_true", help="the model's own activation sparsity at its MLP sites")
    parser.add_argument("--p", type=float, default=1.0, help="with --mlp-sparsity: the perplexity increase (percent) of PPL-p%% sparsity")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def run_eval(args: argparse.Namespace) -> dict:
    from workbench.workspace import Workspace

    workspace = Workspace(args.workspace)
    if not (args.dictionary or args.toy or args.mlp_sparsity):
        raise WorkbenchError("say what to evaluate: --dictionary NAME, --toy, or --mlp-sparsity --model M")
    out: dict = {}
    if args.dictionary:
        out["dictionaries"] = [_eval_one(workspace, name.strip(), args) for name in args.dictionary.split(",") if name.strip()]
    if args.toy:
        out["toy"] = _eval_toy(workspace, args)
    if args.mlp_sparsity:
        out["mlp_sparsity"] = _eval_mlp(workspace, args)
    return out


def _eval_one(workspace, name: str, args) -> dict:
    from sae.dictionary import load_dictionary
    from sae.evaluate import eval_tokens, evaluate_dictionary, write_eval
    from workbench.model import load_model

    d = load_dictionary(workspace, name)
    model = load_model(args.model or d.cfg.model or "ref-gpt2", device=args.device)
    tokens = eval_tokens(model, n_tokens=args.tokens, context=args.context, corpus=args.corpus, split=args.split)
    result = evaluate_dictionary(model, d, tokens, batch_size=args.batch_size, dense_threshold=args.dense_threshold, progress=True)
    run_id = write_eval(workspace, model.cfg.model_name, result)
    return {"dictionary": name, "run_id": run_id, "tokens": result.tokens, "l0": result.l0, "fvu": result.fvu,
            "cosine": result.cosine, **result.splice._asdict(), "dead_fraction": result.dead_fraction,
            "dense_fraction": result.dense_fraction}


def _eval_toy(workspace, args) -> list[dict]:
    from sae.evaluate import toy_recovery, write_toy

    archs = [a.strip() for a in args.archs.split(",")] if args.archs else None
    results = toy_recovery(archs, tokens=args.toy_tokens, progress=True)
    write_toy(workspace, results)
    return [r._asdict() for r in results]


def _eval_mlp(workspace, args) -> list[dict]:
    from sae.evaluate import eval_tokens, mlp_sparsity, write_mlp_sparsity
    from workbench.model import load_model

    model = load_model(args.model or "ref-gpt2", device=args.device)
    tokens = eval_tokens(model, n_tokens=args.tokens, context=args.context, corpus=args.corpus, split=args.split)
    rows = mlp_sparsity(model, tokens, p=args.p, batch_size=args.batch_size)
    write_mlp_sparsity(workspace, model.cfg.model_name, rows, args.p, int(tokens.numel()))
    return [r._asdict() for r in rows]


# ====================================================================== features
def configure_features(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dictionary", required=True, help="dictionary name(s), comma-separated")
    parser.add_argument("--source", choices=("auto", "store", "model"), default="auto",
                        help="activations from the store (cached) or by running the model over a corpus (default: store when cached)")
    parser.add_argument("--model", default=None, help="model (default: the dictionary's)")
    parser.add_argument("--run", default=None, help="cached run to read when the model has several")
    parser.add_argument("--tokens", type=_count, default=None,
                        help="activations to summarise: the first N cached rows (default all), or N tokens run through the model (default 65536)")
    parser.add_argument("--corpus", default="reference")
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--top", type=int, default=10, help="top-activating examples per feature")
    parser.add_argument("--quantiles", type=int, default=5, help="activation intervals sampled per feature")
    parser.add_argument("--samples", type=int, default=3, help="examples per interval")
    parser.add_argument("--window", default="8,4", help="tokens before,after each example (default 8,4)")
    parser.add_argument("--device", default=None)


def run_features(args: argparse.Namespace) -> dict:
    from sae.dictionary import load_dictionary
    from sae.features import FeatureTableConfig, feature_tables, write_feature_tables
    from workbench.model import load_model
    from workbench.workspace import Workspace

    workspace = Workspace(args.workspace)
    before, after = (int(v) for v in args.window.split(","))
    cfg = FeatureTableConfig(n_top=args.top, n_quantiles=args.quantiles, n_samples=args.samples, window_before=before,
                             window_after=after)
    out = []
    for name in [n.strip() for n in args.dictionary.split(",") if n.strip()]:
        start = time.time()
        d = load_dictionary(workspace, name)
        model = load_model(args.model or d.cfg.model or "ref-gpt2", device=args.device)
        from sae.evaluate import check_sites

        d = check_sites(model, d)
        source, used = _feature_source(workspace, model, d, args)
        tables = feature_tables(d, source, cfg, model=model, progress=True)
        write_feature_tables(workspace, tables, model)
        alive = sum(1 for r in tables.features if r["density"] > 0)
        out.append({"dictionary": name, "source": used, "tokens": tables.tokens, "features": len(tables.features),
                    "alive": alive, "examples": len(tables.examples), "seconds": round(time.time() - start, 2)})
    return {"dictionaries": out}


def _feature_source(workspace, model, d, args):
    from sae.evaluate import eval_tokens
    from sae.features import ModelSource, StoreSource
    from workbench.store import ActivationStore

    if args.source in ("auto", "store"):
        store = ActivationStore(workspace)
        try:
            run = store.run(model.cfg.model_name, [d.cfg.site], args.run)
            return StoreSource(store, model.cfg.model_name, d.cfg.site, run.name, max_rows=args.tokens), f"store:{run.name}"
        except WorkbenchError:
            if args.source == "store":
                raise
    tokens = eval_tokens(model, n_tokens=args.tokens or 65_536, context=args.context, corpus=args.corpus, split=args.split)
    return ModelSource(model, d.cfg.site, tokens), f"model:{args.corpus}/{args.split}"
