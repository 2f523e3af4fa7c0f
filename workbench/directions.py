"""Steering directions: where the vectors that `workbench.interventions` adds, clamps and ablates come from.

1. Dictionary features and codebook codes (`feature_vector`, `behaviour_codes`,
   `activate_codes`). As in Codebook Features (Tamkin et al. 2023): find the codes
   (features) that fire on text showing a behaviour far more often than on other text,
   then switch them on during generation. Switching on is a delta clamp to the code's
   typical active value, so the rest of the activation, error term included, is kept.
2. Contrastive vectors from two prompt sets (`contrastive_vectors`), read at each prompt's
   last token (or averaged over its tokens), per site:
   - `mean_diff`: mean(positive) - mean(negative) (contrastive activation addition);
     coefficient 1 moves the negative mean onto the positive mean.
   - `pca`: the first principal direction of the paired differences (top eigenvector of
     E[d d^T], as in representation reading), or of the pooled, centred activations
     when the sets are unpaired; its sign is aligned with, and its length set to, the
     mean difference's projection on it, so coefficients are comparable across methods.
   `layer_sweep` adds each candidate at a fixed coefficient and scores it with a
   caller's metric; the best site is the layer chosen.
3. A direction separating two behaviours (`separating_direction`, Arditi et al. 2024):
   the unit difference of means in residual coordinates. `readability` measures how
   linearly readable the behaviour is (held-out accuracy of a full-width probe and of a
   one-dimensional probe on the direction), `ablate_direction_everywhere` (in
   interventions) removes it from every residual write, `orthogonalize` bakes that into
   the writing weights and saves a new HuggingFace model directory.
4. The reverse (`reroute`, after "Using Mechanistic Interpretability to Craft
   Adversarial Attacks against LLMs", subspace rerouting): optimise a perturbation of
   the input embeddings (an `AddDirection` at `hook_embed`, per position) so that the
   activation at a site moves from one side of the direction's threshold to the other,
   and report the nearest real tokens and whether they cross too.

Shapes: prompts are right-padded token batches with their lengths; activations read out
are [n, width] with the site's per-token shape flattened.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.interventions import (ALL, GENERATED, AddDirection, ClampFeature, Feature, Intervention, Positions,
                                     at, centres_residual, intervene, orthonormal_basis, residual_direction)
from workbench.model import check_sites, resolve_model_dir, stop_layer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

READS = ("last", "mean", "all")


# ---------------------------------------------------------------------------- prompts and activations
class PromptBatch(NamedTuple):
    """Right-padded prompts: tokens [batch, pos] and each prompt's length [batch] (BOS included)."""

    tokens: Tensor
    lengths: Tensor

    @classmethod
    def of(cls, model: "TransformerBridge", prompts: "Prompts") -> "PromptBatch":
        """From a PromptBatch, a list of strings, a TaskPrompts-like (`clean`, `final_pos`) or a [batch, pos] tensor."""
        if isinstance(prompts, PromptBatch):
            return prompts
        if hasattr(prompts, "clean") and hasattr(prompts, "final_pos"):
            return cls(prompts.clean, prompts.final_pos + 1)
        if isinstance(prompts, Tensor):
            tokens = prompts if prompts.ndim == 2 else prompts[None]
            return cls(tokens, torch.full((tokens.shape[0],), tokens.shape[1]))
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise WorkbenchError("prompts must be a non-empty list of non-empty strings")
        rows = [model.to_tokens(t)[0].cpu() for t in texts]
        lengths = torch.tensor([len(r) for r in rows])
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        return cls(tokens, lengths)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def slice(self, index) -> "PromptBatch":
        return PromptBatch(self.tokens[index], self.lengths[index])


Prompts = Any  # PromptBatch | list[str] | TaskPrompts | Tensor


def collect(
    model: "TransformerBridge",
    prompts: Prompts,
    sites: Sequence[str],
    *,
    read: str = "last",
    interventions: Sequence[Intervention] = (),
    batch_size: int = 32,
) -> dict[str, Tensor]:
    """Activations at `sites` on `prompts`: {site: [n, width]} on the CPU, float32.

    `read="last"`: each prompt's last token (one row per prompt); `"mean"`: the mean over
    its tokens after BOS (one row per prompt); `"all"`: every real token after BOS
    (rows concatenated in prompt order). `interventions` are applied while reading.
    """
    if read not in READS:
        raise WorkbenchError(f"unknown read {read!r}; choose one of {', '.join(READS)}")
    sites = list(dict.fromkeys(sites))
    check_sites(model, sites)
    batch = PromptBatch.of(model, prompts)
    out: dict[str, list[Tensor]] = {s: [] for s in sites}
    for start in range(0, len(batch), batch_size):
        part = batch.slice(slice(start, start + batch_size))
        tokens = part.tokens.to(model.cfg.device)
        with torch.no_grad(), intervene(model, interventions, prompt_len=part.lengths):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in sites, stop_at_layer=stop_layer(model, sites))
        for s in sites:
            out[s].append(_read(cache[s].flatten(2).float().cpu(), part.lengths, read))
    return {s: torch.cat(v) for s, v in out.items()}


