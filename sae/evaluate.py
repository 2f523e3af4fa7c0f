"""Evaluating dictionaries: reconstruction, splice-in loss, feature density; the superposition check; MLP sparsity.

`evaluate_dictionary(model, d, tokens)` streams held-out token rows through the
model and reports, over every position after BOS:

1. reconstruction at the dictionary's own sites (captured in the clean pass):
   L0 (mean active features per token), FVU = sum ||y - y_hat||^2 / sum ||y - mean y||^2,
   and the mean cosine between y and y_hat;
2. the model's next-token cross-entropy with the target site replaced by the
   dictionary's output (spliced in through a hook; BOS keeps its activation),
   against zero-ablation and mean-ablation of the same site:
   `CE recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)` (1 = lossless),
   and KL(clean || patched) per token for each patch;
3. feature densities on these tokens: dead (never fired), dense (fired on more than
   `dense_threshold` of tokens) and the log10-density histogram.

`toy_recovery(archs)` trains each variant on the superposition toy and reports
how well it recovers the planted features (mean max cosine).
`mlp_sparsity(model, tokens)` measures the model's own activation sparsity at
its MLP hidden sites: the fraction of non-positive activations, and the
PPL-p% sparsity of "Sparsing Law" (Luo et al. 2024): the largest magnitude
threshold tau such that zeroing every |a| < tau in all MLPs raises perplexity by
at most p%, and the fraction of activations below it.

Results go to DuckDB via `Workspace.write_db` (tables in docs/sae.md).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.dictionary import ARCHS, Dictionary, DictionaryConfig
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

HIST_EDGES = [-10.0] + [x / 2 for x in range(-16, 1)]  # log10 density bins: (-10, -8], ..., (-0.5, 0]


class SpliceMetrics(NamedTuple):
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_mean: float
    ce_recovered_zero: float
    ce_recovered_mean: float
    kl_spliced: float
    kl_zero: float
    kl_mean: float


class EvalResult(NamedTuple):
    dictionary: str
    tokens: int
    l0: float
    fvu: float
    cosine: float
    splice: SpliceMetrics
    dead_fraction: float
    dense_fraction: float
    density: Tensor  # [d_sae] fraction of tokens each feature fired on
    histogram: list[tuple[float, float, int]]  # (log10 lo, log10 hi, features); dead features are not in it


# ====================================================================== one dictionary
@torch.no_grad()
def evaluate_dictionary(model: "TransformerBridge", d: Dictionary, tokens: Tensor, *, batch_size: int = 8,
                        dense_threshold: float = 0.1, progress: bool = False) -> EvalResult:
    """Splice `d` into `model` on token rows [n, ctx] and measure it (see the module docstring)."""
    d = check_sites(model, d)
    device = next(model.parameters()).device
    d = d.to(device).eval()
    target = d.cfg.target_site or d.cfg.site
    mean = _site_mean(model, target, tokens, batch_size)
    acc = _Accumulator(d.cfg.d_sae)
    for rows in _batches(tokens, batch_size, progress, f"eval {d.cfg.name}"):
        rows = rows.to(device)
        clean, x_in, y = _clean_pass(model, rows, d, target)
        out = d(x_in)
        acc.add_reconstruction(y[:, 1:], out.output[:, 1:], out.features[:, 1:])
        ref = F.log_softmax(clean[:, :-1].float(), -1)
        acc.add_ce("clean", ref, rows, ref)
        for kind, hooks in (("spliced", _splice_hooks(d, target)), ("zero", [(target, _ablate(d, 0.0))]),
                            ("mean", [(target, _ablate(d, mean))])):
            logits = model.run_with_hooks(rows, fwd_hooks=hooks)
            acc.add_ce(kind, F.log_softmax(logits[:, :-1].float(), -1), rows, ref)
    return acc.result(d.cfg.name, dense_threshold)


def check_sites(model: "TransformerBridge", d: Dictionary) -> Dictionary:
    """Refuse a dictionary whose sites the model lacks or whose widths do not match them (one line).

    Returns the dictionary, told its site's per-token shape when it did not know it (an
    imported SAELens hook_z SAE), so it can flatten the site's [..., n_heads, d_head] itself.
    """
    from workbench.model import site_info, site_layer

    cfg = d.cfg
    if cfg.site is None:
        raise WorkbenchError(f"dictionary {cfg.name} records no site; it cannot be spliced into a model")
    sites = [cfg.site] + ([cfg.target_site] if not cfg.is_sae else [])
    info = site_info(model, sites)
    width_in = math.prod(cfg.site_shape) if cfg.site_shape else cfg.d_in
    if info[cfg.site].width != width_in:
        raise WorkbenchError(f"dictionary {cfg.name} reads width {width_in} but {model.cfg.model_name}'s {cfg.site} has "
                             f"width {info[cfg.site].width}; it was trained on another model or site")
    if not cfg.is_sae:
        if info[cfg.target_site].width != cfg.d_out:
            raise WorkbenchError(f"dictionary {cfg.name} writes width {cfg.d_out} but {cfg.target_site} has width "
                                 f"{info[cfg.target_site].width}")
        a, b = site_layer(cfg.site), site_layer(cfg.target_site)
        if a is not None and b is not None and a > b:
            raise WorkbenchError(f"transcoder {cfg.name} reads {cfg.site}, downstream of its target {cfg.target_site}")
    shape = info[cfg.site].shape
    if cfg.site_shape is None and len(shape) > 1:
        d = d.with_config(site_shape=shape)
    return d


def _clean_pass(model, rows: Tensor, d: Dictionary, target: str) -> tuple[Tensor, Tensor, Tensor]:
    """Logits of the unpatched model, the dictionary's input [b, pos, d_in] and its target [b, pos, d_out]."""
    store: dict[str, Tensor] = {}

    def grab(key):
        def hook(x, hook):
            store[key] = x
            return x
        return hook

    hooks = [(d.cfg.site, grab("site"))] + ([(target, grab("target"))] if target != d.cfg.site else [])
    logits = model.run_with_hooks(rows, fwd_hooks=hooks)
    x_in = d.site_input(store["site"])
    y = x_in if d.cfg.is_sae else store["target"].flatten(2)
    return logits, x_in, y


