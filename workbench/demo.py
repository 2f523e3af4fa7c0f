"""`python -m workbench demo`: the main job, end to end, on the embedded reference model.

Every step runs the same command a user would type (through `workbench.cli.main`),
so the demo is also a smoke test of the whole tool:

1. load the model (`--model`, default the bundled `ref-gpt2`), measure its four
   task behaviours on held-out prompts and publish them as the table
   `model_behaviours` (`db/behaviour.duckdb`);
2. `cache` the residual stream after the last block and the last block's MLP
   input and output (`demo_sites`) over the reference corpus's train split
   (`--tokens`, default 256k);
3. `train` a TopK SAE on the residual stream and a skip transcoder replacing
   the last block's MLP, on those cached activations (`--train-tokens`, default 2M:
   about eight passes over the cache);
4. `eval` both (FVU, L0, CE loss recovered, KL, density) on held-out text and
   write their `features` tables (top contexts, quantile samples, logits);
5. `circuit`: find the IOI circuit with exact activation patching (the oracle),
   attribution patching and RelP, so the app can compare the three;
6. `steer` the IOI prompt with one SAE feature (`pick_feature`: among those firing
   on 0.1-10% of tokens, the one that raises one token's logit most at its own largest
   activation, steered at twice that activation), sweeping its coefficient and
   measuring the target effect and side effects;
7. open the app on the workspace (`--no-app` stops before that; the summary
   says how to open it later).

A re-run reuses the cached activations (the cache command resumes and finds
nothing missing) and replaces the dictionaries (`--overwrite`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import uuid

from workbench.errors import WorkbenchError

SAE_NAME, TRANSCODER_NAME = "demo-sae", "demo-transcoder"
IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


def configure_demo(parser: argparse.ArgumentParser) -> None:
    from data.zoo import MEASURE_PROMPTS

    parser.add_argument("--model", default="ref-gpt2", help="model to run the demo on (default: the bundled ref-gpt2)")
    parser.add_argument("--n", type=int, default=MEASURE_PROMPTS,
                        help=f"held-out prompts per task for the behaviour check (default {MEASURE_PROMPTS})")
    parser.add_argument("--tokens", default="256k", help="tokens to cache (default 256k)")
    parser.add_argument("--train-tokens", default="2M", help="activations to train each dictionary on, in passes over the cache (default 2M)")
    parser.add_argument("--d-sae", type=int, default=1024, help="features per dictionary (default 1024)")
    parser.add_argument("--k", type=int, default=16, help="active features per token (default 16)")
    parser.add_argument("--pairs", type=int, default=32, help="IOI prompt pairs for the circuit step (default 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--no-app", action="store_true", help="stop after building the workspace; do not open the app")
    parser.add_argument("--port", type=int, default=None, help="port for the app (default: a free one)")


def run_demo(args: argparse.Namespace) -> dict:
    from workbench.caching import token_count
    from workbench.model import load_model
    from workbench.store import model_name
    from workbench.workspace import Workspace
    from workbench.zoo import describe, measure_model

    for flag, value in (("--n", args.n), ("--d-sae", args.d_sae), ("--k", args.k), ("--pairs", args.pairs)):
        if value < 1:
            raise WorkbenchError(f"{flag} must be at least 1, got {value}")
    tokens = token_count(args.tokens)
    train_tokens = token_count(args.train_tokens)
    workspace = Workspace(args.workspace)
    ws = ["--workspace", str(workspace.root)]
    device = ["--device", args.device] if args.device else []
    did: list[str] = []
    started = time.time()

    # 1. the model and its behaviour
    model = load_model(args.model, device=args.device)
    name = model_name(args.model)
    did.append(_say(f"loaded {args.model} from {model.workbench_dir} ({model.cfg.n_layers} layers, d_model "
                    f"{model.cfg.d_model}, {model.cfg.n_heads} heads, vocab {model.cfg.d_vocab}) on {model.cfg.device}"))
    if model.cfg.n_layers < 2:
        raise WorkbenchError(f"the demo needs a model with at least 2 layers; {args.model} has {model.cfg.n_layers}")
    last = model.cfg.n_layers - 1
    sae_site, mlp_in, mlp_out = demo_sites(model.cfg.n_layers)
    behaviour = measure_model(model, n=args.n)
    print(describe(behaviour), file=sys.stderr)
    path = publish_behaviour(workspace, name, behaviour)
    did.append(_say(f"measured induction, IOI, greater-than and docstring on {args.n} held-out prompts each "
                    f"({'all pass' if behaviour.passed else 'NOT all pass'}); table model_behaviours in {path}"))
    del model

    # 2. cache
    cached = _command("cache", *ws, "--model", args.model, "--sites", f"{sae_site},{mlp_in},{mlp_out}",
                      "--tokens", str(tokens), *device)
    did.append(_say(f"cached {cached.get('rows', tokens):,} tokens of {sae_site}, {mlp_in} and {mlp_out} "
                    f"(run {cached.get('run')})"))

    # 3. dictionaries
    common = ["--model", args.model, "--tokens", str(train_tokens), "--overwrite", *device]
    sae = _command("train", *ws, *common, "--site", sae_site, "--arch", "topk", "--d-sae", str(args.d_sae),
                   "--k", str(args.k), "--name", SAE_NAME)
    did.append(_say(f"trained TopK SAE {SAE_NAME} ({args.d_sae} features, k={args.k}) on {sae_site}: {_brief(sae)}"))
    tc = _command("train", *ws, *common, "--site", mlp_in, "--target", mlp_out, "--arch", "topk", "--d-sae",
                  str(args.d_sae), "--k", str(args.k), "--skip", "--name", TRANSCODER_NAME)
    did.append(_say(f"trained skip transcoder {TRANSCODER_NAME} replacing block {last}'s MLP: {_brief(tc)}"))

    # 4. evaluation and feature tables
    ev = _command("eval", *ws, "--dictionary", f"{SAE_NAME},{TRANSCODER_NAME}", *device)
    figures = "; ".join(f"{d['dictionary']} FVU {d['fvu']:.3f}, L0 {d['l0']:.1f}, CE recovered {d['ce_recovered_mean']:.1%} "
                        f"(vs mean ablation)" for d in ev.get("dictionaries", []))
    did.append(_say(f"evaluated both dictionaries on held-out text: {figures or 'done'}"))
    _command("features", *ws, "--dictionary", f"{SAE_NAME},{TRANSCODER_NAME}", *device)
    did.append(_say("wrote per-feature tables (density, top contexts, quantile samples, promoted logits, neighbours)"))

    # 5. circuits
    circuits = {}
    for method in ("activation", "attribution", "relp"):
        out = _command("circuit", *ws, "--model", args.model, "--task", "ioi", "--method", method,
                       "--n", str(args.pairs), *device)
        circuits[method] = out.get("circuit_id")
        did.append(_say(f"IOI circuit by {method}: {_brief(out)}"))

    # 6. steering
    feature, coef = pick_feature(workspace, SAE_NAME)
    steer = _command("steer", *ws, "--model", args.model, "--feature", f"{SAE_NAME}:{feature}", "--coef", str(coef),
                     "--prompt", IOI_PROMPT, "--max-new-tokens", "12", "--temperature", "0", *device)
    b, st = steer.get("baseline", {}), steer.get("steered", {})
    sweep = ", ".join(f"{r.get('coef'):g}: {r.get('target_prob', float('nan')):.3g}" for r in steer.get("sweep", [])
                      if isinstance(r, dict) and "coef" in r)
    did.append(_say(f"steered with feature {feature} of {SAE_NAME} (coef {coef:g}, {STEER_MULTIPLE:g}x its largest activation): P(its top promoted token) "
                    f"{b.get('target_prob', float('nan')):.3g} -> {st.get('target_prob', float('nan')):.3g}, KL on neutral text "
                    f"{st.get('kl', float('nan')):.3g}; sweep {sweep or 'n/a'}"))

    result = {"model": args.model, "workspace": str(workspace.root), "did": did, "passed": behaviour.passed,
              "behaviour": behaviour_rows_summary(behaviour), "circuits": circuits, "steering_feature": feature, "steering_coef": coef,
              "seconds": round(time.time() - started, 1)}
    if args.no_app:
        did.append(_say(f"done in {result['seconds']:.0f}s; open the app with: python -m workbench app "
                        f"--workspace {workspace.root}"))
        return result

    # 7. the app
    from app.launch import serve

    did.append(_say(f"done in {result['seconds']:.0f}s; opening the app (Ctrl+C stops it)"))
    serve(workspace.root, port=args.port)
    return result


STEER_MULTIPLE = 2.0  # the demo steers with this multiple of the feature's largest activation seen in text


def demo_sites(n_layers: int) -> tuple[str, str, str]:
    """The demo's sites: the residual stream after the last block (the SAE), and that block's MLP input and output
    (the transcoder). After the last block only the final LayerNorm stands between a feature and the logits, so a
    feature's promoted tokens are what steering with it does (on the 3-layer ref-gpt2, steering a block-1 feature at
    twice its largest activation moved its token's probability from 5e-12 to 2e-8: block 2 undid most of it)."""
    last = n_layers - 1
    return f"blocks.{last}.hook_resid_post", f"blocks.{last}.ln2.hook_normalized", f"blocks.{last}.hook_mlp_out"