def _read(acts: Tensor, lengths: Tensor, read: str) -> Tensor:
    """[batch, pos, width] -> rows according to `read` (positions past each length are padding)."""
    batch = torch.arange(acts.shape[0])
    if read == "last":
        return acts[batch, lengths - 1]
    real = torch.arange(acts.shape[1])[None, :] < lengths[:, None]
    real[:, 0] = lengths == 1  # skip BOS unless it is all there is
    if read == "mean":
        return (acts * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    return acts[real]


# ---------------------------------------------------------------------------- steering vectors
@dataclass(frozen=True)
class SteeringVector:
    """A vector to add at `site`: its values [width], how it was made, and a name for tables."""

    site: str
    vector: Tensor
    method: str = "vector"
    name: str = ""

    def add(self, coef: float, positions: Positions = ALL) -> AddDirection:
        return AddDirection(self.site, self.vector, coef, positions)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as safetensors: tensor `vector`, metadata site/method/name (never pickle)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        save_file({"vector": self.vector.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"site": self.site, "method": self.method, "name": self.name})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, site: str | None = None) -> "SteeringVector":
        """Read a vector file: `.safetensors` (tensor `vector` or a single tensor; site in metadata), `.npy`, or `.json` (a list)."""
        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"vector file {path} does not exist")
        meta, vector = _read_vector_file(path)
        site = site or meta.get("site")
        if not site:
            raise WorkbenchError(f"vector file {path.name} names no site; pass --site")
        if vector.ndim != 1:
            vector = vector.reshape(-1)
        return cls(site, vector.float(), meta.get("method", "vector"), meta.get("name") or path.stem)