def _splice_hooks(d: Dictionary, target: str) -> list:
    """Hooks that replace the target site's activation with the dictionary's output (BOS untouched)."""
    state: dict[str, Tensor] = {}

    def read(x, hook):
        state["x"] = d.site_input(x)
        return x

    def write(y, hook):
        x_in = state.get("x", None)
        if x_in is None:
            x_in = d.site_input(y)
        out = d.write_site(d(x_in).output, y)
        out[:, 0] = y[:, 0]
        return out

    if target == d.cfg.site:
        return [(target, write)]
    return [(d.cfg.site, read), (target, write)]


def _ablate(d: Dictionary, value: float | Tensor):
    """A hook setting the target site to `value` (0, or its mean) after BOS; only the head's slice for a per-head dictionary."""
    def hook(y, hook):
        ablated = torch.zeros_like(y) + (value.to(y.dtype) if isinstance(value, Tensor) else value)
        if d.cfg.head is not None and d.cfg.is_sae:
            out = y.clone()
            out[..., d.cfg.head, :] = ablated[..., d.cfg.head, :]
        else:
            out = ablated
        out[:, 0] = y[:, 0]
        return out

    return hook


def _site_mean(model, site: str, tokens: Tensor, batch_size: int) -> Tensor:
    """Mean activation at `site` over every position after BOS (for mean-ablation)."""
    from workbench.model import stop_layer

    total, count = None, 0
    device = next(model.parameters()).device

    def grab(x, hook):
        nonlocal total, count
        part = x[:, 1:].double().sum((0, 1))
        total = part if total is None else total + part
        count += x.shape[0] * (x.shape[1] - 1)
        return x

    for rows in _batches(tokens, batch_size, False, ""):
        model.run_with_hooks(rows.to(device), fwd_hooks=[(site, grab)], stop_at_layer=stop_layer(model, [site]))
    return (total / max(count, 1)).float()


