"""Steering runs: generate with and without interventions, measure what they did and what they cost, store it.

1. `side_by_side` generates a baseline and a steered continuation from the same prompt
   with the same seed (each run gets a fresh generator seeded identically, so any
   difference is the intervention's). Our own sampling loop decodes with the KV cache
   and tells the interventions the absolute position of every new token, so
   `PROMPT`/`GENERATED`/explicit positions mean the same thing while generating as on a
   plain forward. The first generated token comes from the prompt's last position, which
   every position set but `at(...)` of earlier tokens includes: it is steered too.
2. `Meter` measures an intervention against the unsteered model:
   - target effect, at each prompt's next-token position: the summed probability and
     the mean logit of the target tokens, an optional task metric (e.g. the IOI logit
     difference), and the feature's own activation read after the edit;
   - side effect, on neutral text with the edit applied at every position (explicit
     indices kept): KL(baseline || steered) of the next-token distributions, in nats per
     token, and the increase of next-token cross-entropy.
   `dose_response` sweeps a coefficient through the same meter: one row per coefficient.
3. `save_run` writes a run to the workspace as its own DuckDB file
   (`db/steering-<run_id>.duckdb`) with tables `steering_runs`, `steering_generations`,
   `steering_sweeps` and `steering_layers`, each keyed by `run_id` (see docs/steering.md).

`python -m workbench steer` (configure_steer / run_steer below) is the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from workbench.directions import (PromptBatch, Prompts, SteeringVector, activate_codes, behaviour_codes,
                                  contrastive_vectors, feature_vector, layer_sweep, promoted_tokens)
from workbench.errors import WorkbenchError
from workbench.interventions import (ALL, AblateDirection, ClampFeature, Feature, Intervention, Positions,
                                     ablate_direction_everywhere, intervene)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

    from workbench.workspace import Workspace


# ---------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Generation:
    """A prompt and the tokens generated after it."""

    prompt: str
    prompt_tokens: tuple[int, ...]
    new_tokens: tuple[int, ...]
    text: str  # the continuation only


class SideBySide(NamedTuple):
    baseline: Generation
    steered: Generation


def generate(
    model: "TransformerBridge",
    prompt: str,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 20,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    use_cache: bool = True,
) -> Generation:
    """Sample a continuation with `interventions` applied at their positions; temperature 0 is greedy.

    With `use_cache=False` every step re-runs the whole sequence (slower; the oracle the
    cached loop is tested against).
    """
    _check_generation_args(max_new_tokens, temperature, top_k)
    tokens = model.to_tokens(prompt).to(model.cfg.device)  # [1, prompt_len]
    prompt_len = tokens.shape[1]
    if prompt_len + max_new_tokens - 1 > model.cfg.n_ctx:
        raise WorkbenchError(f"prompt ({prompt_len} tokens) plus {max_new_tokens} new tokens exceeds the model's context of {model.cfg.n_ctx}")
    for iv in interventions:
        _positions_of(iv).check(prompt_len, prompt_len + max_new_tokens)
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    new: list[int] = []
    with torch.no_grad(), intervene(model, interventions, prompt_len=prompt_len) as state:
        logits, cache = _step(model, tokens, None, use_cache)
        for _ in range(max_new_tokens):
            _check_finite_logits(logits, interventions)
            token = _sample(logits[0, -1], generator, temperature, top_k)
            new.append(token)
            if stop_at_eos and token == eos:
                break
            tokens = torch.cat([tokens, torch.tensor([[token]], device=tokens.device)], 1)
            if len(new) == max_new_tokens:
                break
            state.offset = tokens.shape[1] - 1 if use_cache else 0
            logits, cache = _step(model, tokens[:, -1:] if use_cache else tokens, cache, use_cache)
    return Generation(prompt, tuple(tokens[0, :prompt_len].tolist()), tuple(new), model.tokenizer.decode(new))


def side_by_side(model: "TransformerBridge", prompt: str, interventions: Sequence[Intervention], **kwargs) -> SideBySide:
    """Baseline and steered generations from the same prompt with the same seed."""
    steered = generate(model, prompt, interventions, **kwargs)  # first: bad interventions fail before any work
    return SideBySide(generate(model, prompt, (), **kwargs), steered)


def _step(model, tokens: Tensor, cache, use_cache: bool):
    if not use_cache:
        return model(tokens), None
    seen = 0 if cache is None else cache.get_seq_length()
    if cache is None:
        logits, cache = model(tokens, return_type="logits_and_cache")
    else:
        logits, cache = model(tokens, return_type="logits_and_cache", past_key_values=cache)
    # A cache that did not grow by the tokens just run means the next step would see none of them
    # (transformers 5.24 renamed the argument TransformerLens's attention reads the cache from): refuse
    # rather than generate from a truncated context.
    if cache is None or cache.get_seq_length() != seen + tokens.shape[1]:
        held = None if cache is None else cache.get_seq_length()
        raise WorkbenchError(f"the KV cache holds {held} tokens after a step over {seen} + {tokens.shape[1]}: "
                             "this transformers/TransformerLens pair does not fill it; generate with use_cache=False")
    return logits, cache


def _sample(logits: Tensor, generator: torch.Generator, temperature: float, top_k: int | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _check_generation_args(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 1:
        raise WorkbenchError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise WorkbenchError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise WorkbenchError(f"top_k must be at least 1, got {top_k}")


# ---------------------------------------------------------------------------- measurement
@dataclass(frozen=True)
class Effect:
    """What a model does on the measurement prompts and the neutral text (None where not measured)."""

    target_prob: float | None = None  # summed probability of the target tokens at the next-token position
    target_logit: float | None = None  # mean logit of the target tokens there
    metric: float | None = None  # the caller's task metric, averaged over prompts
    feature_act: float | None = None  # the feature's activation at the next-token position, after the edit
    ce: float | None = None  # next-token cross-entropy on neutral text, nats/token
    kl: float | None = None  # KL(baseline || this) on neutral text, nats/token (0 for the baseline)
    ce_increase: float | None = None  # ce - baseline ce


class DoseRow(NamedTuple):
    coef: float
    target_prob: float | None
    target_logit: float | None
    metric: float | None
    feature_act: float | None
    kl: float | None
    ce_increase: float | None


class Meter:
    """Measures interventions on fixed prompts and neutral text against the unsteered model.

    prompts: what the target effect is read on (its next-token position: each prompt's last token);
    targets: token ids whose probability/logit is the target effect; metric: logits [batch, pos, vocab]
    -> [batch] (e.g. `TaskPrompts.metric`), computed on `metric_prompts` when given (e.g. a task's
    held-out prompts) and on `prompts` otherwise; feature: a `Feature` whose activation is read;
    neutral: [n, ctx] token rows for the side effects (None skips them).
    """

    def __init__(self, model: "TransformerBridge", prompts: Prompts, *, targets: Sequence[int] = (),
                 metric: Callable[[Tensor], Tensor] | None = None, metric_prompts: Prompts | None = None,
                 feature: Feature | None = None, neutral: Tensor | None = None):
        self.model = model
        self.prompts = PromptBatch.of(model, prompts)
        self.metric_prompts = None if metric_prompts is None else PromptBatch.of(model, metric_prompts)
        self.targets = torch.tensor(list(targets), dtype=torch.long)
        if self.targets.numel() and not (0 <= int(self.targets.min()) and int(self.targets.max()) < model.cfg.d_vocab):
            raise WorkbenchError(f"target token ids must lie in 0..{model.cfg.d_vocab - 1}")
        self.metric, self.feature, self.neutral = metric, feature, neutral
        self._neutral_base: Tensor | None = None
        self.baseline = self.effect(())

    def effect(self, interventions: Sequence[Intervention]) -> Effect:
        """The Effect of `interventions` (the empty list gives the baseline)."""
        logits, acts = self._prompt_pass(interventions, self.prompts, self.feature)
        final = logits[torch.arange(logits.shape[0]), self.prompts.lengths.to(logits.device) - 1].float()  # [batch, vocab]
        target_prob = target_logit = metric = None
        if self.targets.numel():
            t = self.targets.to(final.device)
            target_prob = float(final.softmax(-1)[:, t].sum(-1).mean())
            target_logit = float(final[:, t].mean())
        if self.metric is not None:
            if self.metric_prompts is not None:
                logits, _ = self._prompt_pass(interventions, self.metric_prompts, None)
            metric = float(self.metric(logits).float().mean())
        ce = kl = ce_increase = None
        if self.neutral is not None:
            ce, kl = self._neutral_pass(interventions)
            baseline = getattr(self, "baseline", None)
            ce_increase = 0.0 if baseline is None else ce - baseline.ce
        return Effect(target_prob, target_logit, metric, acts, ce, kl, ce_increase)

    def dose_response(self, build: Callable[[float], Sequence[Intervention]], coefs: Sequence[float]) -> list[DoseRow]:
        """One row per coefficient: the Effect of build(coef)."""
        rows = []
        for coef in coefs:
            try:
                e = self.effect(build(float(coef)))
            except WorkbenchError as err:
                raise WorkbenchError(f"at coefficient {coef}: {err}") from err
            rows.append(DoseRow(float(coef), e.target_prob, e.target_logit, e.metric, e.feature_act, e.kl, e.ce_increase))
        return rows

    def _prompt_pass(self, interventions, prompts: PromptBatch, f: Feature | None) -> tuple[Tensor, float | None]:
        """Logits [batch, pos, vocab] on `prompts` with the interventions, and f's mean activation at the last tokens."""
        model = self.model
        tokens, lengths = prompts.tokens.to(model.cfg.device), prompts.lengths
        for iv in interventions:  # an explicit index outside every prompt would silently edit nothing
            _positions_of(iv).check(int(lengths.min()), int(lengths.max()))
        seen: list[Tensor] = []

        def grab(x, hook):  # registered after the interventions' hooks, so it reads the edited value
            seen.append(f.activation(x.flatten(2))[torch.arange(x.shape[0]), lengths.to(x.device) - 1].float())
            return x

        with torch.no_grad(), intervene(model, interventions, prompt_len=lengths):
            with model.hooks(fwd_hooks=[(f.site, grab)] if f is not None else []):
                logits = model(tokens)
        _check_finite_logits(logits, interventions)
        return logits, (float(seen[0].mean()) if seen else None)

    def _neutral_pass(self, interventions) -> tuple[float, float]:
        model = self.model
        tokens = self.neutral.to(model.cfg.device)
        with torch.no_grad(), intervene(model, interventions, everywhere=True):
            logp = model(tokens).float().log_softmax(-1)[:, :-1]  # [n, ctx-1, vocab]
        _check_finite_logits(logp, interventions)
        ce = float(-logp.gather(-1, tokens[:, 1:, None]).mean())
        if self._neutral_base is None:  # the first pass is the baseline's (from __init__)
            self._neutral_base = logp
        base = self._neutral_base
        kl = float((base.exp() * (base - logp)).sum(-1).mean())
        return ce, kl


def neutral_tokens(model: "TransformerBridge", source: str = "reference", *, n: int = 8, context: int = 64) -> Tensor:
    """[n, context] rows of neutral text (held-out split of the reference corpus by default, or a text file)."""
    from data.corpus import documents, token_chunks

    context = min(context, model.cfg.n_ctx)
    split = "heldout" if source == "reference" else "all"
    rows = []
    for row in token_chunks(model.tokenizer, documents(source, split=split), context):
        rows.append(row)
        if len(rows) == n:
            break
    if not rows:
        raise WorkbenchError(f"neutral text {source!r} has fewer than {context} tokens")
    return torch.tensor(rows)


def is_monotonic(values: Sequence[float], increasing: bool = True) -> bool:
    """True when each value is >= (or <=) the one before."""
    pairs = list(zip(values, values[1:]))
    return all(b >= a for a, b in pairs) if increasing else all(b <= a for a, b in pairs)


def _check_finite_logits(logits: Tensor, interventions: Sequence[Intervention]) -> None:
    if not torch.isfinite(logits).all():
        what = "; ".join(json.dumps(iv.describe()) for iv in interventions) or "no intervention"
        raise WorkbenchError(f"the interventions produce NaN or infinite logits ({what}); use a smaller coefficient")


def _positions_of(iv: Intervention) -> Positions:
    return getattr(iv, "positions", ALL)


# ---------------------------------------------------------------------------- storage
@dataclass(frozen=True)
class SteeringRun:
    """Everything one steering command produced, as stored in the workspace."""

    run_id: str
    model: str
    kind: str  # feature | clamp | vector | contrast | codes | ablate_direction
    interventions: list[dict]
    coef: float | None
    positions: str
    seed: int
    temperature: float
    max_new_tokens: int
    targets: list[str]
    generations: list[SideBySide]
    baseline: Effect
    steered: Effect
    sweep: list[DoseRow] = field(default_factory=list)
    layers: list = field(default_factory=list)  # LayerScore rows when a layer was chosen by a sweep
    created: float = field(default_factory=time.time)


# Explicit column types: every run's file has the same schema, so the union across files keeps them.
SCHEMAS: dict[str, list[tuple[str, str]]] = {
    "steering_runs": [
        ("run_id", "VARCHAR"), ("created", "TIMESTAMP"), ("model", "VARCHAR"), ("kind", "VARCHAR"), ("interventions", "VARCHAR"),
        ("coef", "DOUBLE"), ("positions", "VARCHAR"), ("seed", "BIGINT"), ("temperature", "DOUBLE"), ("max_new_tokens", "BIGINT"),
        ("targets", "VARCHAR"), ("prompt", "VARCHAR"), ("baseline_text", "VARCHAR"), ("steered_text", "VARCHAR"),
        ("target_prob_baseline", "DOUBLE"), ("target_prob_steered", "DOUBLE"), ("target_logit_baseline", "DOUBLE"),
        ("target_logit_steered", "DOUBLE"), ("metric_baseline", "DOUBLE"), ("metric_steered", "DOUBLE"),
        ("feature_act_baseline", "DOUBLE"), ("feature_act_steered", "DOUBLE"), ("ce_baseline", "DOUBLE"),
        ("ce_steered", "DOUBLE"), ("kl", "DOUBLE"), ("ce_increase", "DOUBLE"),
    ],
    "steering_generations": [("run_id", "VARCHAR"), ("prompt_index", "BIGINT"), ("prompt", "VARCHAR"), ("variant", "VARCHAR"),
                             ("text", "VARCHAR"), ("tokens", "VARCHAR")],
    "steering_sweeps": [("run_id", "VARCHAR"), *((name, "DOUBLE") for name in DoseRow._fields)],
    "steering_layers": [("run_id", "VARCHAR"), ("site", "VARCHAR"), ("method", "VARCHAR"), ("coef", "DOUBLE"), ("score", "DOUBLE")],
}


def save_run(workspace: "Workspace", run: SteeringRun) -> Path:
    """Publish a run as `db/steering-<run_id>.duckdb` (tables keyed by run_id; see docs/steering.md)."""
    rows = {
        "steering_runs": [_run_row(run)],
        "steering_generations": [
            dict(run_id=run.run_id, prompt_index=i, prompt=g.baseline.prompt, variant=variant, text=gen.text,
                 tokens=json.dumps(list(gen.new_tokens)))
            for i, g in enumerate(run.generations) for variant, gen in (("baseline", g.baseline), ("steered", g.steered))],
        "steering_sweeps": [dict(run_id=run.run_id, **r._asdict()) for r in run.sweep],
        "steering_layers": [dict(run_id=run.run_id, site=r.site, method=r.method, coef=r.coef, score=r.score) for r in run.layers],
    }
    name = f"steering-{run.run_id}"
    with workspace.write_db(name) as con:
        for table, columns in SCHEMAS.items():
            con.execute(f'CREATE TABLE "{table}" ({", ".join(f"{c} {t}" for c, t in columns)})')
            names = [c for c, _ in columns]
            if rows[table]:
                con.executemany(f'INSERT INTO "{table}" VALUES ({", ".join("?" for _ in names)})',
                                [[row[c] for c in names] for row in rows[table]])
    return workspace.db_dir / f"{name}.duckdb"


def _run_row(run: SteeringRun) -> dict:
    base, steered = run.baseline, run.steered
    first = run.generations[0] if run.generations else None
    return dict(
        run_id=run.run_id, created=datetime.fromtimestamp(run.created, timezone.utc).replace(tzinfo=None), model=run.model,
        kind=run.kind, interventions=json.dumps(run.interventions), coef=run.coef, positions=run.positions, seed=run.seed,
        temperature=run.temperature, max_new_tokens=run.max_new_tokens, targets=json.dumps(run.targets),
        prompt=first.baseline.prompt if first else None,
        baseline_text=first.baseline.text if first else None, steered_text=first.steered.text if first else None,
        target_prob_baseline=base.target_prob, target_prob_steered=steered.target_prob,
        target_logit_baseline=base.target_logit, target_logit_steered=steered.target_logit,
        metric_baseline=base.metric, metric_steered=steered.metric,
        feature_act_baseline=base.feature_act, feature_act_steered=steered.feature_act,
        ce_baseline=base.ce, ce_steered=steered.ce, kl=steered.kl, ce_increase=steered.ce_increase,
    )


# ---------------------------------------------------------------------------- the command line
def configure_steer(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model name or directory (default: ref-gpt2)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt to generate from (repeat for several)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--feature", metavar="NAME:F", help="add (or with --clamp, clamp) feature F of workspace dictionary NAME")
    mode.add_argument("--vector", metavar="FILE", help="add a vector from a .safetensors/.npy/.json file")
    mode.add_argument("--contrast", nargs="+", metavar="SET",
                      help="build a contrastive vector: a task name (its clean vs corrupt prompts) or two text files, one prompt per line")
    mode.add_argument("--codes", metavar="NAME", help="activate dictionary NAME's codes most selective for --behaviour vs --other prompts")
    mode.add_argument("--ablate-direction", metavar="FILE", help="project a residual direction out of every residual write")
    parser.add_argument("--coef", type=float, default=None, help="coefficient (vectors: multiple of the vector; codes: multiple of their mean value)")
    parser.add_argument("--clamp", type=float, default=None, help="with --feature: clamp the feature to this value (delta form)")
    parser.add_argument("--site", default=None, help="site for --vector files without one, or the --contrast site (default: sweep every resid_post)")
    parser.add_argument("--method", default="mean_diff", choices=("mean_diff", "pca"), help="contrastive vector method")
    parser.add_argument("--behaviour", metavar="FILE", help="--codes: prompts showing the behaviour, one per line")
    parser.add_argument("--other", metavar="FILE", help="--codes: other prompts, one per line")
    parser.add_argument("--top", type=int, default=3, help="--codes: how many codes to activate")
    parser.add_argument("--positions", default="all", help="all | prompt | generated | comma-separated token indices")
    parser.add_argument("--target", action="append", default=None, help="target token text (one token; repeatable); default: the vector's top promoted token")
    parser.add_argument("--sweep", default=None, help="comma-separated coefficients for the dose-response table (default: -1,0,0.25,0.5,1,2 x coef)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--neutral", default="reference", help="neutral text for side effects: 'reference' or a .txt/.jsonl/.parquet file")
    parser.add_argument("--neutral-rows", type=int, default=8, help="rows of neutral text (64 tokens each)")
    parser.add_argument("--save-vector", metavar="FILE", help="write the vector used (safetensors) to FILE")
    parser.add_argument("--orthogonalize", metavar="DIR", help="with --ablate-direction: also save the weight-orthogonalised model to DIR")
    parser.add_argument("--no-save", action="store_true", help="do not write the run to the workspace")


class Plan(NamedTuple):
    """What a steer command will apply: interventions as a function of the coefficient, and what to measure."""

    kind: str
    build: Callable[[float], list[Intervention]]
    coef: float | None
    vector: SteeringVector | None
    feature: Feature | None
    layers: list
    task: Any = None  # TaskPrompts whose metric is reported (held-out prompts of a --contrast task)


def run_steer(args: argparse.Namespace) -> dict:
    from workbench.model import DEFAULT_MODEL, load_model
    from workbench.workspace import Workspace

    workspace = Workspace(args.workspace)
    positions = Positions.parse(args.positions)
    _check_generation_args(args.max_new_tokens, args.temperature, args.top_k)
    model = load_model(args.model or DEFAULT_MODEL, device=args.device)
    plan = _plan(args, model, workspace, positions)
    targets = _targets(model, args.target, plan.vector)
    interventions = plan.build(plan.coef if plan.coef is not None else 1.0)
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature, top_k=args.top_k)
    _say(f"generating {len(args.prompt)} prompt(s), baseline and steered")
    generations = [side_by_side(model, p, interventions, **kw) for p in args.prompt]
    neutral = neutral_tokens(model, args.neutral, n=args.neutral_rows)
    task = plan.task
    meter = Meter(model, args.prompt, targets=[t for t, _ in targets], feature=plan.feature, neutral=neutral,
                  metric=None if task is None else task.metric, metric_prompts=task)
    steered = meter.effect(interventions)
    sweep = meter.dose_response(plan.build, _sweep_coefs(args.sweep, plan.coef)) if plan.coef is not None else []
    if args.save_vector and plan.vector is not None:
        plan.vector.save(args.save_vector)
    ortho = _orthogonalize(args, model, plan)
    run = SteeringRun(uuid.uuid4().hex[:12], model.cfg.model_name, plan.kind, [iv.describe() for iv in interventions],
                      plan.coef, str(positions), args.seed, args.temperature, args.max_new_tokens, [s for _, s in targets],
                      generations, meter.baseline, steered, sweep, plan.layers)
    path = None if args.no_save else save_run(workspace, run)
    return _summary(run, path, ortho)


def _plan(args, model, workspace, positions: Positions) -> Plan:
    if args.clamp is not None and not args.feature:
        raise WorkbenchError("--clamp goes with --feature")
    if args.feature:
        return _feature_plan(args, model, workspace, positions)
    if args.vector:
        vector = SteeringVector.load(args.vector, site=args.site)
        return Plan("vector", lambda c: [vector.add(c, positions)], _coef(args), vector, None, [])
    if args.contrast:
        return _contrast_plan(args, model, positions)
    if args.codes:
        return _codes_plan(args, model, workspace, positions)
    vector = SteeringVector.load(args.ablate_direction, site=args.site or "residual")  # ablated at every residual write
    ablation = ablate_direction_everywhere(model, vector.vector, positions)
    return Plan("ablate_direction", lambda c: list(ablation), None, None, None, [])


def _feature_plan(args, model, workspace, positions: Positions) -> Plan:
    name, _, index = args.feature.rpartition(":")
    if not name or not index.lstrip("-").isdigit():
        raise WorkbenchError(f"--feature must be NAME:INDEX, got {args.feature!r}")
    dictionary = _load_dictionary(workspace, name)
    feature = Feature.from_dictionary(dictionary, int(index), f"{name}:{index}")
    vector = feature_vector(feature)
    if args.clamp is not None:
        if args.coef is not None:
            raise WorkbenchError("give --clamp or --coef, not both")
        clamp = float(args.clamp)
        return Plan("clamp", lambda c: [ClampFeature(feature, c, positions)], clamp, vector, feature, [])
    return Plan("feature", lambda c: [vector.add(c, positions)], _coef(args), vector, feature, [])


def _contrast_plan(args, model, positions: Positions) -> Plan:
    """A contrastive vector; with a task, the layer is chosen on its held-out prompts and its metric reported."""
    positive, negative, task = _contrast_sets(args.contrast, model)
    sites = [args.site] if args.site else [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    if len(sites) > 1 and task is None:
        raise WorkbenchError("with two prompt files, pass --site (the layer sweep needs a task metric: use --contrast TASK)")
    _say(f"building {args.method} vectors at {len(sites)} site(s)")
    vectors = contrastive_vectors(model, positive, negative, sites, methods=[args.method])
    coef = _coef(args)
    heldout = _task(task, model, split="heldout") if task is not None else None
    layers = []
    if len(vectors) > 1:
        meter = Meter(model, heldout, metric=heldout.metric)
        sign = 1.0 if coef >= 0 else -1.0  # a positive coefficient should raise the task metric, a negative one lower it
        layers = layer_sweep(model, vectors, lambda ivs: sign * meter.effect(ivs).metric, coef=coef, positions=positions)
        vectors = [v for v in vectors if v.site == layers[0].site]
        _say(f"layer sweep chose {layers[0].site}")
    vector = vectors[0]
    return Plan("contrast", lambda c: [vector.add(c, positions)], coef, vector, None, layers, heldout)


def _codes_plan(args, model, workspace, positions: Positions) -> Plan:
    if not (args.behaviour and args.other):
        raise WorkbenchError("--codes needs --behaviour FILE and --other FILE (one prompt per line)")
    dictionary = _load_dictionary(workspace, args.codes)
    codes = behaviour_codes(model, dictionary, _lines(args.behaviour), _lines(args.other), top=args.top)
    _say("codes: " + ", ".join(f"{c.index} ({c.freq_behaviour:.2f} vs {c.freq_other:.2f})" for c in codes))
    return Plan("codes", lambda c: activate_codes(dictionary, codes, positions=positions, scale=c), _coef(args, 1.0), None, None, [])


def _contrast_sets(spec: list[str], model):
    from data.tasks import TASKS

    if len(spec) == 1 and spec[0] in TASKS:
        task = _task(spec[0], model, split="train")
        return PromptBatch(task.clean, task.final_pos + 1), PromptBatch(task.corrupt, task.final_pos + 1), spec[0]
    if len(spec) != 2:
        raise WorkbenchError(f"--contrast takes a task name ({', '.join(TASKS)}) or two prompt files")
    return _lines(spec[0]), _lines(spec[1]), None


def _task(name: str, model, split: str):
    from data.tasks import make_task

    return make_task(name, model.tokenizer, n=32, split=split, seed=0)


def _lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"prompt file {path} does not exist")
    from data.corpus import read_utf8

    lines = [line.rstrip("\n") for line in read_utf8(p, "prompt file").splitlines() if line.strip()]
    if not lines:
        raise WorkbenchError(f"prompt file {path} has no prompts")
    return lines


def _load_dictionary(workspace, name: str):
    try:
        from sae import load_dictionary
    except ImportError as e:
        raise WorkbenchError(f"dictionaries need the sae package, which cannot be imported here ({e})") from e
    return load_dictionary(workspace, name)


def _coef(args, default: float = 1.0) -> float:
    return default if args.coef is None else float(args.coef)


def _sweep_coefs(spec: str | None, coef: float) -> list[float]:
    if spec is None:
        values = [m * coef for m in (-1.0, 0.0, 0.25, 0.5, 1.0, 2.0)]
    else:
        try:
            values = [float(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise WorkbenchError(f"--sweep must be comma-separated numbers, got {spec!r}") from None
    return sorted({v + 0.0 for v in values})  # ascending, no -0.0


def _targets(model, texts: list[str] | None, vector: SteeringVector | None) -> list[tuple[int, str]]:
    """(token id, text) of each --target, or the vector's top promoted token when none is given."""
    if texts:
        out = []
        for text in texts:
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise WorkbenchError(f"target {text!r} is {len(ids)} tokens; give a single token (mind the leading space)")
            out.append((ids[0], text))
        return out
    if vector is not None and vector.vector.numel() == model.cfg.d_model:
        top = promoted_tokens(model, vector, k=1)[0]
        return [(top.token, top.text)]
    return []


def _orthogonalize(args, model, plan: Plan) -> str | None:
    if not args.orthogonalize:
        return None
    if plan.kind != "ablate_direction":
        raise WorkbenchError("--orthogonalize goes with --ablate-direction")
    from workbench.directions import orthogonalize

    first = plan.build(0.0)[0]
    assert isinstance(first, AblateDirection)
    return str(orthogonalize(model, first.direction, args.orthogonalize))


def _summary(run: SteeringRun, path: Path | None, ortho: str | None) -> dict:
    return dict(
        run_id=run.run_id, model=run.model, kind=run.kind, coef=run.coef, positions=run.positions, targets=run.targets,
        generations=[dict(prompt=g.baseline.prompt, baseline=g.baseline.text, steered=g.steered.text) for g in run.generations],
        baseline=asdict(run.baseline), steered=asdict(run.steered),
        sweep=[r._asdict() for r in run.sweep], layers=[r._asdict() for r in run.layers],
        db=str(path) if path else None, orthogonalized_model=ortho,
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr)