def _read_vector_file(path: Path) -> tuple[dict, Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                key = "vector" if "vector" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise WorkbenchError(f"{path.name} holds tensors {keys}; expected one named 'vector'")
                return dict(f.metadata() or {}), f.get_tensor(key)
        if path.suffix == ".npy":
            import numpy as np

            return {}, torch.from_numpy(np.load(path, allow_pickle=False)).float()
        if path.suffix == ".json":
            obj = json.loads(path.read_text())
            values = obj.get("vector") if isinstance(obj, dict) else obj
            meta = {k: v for k, v in obj.items() if k != "vector"} if isinstance(obj, dict) else {}
            return meta, torch.tensor(values, dtype=torch.float32)
    except WorkbenchError:
        raise
    except Exception as e:  # a corrupt or foreign file is the input's fault
        raise WorkbenchError(f"cannot read vector file {path}: {' '.join(str(e).split())[:200]}") from e
    raise WorkbenchError(f"vector file {path.name}: use .safetensors, .npy or .json")


def feature_vector(feature: Feature) -> SteeringVector:
    """A feature's decoder row as a steering vector at the site it writes."""
    return SteeringVector(feature.write_site, feature.w_dec.detach().float().cpu(), "feature", feature.name)


class PromotedToken(NamedTuple):
    token: int
    text: str
    score: float  # direct logit effect of one unit of the vector


def promoted_tokens(model: "TransformerBridge", vector: SteeringVector, k: int = 10) -> list[PromotedToken]:
    """Tokens whose logits one unit of a residual-width vector raises most, read straight through the unembedding.

    Direct effect only (the vector times W_U, centred for LayerNorm models, final LayerNorm
    scale ignored): the tokens the vector "promotes" before any later layer reacts to it.
    """
    v = vector.vector.float().to(model.cfg.device).reshape(-1)
    if v.numel() != model.cfg.d_model:
        raise WorkbenchError(f"promoted tokens need a residual-width vector (d_model {model.cfg.d_model}); {vector.site} has width {v.numel()}")
    if centres_residual(model):
        v = v - v.mean()
    with torch.no_grad():
        scores = v @ model.W_U.float()  # [d_vocab]
    top = scores.topk(min(k, scores.numel()))
    return [PromotedToken(int(t), model.tokenizer.decode([int(t)]), float(s)) for s, t in zip(top.values, top.indices)]


def contrastive_vectors(
    model: "TransformerBridge",
    positive: Prompts,
    negative: Prompts,
    sites: Sequence[str],
    *,
    read: str = "last",
    methods: Sequence[str] = ("mean_diff", "pca"),
) -> list[SteeringVector]:
    """One steering vector per (site, method) from two prompt sets; positive minus negative."""
    bad = [m for m in methods if m not in ("mean_diff", "pca")]
    if bad:
        raise WorkbenchError(f"unknown method(s) {', '.join(bad)}; choose mean_diff or pca")
    pos = collect(model, positive, sites, read=read)
    neg = collect(model, negative, sites, read=read)
    vectors = []
    for site in sites:
        diff = pos[site].mean(0) - neg[site].mean(0)
        if "mean_diff" in methods:
            vectors.append(SteeringVector(site, diff, "mean_diff", f"mean_diff@{site}"))
        if "pca" in methods:
            vectors.append(SteeringVector(site, _pc1(pos[site], neg[site], diff), "pca", f"pca@{site}"))
    return vectors


def _pc1(pos: Tensor, neg: Tensor, diff: Tensor) -> Tensor:
    """First principal direction (paired differences if the sets pair up, else pooled centred), scaled to diff's projection."""
    if pos.shape[0] == neg.shape[0]:
        data = pos - neg  # uncentred: top eigenvector of E[d d^T]
    else:
        pooled = torch.cat([pos, neg])
        data = pooled - pooled.mean(0)
    u = torch.linalg.svd(data.double(), full_matrices=False).Vh[0].float()
    along = float(diff @ u)
    return u * along  # sign aligned with the mean difference, length = its projection


class LayerScore(NamedTuple):
    site: str
    method: str
    coef: float
    score: float


def layer_sweep(
    model: "TransformerBridge",
    vectors: Sequence[SteeringVector],
    score: Callable[[list[Intervention]], float],
    *,
    coef: float = 1.0,
    positions: Positions = ALL,
) -> list[LayerScore]:
    """Score each candidate vector added at `coef` (score([]) is the unsteered baseline); best first.

    `score(interventions)` runs whatever measurement the caller cares about (a task metric,
    a target token's probability) with the interventions applied, and returns one number
    where higher means more of the wanted effect.
    """
    rows = [LayerScore(v.site, v.method, coef, float(score([v.add(coef, positions)]))) for v in vectors]
    return sorted(rows, key=lambda r: -r.score)


# ---------------------------------------------------------------------------- separating directions
@dataclass(frozen=True)
class Separation:
    """A unit direction at `site` separating positive from negative prompts, and where each class sits on it."""

    site: str
    direction: Tensor  # [d_model], unit, residual coordinates
    positive_mean: float  # mean projection of the positive class
    negative_mean: float

    @property
    def threshold(self) -> float:
        return (self.positive_mean + self.negative_mean) / 2


def separating_direction(model: "TransformerBridge", positive: Prompts, negative: Prompts, site: str, *,
                         read: str = "last", method: str = "mean_diff") -> Separation:
    """A unit direction at a residual-width `site` separating the two prompt sets, with each class's mean projection.

    `method="mean_diff"`: the difference of class means (Arditi et al.'s refusal direction).
    `method="probe"`: the weight vector of a full-width logistic probe (TransformerLens's
    `fit_sparse_probe` on standardised activations; weights divided by the feature scales
    to return to activation space), signed to point from negative to positive.
    """
    if method not in ("mean_diff", "probe"):
        raise WorkbenchError(f"unknown separation method {method!r}; choose mean_diff or probe")
    pos, neg = collect(model, positive, [site], read=read)[site], collect(model, negative, [site], read=read)[site]
    diff = pos.mean(0) - neg.mean(0)
    raw = diff if method == "mean_diff" else _probe_weights(pos, neg)
    u = residual_direction(model, raw).float().cpu()
    u = u if float(u @ diff) >= 0 else -u
    return Separation(site, u, float((pos @ u).mean()), float((neg @ u).mean()))


def _probe_weights(pos: Tensor, neg: Tensor) -> Tensor:
    from transformer_lens.tools.analysis.sparse_probing import fit_sparse_probe

    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).long()
    probe = fit_sparse_probe(x, y, k=x.shape[1], preprocess="standardize", test_fraction=0.2)
    w = torch.zeros(x.shape[1], dtype=torch.float64)
    w[probe.selected_features] = probe.coefficients / probe.preprocess_scale
    return w.float()