def pick_feature(workspace, dictionary: str) -> tuple[int, float]:
    """The feature to steer with, and its coefficient.

    Among live features that fire on 0.1%-10% of tokens, the one whose decoder direction, at the feature's own
    largest activation, raises one token's logit most (top promoted logit x max activation): the demo measures
    the probability of that token. The coefficient is STEER_MULTIPLE x the feature's largest activation, the
    scale the feature itself reaches. A fixed small coefficient (4) moved the reference model's token
    probabilities by less than 1e-9; ranking by the promoted logit alone picked a feature that fires weakly
    (largest activation 6.8), whose token went from 6e-13 to 2e-7.
    """
    frame = workspace.sql(
        "SELECT feature, max_activation FROM features WHERE dictionary = ? AND density BETWEEN 0.001 AND 0.1 "
        "ORDER BY promoted_logits[1] * max_activation DESC, feature LIMIT 1", [dictionary])
    if frame.empty:
        frame = workspace.sql("SELECT feature, max_activation FROM features WHERE dictionary = ? "
                              "ORDER BY density DESC, feature LIMIT 1", [dictionary])
    if frame.empty:
        raise WorkbenchError(f"dictionary {dictionary!r} has no features table; the features step did not run")
    largest = float(frame["max_activation"].iloc[0])
    return int(frame["feature"].iloc[0]), round(STEER_MULTIPLE * largest, 2) if largest > 0 else 1.0


