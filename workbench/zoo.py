"""`python -m workbench models` and `python -m workbench zoo build`: the bundled models and their behaviour.

`models` lists the bundled models (built or not, size, recipe, the behaviour
recorded when they were built) and measures the four task behaviours of one
model, live, on held-out prompts: `--model` takes a bundled name, a local
HuggingFace-format directory or a hub name, loaded through `workbench.load_model`
exactly like any other model. The figures and thresholds are defined once, in
`data.zoo.measure` (see its docstring for what each number means).

`zoo build` trains a bundled reference model with the deterministic recipe in
`data/zoo.py`, in four steps:
1. train into a staging directory beside the target (`.ref-gpt2.building-<id>`);
2. boot the staged checkpoint through `load_model` (the TransformerBridge path
   every user takes) and measure its held-out behaviour;
3. write that behaviour into the model card;
4. swap the staging directory into place (`data.zoo.publish`). Until then the
   committed model is untouched; on any failure or interrupt the staging
   directory is removed and nothing else changes.
"""

from __future__ import annotations

import argparse
import ast
import shutil
import sys
import uuid
from dataclasses import fields, replace
from pathlib import Path

from data import BUNDLED_MODELS, bundled_model_dir
from data.zoo import MEASURE_PROMPTS, PRESETS, THRESHOLDS, Behaviour, ZooConfig, build, headline, measure, publish, read_card, write_card
from workbench.errors import WorkbenchError

__all__ = ["THRESHOLDS", "configure_models", "configure_zoo", "measure_model", "run_models", "run_zoo"]


# ---------------------------------------------------------------------------- models
def configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ref-gpt2",
                        help="model to measure: a bundled name, a local HuggingFace directory or a hub name (default ref-gpt2)")
    parser.add_argument("--n", type=int, default=MEASURE_PROMPTS, help=f"prompts per task (default {MEASURE_PROMPTS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt sets (default 0)")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="prompt split: heldout (names, templates, years never in training; default) or train")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--list", action="store_true", help="only list the bundled models; measure nothing")


def run_models(args: argparse.Namespace) -> dict:
    """List the bundled models, then measure `--model` (unless `--list`)."""
    result: dict = {"bundled": [bundled_entry(name) for name in BUNDLED_MODELS]}
    if args.list:
        return result
    if args.n < 1:
        raise WorkbenchError(f"--n must be at least 1, got {args.n}")
    from workbench.model import load_model, resolve_model_dir

    resolve_model_dir(args.model)  # a bad name fails here, before TransformerLens is imported
    model = load_model(args.model, device=args.device)
    print(f"measuring {args.model} on {args.n} {args.split} prompts per task ...", file=sys.stderr)
    behaviour = measure_model(model, n=args.n, seed=args.seed, split=args.split)
    print(describe(behaviour), file=sys.stderr)
    result.update(model=args.model, path=str(model.workbench_dir), thresholds=THRESHOLDS,
                  behaviour=behaviour.as_dict(), passed=behaviour.passed)
    return result


def measure_model(model, n: int = MEASURE_PROMPTS, seed: int = 0, split: str = "heldout") -> Behaviour:
    """The held-out behaviour of a TransformerBridge (see `data.zoo.measure`)."""
    import torch

    device = model.cfg.device

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:  # [batch, pos] -> [batch, pos, vocab]
        return model(tokens.to(device), return_type="logits")

    context = min(128, int(model.cfg.n_ctx))
    return measure(logits_of, model.tokenizer, n=n, seed=seed, split=split, context=context)


def bundled_entry(name: str) -> dict:
    """What `models` says about one bundled model: whether it is built, its size, recipe and recorded behaviour."""
    directory = bundled_model_dir(name)
    entry = {"name": name, "description": BUNDLED_MODELS[name], "path": str(directory),
             "built": (directory / "config.json").is_file()}
    if not entry["built"]:
        return entry
    card = read_card(directory) or {}
    recipe = card.get("recipe", {})
    entry["size_mb"] = round(sum(p.stat().st_size for p in directory.iterdir() if p.is_file()) / 1e6, 2)
    entry["shape"] = {k: recipe.get(k) for k in ("n_layers", "d_model", "n_heads", "vocab_size", "context")}
    entry["trained"] = {k: card.get(k) for k in ("seed", "steps", "training_wall_seconds", "training_cpu_seconds", "python")}
    if "behaviour" in card:
        entry["recorded_behaviour"] = card["behaviour_headline"] if "behaviour_headline" in card else None
        entry["recorded_passed"] = card["behaviour"].get("passed")
    return entry


def describe(b: Behaviour) -> str:
    """A few human-readable lines (stderr) with each figure beside its threshold."""
    def mark(ok: bool) -> str:
        return "ok " if ok else "LOW"

    i, ioi, gt, doc = b.induction, b.ioi, b.greater_than, b.docstring
    return "\n".join([
        f"  text      held-out loss {b.text_loss:.3f} nats/token",
        f"  {mark(i.passed)} induction  loss 2nd/1st half {i.loss_ratio:.3f} (<= {THRESHOLDS['induction']}); "
        f"{i.second_half_loss:.2f} vs {i.first_half_loss:.2f}; logit diff {i.logit_diff:.2f}, corrupt {i.corrupt_logit_diff:.2f}",
        f"  {mark(ioi.passed)} ioi        pairwise acc {ioi.accuracy:.3f} (>= {THRESHOLDS['ioi_accuracy']}), "
        f"logit diff {ioi.clean:.2f} (>= {THRESHOLDS['ioi_logit_diff']}), top-1 {ioi.top1:.3f}; corrupt {ioi.corrupt:.2f}",
        f"  {mark(gt.passed)} greater_than prob diff {gt.clean:.3f} (>= {THRESHOLDS['greater_than']}); corrupt {gt.corrupt:.3f}",
        f"  {mark(doc.passed)} docstring  top-1 {doc.top1:.3f} (>= {THRESHOLDS['docstring']}); logit diff {doc.clean:.2f}, "
        f"corrupt {doc.corrupt:.2f}",
    ])