class Readability(NamedTuple):
    """Held-out accuracy of linear probes separating two classes (0.5 = chance for balanced classes)."""

    full: float  # a logistic probe on every coordinate
    direction: float  # a logistic probe on the projection onto the direction alone
    n: int


def readability(positive: Tensor, negative: Tensor, direction: Tensor, *, seed: int = 0) -> Readability:
    """How linearly readable the class is, overall and along `direction`; probes from TransformerLens's sparse probing.

    Both probes use a stratified split fit on the training part only (30% held out) and
    balanced class weights; `full` lets the probe use every coordinate, `direction` gives it
    the single projection onto the unit direction.
    """
    from transformer_lens.tools.analysis.sparse_probing import fit_sparse_probe

    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).long()
    u = (direction / direction.norm()).double().cpu()
    full = fit_sparse_probe(x, y, k=x.shape[1], seed=seed, preprocess="standardize").metrics.accuracy
    # A projection within float32 rounding of zero is zero: after a direction is ablated what is left along it
    # (~1e-7 of the residual's norm) is rounding, which tracks the norm and so the class, and a probe reads it.
    projection = x @ u
    projection[projection.abs() <= 1e-5 * x.norm(dim=-1)] = 0.0
    along = fit_sparse_probe(projection[:, None], y, k=1, seed=seed).metrics.accuracy
    return Readability(float(full), float(along), len(y))


# ---------------------------------------------------------------------------- weight orthogonalisation
# model_type -> (embedding modules, per-layer writing modules), as attribute paths on the HF model
_WRITERS = {
    "gpt2": (["transformer.wte", "transformer.wpe"], "transformer.h", ["attn.c_proj", "mlp.c_proj"]),
    "gpt_neox": (["gpt_neox.embed_in"], "gpt_neox.layers", ["attention.dense", "mlp.dense_4h_to_h"]),
    "llama": (["model.embed_tokens"], "model.layers", ["self_attn.o_proj", "mlp.down_proj"]),
    "qwen2": (["model.embed_tokens"], "model.layers", ["self_attn.o_proj", "mlp.down_proj"]),
    "mistral": (["model.embed_tokens"], "model.layers", ["self_attn.o_proj", "mlp.down_proj"]),
}