def publish_behaviour(workspace, model_name: str, behaviour) -> str:
    """Write one row per figure to `db/behaviour.duckdb` (replacing an earlier demo's file atomically)."""
    import pyarrow as pa

    rows = behaviour_rows(model_name, behaviour)
    with workspace.write_db("behaviour") as con:
        arrow_rows = pa.Table.from_pylist(rows)
        con.execute("CREATE TABLE model_behaviours AS SELECT * FROM arrow_rows")
    return str(workspace.db_dir / "behaviour.duckdb")


def behaviour_rows(model_name: str, behaviour) -> list[dict]:
    """Flat rows (model, run_id, split, task, figure, value, passed, measured_at) of a Behaviour."""
    run_id, now = uuid.uuid4().hex[:12], time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = [dict(task="text", figure="loss", value=behaviour.text_loss, passed=None)]
    for task in ("induction", "ioi", "greater_than", "docstring"):
        score = getattr(behaviour, task)
        for figure, value in vars(score).items():
            if isinstance(value, float):
                rows.append(dict(task=task, figure=figure, value=value, passed=score.passed))
    return [dict(model=model_name, run_id=run_id, split=behaviour.split, measured_at=now, **r) for r in rows]


def behaviour_rows_summary(behaviour) -> dict:
    from data.zoo import headline

    return headline(behaviour)


def _command(*argv: str) -> dict:
    """Run `python -m workbench <argv>` in this process; return its JSON summary (a failure stops the demo)."""
    import json

    from workbench.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--json"])
    if code != 0:
        raise WorkbenchError(f"demo step `python -m workbench {' '.join(argv)}` failed (status {code}); see the message above")
    text = out.getvalue().strip()
    try:
        return json.loads(text.splitlines()[-1]) if text else {}
    except ValueError:
        return {}


def _brief(summary: dict, limit: int = 6) -> str:
    """A few scalar figures of a command's summary, for the step's line."""
    items = [(k, v) for k, v in _flat(summary) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items[:limit]) or "done"


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _say(message: str) -> str:
    print(message, file=sys.stderr)
    return message