class _Accumulator:
    """Streaming sums for the reconstruction, CE/KL and density metrics (float64)."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sq_err = self.sq_y = 0.0
        self.sum_y: Tensor | None = None
        self.cos = self.l0 = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.float64)
        self.ce = {k: 0.0 for k in ("clean", "spliced", "zero", "mean")}
        self.kl = {k: 0.0 for k in ("clean", "spliced", "zero", "mean")}
        self.n_pred = 0

    def add_reconstruction(self, y: Tensor, y_hat: Tensor, features: Tensor) -> None:
        y = y.flatten(0, 1).double()  # [tokens, d_out]
        y_hat = y_hat.flatten(0, 1).double()
        self.n += y.shape[0]
        self.sq_err += float((y - y_hat).pow(2).sum())
        self.sq_y += float(y.pow(2).sum())
        s = y.sum(0)
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.cos += float(F.cosine_similarity(y, y_hat, dim=-1).sum())
        active = features.flatten(0, 1) > 0
        self.l0 += float(active.sum())
        self.fired += active.sum(0).double().cpu()

    def add_ce(self, kind: str, logprobs: Tensor, rows: Tensor, ref: Tensor) -> None:
        targets = rows[:, 1:]
        nll = -logprobs.gather(-1, targets[..., None])[..., 0]
        self.ce[kind] += float(nll.double().sum())
        self.kl[kind] += float((ref.exp() * (ref - logprobs)).sum(-1).double().sum())
        if kind == "clean":
            self.n_pred += targets.numel()

    def result(self, name: str, dense_threshold: float) -> EvalResult:
        variance = self.sq_y - float(self.sum_y.pow(2).sum()) / max(self.n, 1)
        ce = {k: v / max(self.n_pred, 1) for k, v in self.ce.items()}
        kl = {k: v / max(self.n_pred, 1) for k, v in self.kl.items()}
        splice = SpliceMetrics(ce["clean"], ce["spliced"], ce["zero"], ce["mean"],
                               _recovered(ce["zero"], ce["spliced"], ce["clean"]),
                               _recovered(ce["mean"], ce["spliced"], ce["clean"]), kl["spliced"], kl["zero"], kl["mean"])
        density = (self.fired / max(self.n, 1)).float()
        return EvalResult(name, self.n, self.l0 / max(self.n, 1), self.sq_err / max(variance, 1e-30), self.cos / max(self.n, 1),
                          splice, float((density == 0).float().mean()), float((density > dense_threshold).float().mean()),
                          density, density_histogram(density))


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else float("nan")


def density_histogram(density: Tensor, edges: list[float] = HIST_EDGES) -> list[tuple[float, float, int]]:
    """Counts of live features per log10(density) bin (lo, hi]; dead features are counted separately."""
    live = density[density > 0].double().log10()
    bins = (torch.bucketize(live, torch.tensor(edges, dtype=torch.float64)) - 1).clamp(0, len(edges) - 2)
    counts = torch.bincount(bins, minlength=len(edges) - 1)
    return [(edges[i], edges[i + 1], int(counts[i])) for i in range(len(edges) - 1)]


def _batches(tokens: Tensor, batch_size: int, progress: bool, desc: str) -> Iterator[Tensor]:
    import sys

    from tqdm import tqdm

    starts = range(0, tokens.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, file=sys.stderr, disable=None if progress else True, leave=False):
        yield tokens[start:start + batch_size]


# ====================================================================== tokens to evaluate on
def eval_tokens(model, *, n_tokens: int = 32_768, context: int = 128, corpus: str = "reference", split: str = "heldout") -> Tensor:
    """Token rows [n, context] (BOS first) from a corpus split the dictionaries were not trained on by default."""
    from data.corpus import documents, token_chunks

    rows = []
    for row in token_chunks(model.tokenizer, documents(corpus, split), context):
        rows.append(row)
        if len(rows) * context >= n_tokens:
            break
    if not rows:
        raise WorkbenchError(f"corpus {corpus!r} ({split}) yields no rows of {context} tokens")
    return torch.tensor(rows, dtype=torch.long)


# ====================================================================== writing results
def write_eval(workspace, model_name: str, result: EvalResult) -> str:
    """Publish one evaluation as `db/eval-<dictionary>.duckdb` (tables dictionary_evals, feature_density_histograms)."""
    import pyarrow as pa

    run = uuid.uuid4().hex[:12]
    s = result.splice
    row = {"dictionary": result.dictionary, "run_id": run, "model": model_name, "tokens": result.tokens, "l0": result.l0,
           "fvu": result.fvu, "explained_variance": 1 - result.fvu, "cosine": result.cosine, **s._asdict(),
           "dead_fraction": result.dead_fraction, "dense_fraction": result.dense_fraction, "created": time.time()}
    hist = [{"dictionary": result.dictionary, "run_id": run, "log10_density_lo": lo, "log10_density_hi": hi, "features": n}
            for lo, hi, n in result.histogram]
    hist.append({"dictionary": result.dictionary, "run_id": run, "log10_density_lo": None, "log10_density_hi": None,
                 "features": int((result.density == 0).sum())})  # the dead features: no finite log density
    with workspace.write_db(f"eval-{result.dictionary}") as con:
        con.register("row_t", pa.Table.from_pylist([row]))
        con.execute("CREATE TABLE dictionary_evals AS SELECT * FROM row_t")
        con.register("hist_t", pa.Table.from_pylist(hist))
        con.execute("CREATE TABLE feature_density_histograms AS SELECT * FROM hist_t")
    return run


# ====================================================================== the superposition check
class ToyRecovery(NamedTuple):
    arch: str
    recovery: float  # mean over true features of the best decoder cosine
    l0: float
    fvu: float
    dead_fraction: float
    tokens: int


def toy_recovery(archs: list[str] | None = None, *, tokens: int = 400_000, batch_size: int = 1024, d_in: int = 32,
                 n_features: int = 64, d_sae: int = 128, k: int = 4, seed: int = 0, progress: bool = False) -> list[ToyRecovery]:
    """Train each variant on the superposition toy and measure how well it recovers the planted features."""
    from sae.toy import Toy, ToyConfig, recovery
    from sae.train import TrainConfig, toy_source, train_dictionaries

    out = []
    for arch in archs or list(ARCHS):
        if arch not in ARCHS:
            raise WorkbenchError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        discrete = arch == "codebook"
        toy = Toy(ToyConfig(d_in=d_in, n_features=n_features, discrete=discrete, k=k if discrete else 2, seed=seed))
        cfg = DictionaryConfig(name=f"toy-{arch}", arch=arch, d_in=d_in, d_sae=n_features if discrete else d_sae, k=k)
        train = TrainConfig(tokens=tokens, batch_size=batch_size, lr=3e-3, seed=seed, device="cpu")
        result = train_dictionaries([cfg], toy_source(toy, batch_size), train, progress=progress)
        d, m = result.dictionaries[0], result.metrics[0]
        out.append(ToyRecovery(arch, recovery(d.W_dec.detach(), toy.features), m.l0, m.fvu, m.dead_fraction, result.tokens))
    return out


def write_toy(workspace, results: list[ToyRecovery]) -> str:
    import pyarrow as pa

    run = uuid.uuid4().hex[:12]
    rows = [{"run_id": run, **r._asdict(), "created": time.time()} for r in results]
    with workspace.write_db(f"toy-recovery-{run}") as con:
        con.register("rows_t", pa.Table.from_pylist(rows))
        con.execute("CREATE TABLE toy_recovery AS SELECT * FROM rows_t")
    return run


# ====================================================================== the model's own MLP sparsity
class MlpSparsity(NamedTuple):
    layer: int
    site: str
    d_mlp: int
    nonpositive_fraction: float  # fraction of activations <= 0 (exact zeros for ReLU models)
    below_threshold_fraction: float  # PPL-p% sparsity: fraction with |a| < threshold
    threshold: float
    mean_active_per_token: float  # neurons with |a| >= threshold per token


@torch.no_grad()
def mlp_sparsity(model: "TransformerBridge", tokens: Tensor, *, p: float = 1.0, batch_size: int = 8, steps: int = 12) -> list[MlpSparsity]:
    """Activation sparsity of every MLP hidden site (`blocks.L.mlp.hook_post`), with the PPL-p% threshold.

    The threshold is found by bisection on log(tau): zeroing |a| < tau in every MLP
    must raise the mean cross-entropy by at most log(1 + p/100) (perplexity by p%).
    """
    device = next(model.parameters()).device
    sites = [f"blocks.{i}.mlp.hook_post" for i in range(model.cfg.n_layers)]
    base = _mean_ce(model, tokens, [], batch_size, device)
    budget = base + math.log1p(p / 100)
    stats = _activation_stats(model, tokens, sites, batch_size, device)
    lo, hi = 1e-6, float(max(s["max"] for s in stats.values()))
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        ce = _mean_ce(model, tokens, [(s, _zero_below(mid)) for s in sites], batch_size, device)
        lo, hi = (mid, hi) if ce <= budget else (lo, mid)
    tau = lo
    below = _activation_stats(model, tokens, sites, batch_size, device, tau)
    return [MlpSparsity(i, s, stats[s]["width"], stats[s]["nonpositive"], below[s]["below"], tau, below[s]["active_per_token"])
            for i, s in enumerate(sites)]


def _zero_below(tau: float):
    def hook(a, hook):
        return a * (a.abs() >= tau)
    return hook


def _mean_ce(model, tokens, hooks, batch_size, device) -> float:
    total, count = 0.0, 0
    for rows in _batches(tokens, batch_size, False, ""):
        rows = rows.to(device)
        logits = model.run_with_hooks(rows, fwd_hooks=hooks)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += rows[:, 1:].numel()
    return total / count


def _activation_stats(model, tokens, sites, batch_size, device, tau: float = 0.0) -> dict:
    """Per site: fraction <= 0, fraction with |a| < tau, max |a|, width and active neurons per token (after BOS)."""
    stats = {s: {"n": 0, "nonpositive": 0.0, "below": 0.0, "max": 0.0, "width": 0, "active": 0.0} for s in sites}

    def make(site):
        def hook(a, hook):
            s, x = stats[site], a[:, 1:].float()
            s["width"] = x.shape[-1]
            s["n"] += x.numel()
            s["nonpositive"] += float((x <= 0).sum())
            s["below"] += float((x.abs() < tau).sum())
            s["active"] += float((x.abs() >= tau).sum())
            s["max"] = max(s["max"], float(x.abs().max()))
            return a
        return hook

    hooks = [(site, make(site)) for site in sites]
    for rows in _batches(tokens, batch_size, False, ""):
        model.run_with_hooks(rows.to(device), fwd_hooks=hooks)
    for s in stats.values():
        n = max(s["n"], 1)
        s["nonpositive"] /= n
        s["below"] /= n
        s["active_per_token"] = s["active"] / max(n / max(s["width"], 1), 1)
    return stats


def write_mlp_sparsity(workspace, model_name: str, rows: list[MlpSparsity], p: float, n_tokens: int) -> None:
    import pyarrow as pa

    data = [{"model": model_name, **r._asdict(), "p_percent": p, "tokens": n_tokens, "created": time.time()} for r in rows]
    with workspace.write_db(f"mlp-sparsity-{_safe(model_name)}") as con:
        con.register("rows_t", pa.Table.from_pylist(data))
        con.execute("CREATE TABLE mlp_sparsity AS SELECT * FROM rows_t")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