def orthogonalize(model: "TransformerBridge", direction: Tensor, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a copy of `model` whose writing weights cannot write `direction`: a permanent direction ablation.

    Every matrix that writes into the residual stream (token and position embeddings,
    attention output and MLP output projections, and their biases) is replaced by
    (I - u u^T) applied on its output side, with u = `residual_direction(model, direction)`.
    The raw HuggingFace weights are edited (read from the model's own directory), the
    unembedding is untied from the embedding first so the logits read the residual as
    before, and the result is saved with the tokenizer as a new directory that
    `load_model` boots. Its behaviour equals `ablate_direction_everywhere` on the original.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(getattr(model, "workbench_dir", None) or resolve_model_dir(model.cfg.model_name))
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise WorkbenchError(f"{out} already exists and is not empty; choose another directory or pass overwrite")
    model_type = AutoConfig.from_pretrained(src).model_type
    if model_type not in _WRITERS:
        raise WorkbenchError(f"weight orthogonalisation supports {', '.join(_WRITERS)} models, not {model_type!r} "
                             "(its residual writes pass through norms or are not plain linear maps); use the hook ablation")
    basis = orthonormal_basis(residual_direction(model, direction)).double()  # [d_model, k]
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    _untie_unembedding(hf)
    with torch.no_grad():
        for module in _writing_modules(hf, model_type):
            _project_out(module, basis)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    hf.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    (tmp / "workbench_orthogonalized.json").write_text(json.dumps(
        {"source": str(src), "basis": basis.T.float().tolist(), "centred": centres_residual(model)}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _writing_modules(hf, model_type: str) -> list[torch.nn.Module]:
    embeds, layers_path, per_layer = _WRITERS[model_type]
    modules = [hf.get_submodule(p) for p in embeds if _has_submodule(hf, p)]
    for layer in hf.get_submodule(layers_path):
        modules += [layer.get_submodule(p) for p in per_layer]
    return modules


def _has_submodule(module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _project_out(module: torch.nn.Module, basis: Tensor) -> None:
    """Apply I - B B^T on the output side of an Embedding [n, d], Linear [d, in] or GPT-2 Conv1D [in, d] (and its bias)."""
    w = module.weight
    B = basis.to(w.device, torch.float64)  # [d, k]
    W = w.data.double()
    if type(module).__name__ == "Conv1D" or isinstance(module, torch.nn.Embedding):  # rows are written vectors: x @ W
        W = W - (W @ B) @ B.T
    elif isinstance(module, torch.nn.Linear):  # y = x @ W.T + b, W [out, in]
        W = W - B @ (B.T @ W)
    else:
        raise WorkbenchError(f"cannot orthogonalise a {type(module).__name__} module")
    w.data.copy_(W.to(w.dtype))
    bias = getattr(module, "bias", None)
    if bias is not None:
        b = bias.data.double()
        bias.data.copy_((b - B @ (B.T @ b)).to(bias.dtype))


def _untie_unembedding(hf) -> None:
    out = hf.get_output_embeddings()
    if out is None:
        return
    if out.weight is hf.get_input_embeddings().weight or getattr(hf.config, "tie_word_embeddings", False):
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
        hf.config.tie_word_embeddings = False
        if hasattr(hf.config, "get_text_config"):
            hf.config.get_text_config().tie_word_embeddings = False


# ---------------------------------------------------------------------------- subspace rerouting
@dataclass(frozen=True)
class Reroute:
    """The outcome of `reroute`: an input-embedding perturbation and where it moved the activation."""

    site: str
    positions: tuple[int, ...]  # perturbed token positions
    delta: Tensor  # [len(positions), d_model], added at hook_embed
    start: float  # projection on the direction at the read position, before
    end: float  # after the perturbation
    target: float
    threshold: float
    crossed: bool  # the projection ended on the other side of the threshold
    relative_norm: float  # ||delta|| / ||embeddings at those positions||
    steps: int
    nearest_tokens: tuple[int, ...]  # the real token nearest each perturbed embedding
    discrete_end: float  # projection when those tokens are used instead
    losses: tuple[float, ...] = field(default=(), repr=False)

    @property
    def discrete_crossed(self) -> bool:
        return (self.discrete_end - self.threshold) * (self.start - self.threshold) < 0

    def intervention(self) -> AddDirection:
        """The perturbation as an intervention (an AddDirection at hook_embed, one vector per position)."""
        return AddDirection("hook_embed", self.delta, 1.0, at(*self.positions))


def reroute(
    model: "TransformerBridge",
    prompt: str | Tensor,
    separation: Separation,
    *,
    target: float | None = None,
    positions: Sequence[int] | None = None,
    steps: int = 150,
    lr: float = 0.05,
    l2: float = 0.01,
) -> Reroute:
    """Optimise an embedding perturbation that moves the last token's activation across the separation.

    The loss is ((p - target) / gap)^2 + l2 * (||delta|| / ||e||)^2, where p is the projection
    on the unit direction at `separation.site` and the prompt's last token, `target` defaults
    to the mean of the class on the other side, gap = |start - target|, and e are the clean
    embeddings at the perturbed positions (default: every position after BOS). Adam on delta
    (parametrised in units of the embeddings' per-coordinate rms, so a step moves each
    position by about lr x its embedding norm) from zero; stops once p is within 5% of the
    gap from the target. Deterministic.
    """
    if steps < 1:
        raise WorkbenchError(f"reroute needs at least one step, got {steps}")
    tokens = (model.to_tokens(prompt) if isinstance(prompt, str) else prompt).to(model.cfg.device)
    n = tokens.shape[1]
    positions = tuple(range(1, n) if positions is None else positions)
    Positions("indices", positions).check(n, n)
    u = separation.direction.to(model.cfg.device)
    embeds = _embeddings(model, tokens)[0, list(positions)]  # [k, d_model]
    start = _projection(model, tokens, separation.site, u, ())
    if target is None:
        target = separation.negative_mean if start > separation.threshold else separation.positive_mean
    delta, step, losses = _descend(model, tokens, separation.site, u, positions, embeds, start, float(target), steps, lr, l2)
    end = _projection(model, tokens, separation.site, u, [AddDirection("hook_embed", delta, 1.0, at(*positions))])
    nearest = _nearest_tokens(model, embeds + delta)
    swapped = tokens.clone()
    swapped[0, list(positions)] = torch.tensor(nearest, device=tokens.device)
    discrete = _projection(model, swapped, separation.site, u, ())
    crossed = (end - separation.threshold) * (start - separation.threshold) < 0
    return Reroute(separation.site, positions, delta.cpu(), start, end, float(target), separation.threshold, bool(crossed),
                   float(delta.norm() / embeds.norm()), step, tuple(nearest), discrete, tuple(losses))


def _descend(model, tokens, site, u, positions, embeds, start, target, steps, lr, l2) -> tuple[Tensor, int, list[float]]:
    """Adam on the perturbation until the projection is within 5% of the gap from the target; (delta, steps, losses)."""
    scale = float(embeds.norm(dim=-1).mean()) / math.sqrt(model.cfg.d_model)  # per-coordinate rms: Adam moves each ~lr
    gap = max(abs(start - target), 1e-6)
    z = torch.zeros(len(positions), model.cfg.d_model, device=model.cfg.device, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    losses: list[float] = []
    step = 0
    while step < steps:
        p = _projection(model, tokens, site, u, [AddDirection("hook_embed", z * scale, 1.0, at(*positions))], grad=True)
        loss = ((p - target) / gap) ** 2 + l2 * (z.norm() * scale / embeds.norm()) ** 2
        losses.append(float(loss.detach()))
        if abs(float(p.detach()) - target) < 0.05 * gap:
            break  # close enough: keep this delta
        (z.grad,) = torch.autograd.grad(loss, [z])  # gradients for z only: the model's parameters get no .grad
        opt.step()
        step += 1
    return z.detach() * scale, step, losses


def _embeddings(model: "TransformerBridge", tokens: Tensor) -> Tensor:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "hook_embed", stop_at_layer=0)
    return cache["hook_embed"].detach()


def _projection(model, tokens: Tensor, site: str, u: Tensor, interventions, grad: bool = False):
    """Projection on u of `site` at the last token, with interventions; a tensor when grad, else a float."""
    seen: list[Tensor] = []

    def grab(x, hook):
        seen.append(x[0, -1].flatten())
        return x

    with torch.set_grad_enabled(grad), intervene(model, interventions), model.hooks(fwd_hooks=[(site, grab)]):
        model(tokens, stop_at_layer=stop_layer(model, [site]))
    p = seen[0] @ u.to(seen[0].dtype)
    return p if grad else float(p)


def _nearest_tokens(model: "TransformerBridge", vectors: Tensor) -> list[int]:
    """The vocabulary token whose embedding (as hook_embed sees it) is nearest each row, by Euclidean distance."""
    with torch.no_grad():
        W_E = model.W_E.float()  # [d_vocab, d_model]
        d = torch.cdist(vectors.float(), W_E)
    return [int(i) for i in d.argmin(-1)]


# ---------------------------------------------------------------------------- codebook-style codes
class CodeScore(NamedTuple):
    index: int
    freq_behaviour: float  # fraction of behaviour tokens on which the code fires
    freq_other: float
    mean_active: float  # the code's mean value where it fires on behaviour tokens
    score: float  # freq_behaviour - freq_other


def behaviour_codes(model: "TransformerBridge", dictionary: Any, behaviour: Prompts, other: Prompts, *, top: int = 5) -> list[CodeScore]:
    """The dictionary's features (codes) that fire most selectively on tokens of the behaviour prompts.

    Reads every token after BOS at the dictionary's input site, encodes, and ranks features
    by firing frequency on behaviour tokens minus frequency on other tokens.
    """
    site = dictionary.cfg.site
    w = dictionary.W_dec
    with torch.no_grad():
        fb = dictionary.encode(collect(model, behaviour, [site], read="all")[site].to(w.device, w.dtype)).float().cpu()
        fo = dictionary.encode(collect(model, other, [site], read="all")[site].to(w.device, w.dtype)).float().cpu()
    freq_b, freq_o = (fb > 0).float().mean(0), (fo > 0).float().mean(0)
    active_sum = (fb * (fb > 0)).sum(0)
    mean_active = active_sum / (fb > 0).sum(0).clamp_min(1)
    score = freq_b - freq_o
    order = score.argsort(descending=True)[:top]
    return [CodeScore(int(i), float(freq_b[i]), float(freq_o[i]), float(mean_active[i]), float(score[i])) for i in order]


def activate_codes(dictionary: Any, codes: Sequence[CodeScore], *, positions: Positions = GENERATED, scale: float = 1.0) -> list[ClampFeature]:
    """Switch codes on (delta clamp to `scale` x their mean active value), by default from the first generated token on."""
    name = getattr(dictionary.cfg, "name", "dictionary")
    return [ClampFeature(Feature.from_dictionary(dictionary, c.index, f"{name}:{c.index}"), scale * c.mean_active, positions) for c in codes]