# ---------------------------------------------------------------------------- zoo build
def configure_zoo(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    b = actions.add_parser("build", help="train a reference model (deterministic) and swap it into place when complete",
                           description=__doc__.split("\n\n")[2] if __doc__ else None)
    b.add_argument("--model", default="ref-gpt2", choices=sorted(BUNDLED_MODELS), help="bundled model to build (default ref-gpt2)")
    b.add_argument("--out", default=None, help="target directory (default: the bundled model's directory under data/models/)")
    b.add_argument("--preset", choices=sorted(PRESETS), default="ref", help="recipe preset: ref (the committed model) or tiny (smoke test)")
    b.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides the preset)")
    b.add_argument("--minutes", type=float, default=None,
                   help="fit training into this many minutes (steps set after timing the first ones; not deterministic)")
    b.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order and synthetic data")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default 2; results depend on it)")
    b.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"override any recipe field ({', '.join(f.name for f in fields(ZooConfig))})")
    b.add_argument("--n", type=int, default=MEASURE_PROMPTS,
                   help=f"held-out prompts per task for the final measurement (default {MEASURE_PROMPTS})")
    # Accept the CLI's common options after the action too (`zoo build --json`), without shadowing them when given before.
    b.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    b.add_argument("--workspace", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_zoo(args: argparse.Namespace) -> dict:
    target = Path(args.out).expanduser().resolve() if args.out else bundled_model_dir(args.model)
    _check_target(target)
    if args.model.startswith("planted-"):
        return _build_planted(args.model, target)
    config = recipe_from_args(args)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.building-{uuid.uuid4().hex[:8]}"
    try:
        result = build(config, staging, minutes=args.minutes)
        behaviour = _measure_staged(staging, args.n)
        card = dict(result.card, behaviour=behaviour.as_dict(), behaviour_headline=headline(behaviour),
                    behaviour_measured_with="workbench.load_model (TransformerBridge, compatibility mode), "
                                            f"{args.n} held-out prompts per task, seed 0")
        write_card(staging, card)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(describe(behaviour), file=sys.stderr)
    return {"model": args.model, "path": str(target), "steps": card["steps"], "seed": card["seed"],
            "training_wall_seconds": card["training_wall_seconds"], "training_cpu_seconds": card["training_cpu_seconds"],
            "size_mb": round(sum(p.stat().st_size for p in target.iterdir() if p.is_file()) / 1e6, 2),
            "behaviour": headline(behaviour), "passed": behaviour.passed}


def _build_planted(name: str, target: Path) -> dict:
    """Planted models are not trained: their weights are written by hand (data/planted.py), in about a second."""
    from data.planted import PLANTED, build_planted

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.building-{uuid.uuid4().hex[:8]}"
    try:
        build_planted(PLANTED[name], staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote the hand-built weights of {name} and its ground_truth.json to {target}", file=sys.stderr)
    return {"model": name, "path": str(target), "trained": False,
            "size_mb": round(sum(p.stat().st_size for p in target.iterdir() if p.is_file()) / 1e6, 2)}


def recipe_from_args(args: argparse.Namespace) -> ZooConfig:
    """The preset with `--steps/--seed/--threads` and every `--set FIELD=VALUE` applied (values parsed as Python literals)."""
    config = PRESETS[args.preset]
    types = {f.name: f.type for f in fields(ZooConfig)}
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("threads", args.threads)) if v is not None}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or key not in types:
            raise WorkbenchError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise WorkbenchError(f"--set {item!r}: {text!r} is not a number, tuple or quoted string") from None
        overrides[key] = tuple(value) if isinstance(value, list) else value
    config = replace(config, **overrides)
    for name in ("steps", "threads", "batch_size", "context", "d_model", "n_layers", "n_heads", "vocab_size"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise WorkbenchError(f"recipe field {name} must be a positive integer, got {getattr(config, name)!r}")
    if config.d_model % config.n_heads:
        raise WorkbenchError(f"d_model {config.d_model} is not divisible by n_heads {config.n_heads}")
    if args.minutes is not None and args.minutes <= 0:
        raise WorkbenchError(f"--minutes must be positive, got {args.minutes}")
    return config


def _check_target(target: Path) -> None:
    """Refuse, before training, a target that is a file or a non-empty directory that is not a model."""
    if target.exists() and not target.is_dir():
        raise WorkbenchError(f"--out {target} is a file; pass a directory")
    if target.is_dir() and any(target.iterdir()) and not (target / "config.json").is_file():
        raise WorkbenchError(f"--out {target} is a non-empty directory that is not a model; refusing to replace it")


def _measure_staged(staging: Path, n: int) -> Behaviour:
    from workbench.model import load_model

    print(f"measuring the new checkpoint through load_model on {n} held-out prompts per task ...", file=sys.stderr)
    return measure_model(load_model(staging), n=n)
