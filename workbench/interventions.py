"""Interventions as values: small frozen records applied together as hooks on named sites.

An intervention says *what* to change at *which* site and *which* token positions; it
holds plain tensors and knows nothing about dictionaries, files or the CLI. `intervene`
turns a list of them into forward hooks on a TransformerBridge for the duration of one
`with` block, and removes every hook on the way out, whatever happens inside:

    with intervene(model, [AddDirection("blocks.1.hook_resid_post", v, coef=4.0)]):
        logits = model(tokens)          # steered
    logits = model(tokens)              # exactly the model as before

The vocabulary (each applied only at the positions its `positions` selects):

1. `AddDirection(site, direction, coef)`: x <- x + coef * direction. The direction is
   any vector of the site's per-token width (a dictionary feature's decoder row, a
   codebook code, a contrastive steering vector), or one vector per explicit index.
2. `ClampFeature(feature, value)`: the delta form x <- x + (value - f(x)) * W_dec[f].
   Only the feature's own contribution moves; the dictionary's reconstruction error
   stays in the model. (Re-encoding and decoding, x <- decode(encode(x) with f := value),
   silently drops the error term, and with it any part of the feature's direction the
   dictionary failed to encode.) For a transcoder f is read at its input site and the
   delta is written at its output site. `ablate_feature` is a clamp to 0.
3. `AblateDirection(site, direction, value=0)`: sets the projection on the unit direction
   to `value` (0 = project it out); `ablate_direction_everywhere` builds one per
   residual-stream write (embeddings, every attention and MLP output).
4. `AblateHead(layer, head)`: zeroes (or mean-ablates) one head's `attn.hook_z`.
5. `Patch(site, source)`: replaces the activation with one cached from another prompt,
   aligned by absolute position.

Positions (`Positions`) are absolute token positions, BOS = 0:
- `ALL`: every position;
- `PROMPT`: positions < prompt length;
- `GENERATED`: the positions whose outputs produce generated tokens, i.e. the last
  prompt token onwards; so the *first* generated token is steered too. On a plain
  forward over prompts (no generation) this is each prompt's last token;
- `at(i, j, ...)`: explicit indices; a negative index counts back from the end of the
  prompt (-1 = its last token).
During KV-cached decoding a forward sees only the new tokens; the generation loop sets
`InterventionState.offset` to the absolute position of the first of them.

Sign conventions: directions are added as given (positive coef moves along +direction);
projections use the unit-normalised direction. Hooks on the same site run in list order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, Union

import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.model import check_sites, site_info, site_layer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Hook = tuple[str, Callable]


# ---------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class Positions:
    """Which token positions an intervention edits: 'all', 'prompt', 'generated' or explicit 'indices'."""

    kind: str = "all"
    indices: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ("all", "prompt", "generated", "indices"):
            raise WorkbenchError(f"unknown positions {self.kind!r}; use all, prompt, generated or a list of indices")
        if self.kind == "indices" and not self.indices:
            raise WorkbenchError("explicit positions need at least one index")
        if self.kind != "indices" and self.indices:
            raise WorkbenchError(f"positions {self.kind!r} take no indices")

    def __str__(self) -> str:
        return ",".join(map(str, self.indices)) if self.kind == "indices" else self.kind

    @classmethod
    def parse(cls, text: str) -> "Positions":
        """'all' | 'prompt' | 'generated' | '3' | '0,5,-1' (the CLI's spelling)."""
        text = text.strip()
        if text in ("all", "prompt", "generated"):
            return cls(text)
        try:
            return at(*(int(t) for t in text.split(",") if t.strip()))
        except ValueError:
            raise WorkbenchError(f"bad positions {text!r}: use all, prompt, generated or comma-separated token indices") from None

    def check(self, prompt_len: int, total_len: int) -> None:
        """Refuse explicit indices that can never fire in a sequence of `total_len` tokens (prompt `prompt_len`)."""
        for i in self.indices:
            absolute = prompt_len + i if i < 0 else i
            if not 0 <= absolute < total_len:
                raise WorkbenchError(
                    f"position {i} is outside the sequence (prompt {prompt_len} tokens, {total_len} with generation)"
                )

    def mask(self, state: "InterventionState", batch: int, n_pos: int, device) -> Tensor | None:
        """[batch, n_pos] bool of the positions to edit in the current forward, or None for all of them."""
        if self.kind == "all" or (state.everywhere and self.kind != "indices"):
            return None
        absolute = state.offset + torch.arange(n_pos, device=device)  # [n_pos]
        prompt_len = state.prompt_lengths(batch, device, default=state.offset + n_pos)  # [batch]
        if self.kind == "prompt":
            return absolute[None, :] < prompt_len[:, None]
        if self.kind == "generated":
            return absolute[None, :] >= prompt_len[:, None] - 1
        return self.index_of(absolute, prompt_len) >= 0

    def index_of(self, absolute: Tensor, prompt_len: Tensor) -> Tensor:
        """[batch, n_pos] long: which entry of `indices` each position is (-1 where none)."""
        which = torch.full((prompt_len.shape[0], absolute.shape[0]), -1, dtype=torch.long, device=absolute.device)
        for k, i in enumerate(self.indices):
            target = prompt_len + i if i < 0 else torch.full_like(prompt_len, i)  # [batch]
            which[absolute[None, :] == target[:, None]] = k
        return which


ALL = Positions("all")
PROMPT = Positions("prompt")
GENERATED = Positions("generated")


def at(*indices: int) -> Positions:
    """Explicit token positions (BOS = 0; negative counts back from the end of the prompt)."""
    return Positions("indices", tuple(int(i) for i in indices))


# ---------------------------------------------------------------------------- features
@dataclass(frozen=True)
class RowEncoder:
    """One ReLU / JumpReLU feature as plain tensors: a = (x - b_pre) . w_enc + b_enc; f = a if a > threshold else 0."""

    w_enc: Tensor  # [d_in]
    b_enc: float = 0.0
    threshold: float = 0.0
    b_pre: Tensor | None = None  # [d_in], subtracted before encoding (some SAEs subtract b_dec)

    def __call__(self, x: Tensor) -> Tensor:  # [..., d_in] -> [...]
        w = self.w_enc.to(x.device, x.dtype)
        if self.b_pre is not None:
            x = x - self.b_pre.to(x.device, x.dtype)
        a = x @ w + self.b_enc
        return a * (a > self.threshold)


@dataclass(frozen=True)
class DictionaryEncoder:
    """Feature `index` of any object with `encode(x[..., d_in]) -> [..., d_sae]` (exact for TopK and every other variant).

    When the dictionary reads one head of a per-head site (`cfg.head`), the site's flat
    activation is sliced to that head first (the dictionary's own `site_input` when it has one).
    """

    dictionary: Any
    index: int

    def __call__(self, x: Tensor) -> Tensor:  # [..., site width] -> [...]
        w = self.dictionary.W_dec
        inputs = x.to(w.device, w.dtype)
        if hasattr(self.dictionary, "site_input"):
            inputs = self.dictionary.site_input(inputs)
        return self.dictionary.encode(inputs)[..., self.index].to(device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class Feature:
    """One dictionary feature: where it reads, where its decoder writes, its decoder row and its encoder.

    `site` is the dictionary's input site; `write_site` equals it for an SAE and is the
    output site for a transcoder. `encoder` maps [..., d_in] activations to this feature's
    activation [...].
    """

    site: str
    write_site: str
    index: int
    w_dec: Tensor  # [d_out]
    encoder: Callable[[Tensor], Tensor]
    d_in: int
    name: str = ""

    @classmethod
    def from_dictionary(cls, dictionary: Any, index: int, name: str = "") -> "Feature":
        """Feature `index` of a dictionary (`encode`, `W_enc`, `W_dec[d_sae, d_out]`, `cfg.site`, `cfg.target_site`).

        A dictionary restricted to one head of a per-head site (`cfg.head`, `cfg.site_shape`)
        reads that head's slice, and an SAE of that kind writes its decoder row into the slice.
        """
        d_sae = dictionary.W_dec.shape[0]
        if isinstance(index, bool) or not isinstance(index, (int,)) or not 0 <= index < d_sae:
            raise WorkbenchError(f"feature index {index} is out of range for a dictionary with {d_sae} features (0..{d_sae - 1})")
        cfg = dictionary.cfg
        site = cfg.site
        write_site = getattr(cfg, "target_site", None) or site
        head, shape = getattr(cfg, "head", None), getattr(cfg, "site_shape", None)
        w_dec = dictionary.W_dec[index].detach()
        d_in = dictionary.W_enc.shape[0]
        if head is not None:
            d_in = math.prod(shape)
            if write_site == site:  # the decoder row lives in the head's slice of the flat site
                full = torch.zeros(shape, dtype=w_dec.dtype, device=w_dec.device)
                full[head] = w_dec
                w_dec = full.reshape(-1)
        label = name or f"{getattr(cfg, 'name', 'dictionary')}:{index}"
        return cls(site, write_site, index, w_dec, DictionaryEncoder(dictionary, index), d_in, label)

    @classmethod
    def from_rows(cls, site: str, w_enc: Tensor, b_enc: float, w_dec: Tensor, *, threshold: float = 0.0,
                  b_pre: Tensor | None = None, write_site: str | None = None, index: int = 0, name: str = "") -> "Feature":
        """A ReLU/JumpReLU feature given as its encoder row, bias, threshold and decoder row."""
        b_enc, threshold = (float(v.detach()) if isinstance(v, Tensor) else float(v) for v in (b_enc, threshold))
        encoder = RowEncoder(w_enc.detach(), b_enc, threshold, None if b_pre is None else b_pre.detach())
        return cls(site, write_site or site, index, w_dec.detach(), encoder, w_enc.numel(), name or f"feature:{index}")

    def activation(self, x: Tensor) -> Tensor:
        """This feature's activation on per-token activations x [..., d_in] -> [...]."""
        return self.encoder(x)


# ---------------------------------------------------------------------------- state
@dataclass
class InterventionState:
    """Mutable state shared by the hooks of one `intervene` block.

    `offset` is the absolute position of the first token of the current forward (0 unless
    decoding with a KV cache); `prompt_len` is the prompt length (an int, a [batch] tensor for
    right-padded batches, or None: the whole input is the prompt). `everywhere` makes
    'prompt'/'generated' positions act on every position (used for side effects on neutral text).
    """

    prompt_len: int | Tensor | None = None
    offset: int = 0
    everywhere: bool = False
    pending: dict = field(default_factory=dict)  # transcoder clamps: feature activations read this forward

    def prompt_lengths(self, batch: int, device, default: int) -> Tensor:
        if self.prompt_len is None:
            return torch.full((batch,), default, dtype=torch.long, device=device)
        if isinstance(self.prompt_len, Tensor):
            lengths = self.prompt_len.to(device=device, dtype=torch.long)
            return lengths.expand(batch) if lengths.numel() == 1 else lengths
        return torch.full((batch,), int(self.prompt_len), dtype=torch.long, device=device)


# ---------------------------------------------------------------------------- the vocabulary
@dataclass(frozen=True)
class AddDirection:
    """x <- x + coef * direction at `positions` of `site`.

    `direction` has the site's per-token shape (or its flat width); with explicit indices it
    may instead hold one vector per index, [len(indices), width] (an input perturbation).
    """

    site: str
    direction: Tensor
    coef: float = 1.0
    positions: Positions = ALL

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def check(self, widths: dict[str, int], shapes: dict[str, tuple]) -> None:
        _check_finite_number(self.coef, "coefficient")
        width = widths[self.site]
        if self.direction.numel() != width and not self._per_index(width):
            n = self.direction.shape[-1] if self.direction.ndim == 2 else self.direction.numel()
            raise WorkbenchError(f"vector of width {n} does not fit site {self.site} (width {width})")
        _check_finite_tensor(self.direction, f"the vector for {self.site}")

    def _per_index(self, width: int) -> bool:
        """One vector per explicit index ([len(indices), width]) rather than one vector for every position."""
        k = len(self.positions.indices)
        return self.positions.kind == "indices" and self.direction.numel() == k * width and self.direction.shape[0] == k

    def hooks(self, state: InterventionState) -> list[Hook]:
        def hook(x: Tensor, hook) -> Tensor:
            flat = x.flatten(2)  # [batch, pos, width]
            d = self.direction.to(x.device, x.dtype)
            if d.numel() != flat.shape[-1] and self._per_index(flat.shape[-1]):
                lengths = state.prompt_lengths(flat.shape[0], x.device, state.offset + flat.shape[1])
                which = self.positions.index_of(_absolute(state, flat), lengths)  # [batch, pos]
                delta = d.reshape(d.shape[0], -1)[which.clamp_min(0)] * (which >= 0)[..., None]  # [batch, pos, width]
                return (flat + self.coef * delta).view_as(x)
            return _masked(x, flat + self.coef * d.reshape(-1), self.positions.mask(state, *flat.shape[:2], x.device))

        return [(self.site, hook)]

    def describe(self) -> dict:
        return dict(kind="add", site=self.site, coef=self.coef, positions=str(self.positions), norm=float(self.direction.norm()))


@dataclass(frozen=True)
class ClampFeature:
    """Set a dictionary feature to `value` by the delta x <- x + (value - f(x)) * W_dec[f] (error term kept).

    For a transcoder (`feature.write_site != feature.site`) f is read at the input site and the
    delta added at the output site, at the same positions.
    """

    feature: Feature
    value: float
    positions: Positions = ALL

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.feature.site, self.feature.write_site)))

    def check(self, widths: dict[str, int], shapes: dict[str, tuple]) -> None:
        _check_finite_number(self.value, "clamp value")
        f = self.feature
        if widths[f.site] != f.d_in:
            raise WorkbenchError(f"feature {f.name} reads width {f.d_in} but site {f.site} has width {widths[f.site]}")
        if widths[f.write_site] != f.w_dec.numel():
            raise WorkbenchError(f"feature {f.name} writes width {f.w_dec.numel()} but site {f.write_site} has width {widths[f.write_site]}")
        read, write = site_layer(f.site), site_layer(f.write_site)
        if f.site != f.write_site and read is not None and write is not None and read > write:
            raise WorkbenchError(f"transcoder feature {f.name} reads {f.site}, which runs after its output site {f.write_site}")

    def hooks(self, state: InterventionState) -> list[Hook]:
        f, key = self.feature, id(self)

        def delta(x: Tensor, acts: Tensor) -> Tensor:  # x [batch, pos, width], acts [batch, pos]
            return x.flatten(2) + (self.value - acts)[..., None] * f.w_dec.to(x.device, x.dtype)

        if f.site == f.write_site:
            def clamp(x: Tensor, hook) -> Tensor:
                acts = f.activation(x.flatten(2))
                return _masked(x, delta(x, acts), self.positions.mask(state, *x.shape[:2], x.device))

            return [(f.site, clamp)]

        def read(x: Tensor, hook) -> Tensor:
            state.pending[key] = f.activation(x.flatten(2))
            return x

        def write(x: Tensor, hook) -> Tensor:
            acts = state.pending.pop(key, None)
            if acts is None or acts.shape != x.shape[:2]:
                raise RuntimeError(f"transcoder clamp: {f.write_site} ran without a fresh read of {f.site}")
            return _masked(x, delta(x, acts), self.positions.mask(state, *x.shape[:2], x.device))

        return [(f.site, read), (f.write_site, write)]

    def describe(self) -> dict:
        f = self.feature
        return dict(kind="clamp", site=f.write_site, read_site=f.site, feature=f.name, index=f.index,
                    value=self.value, positions=str(self.positions))


def ablate_feature(feature: Feature, positions: Positions = ALL) -> ClampFeature:
    """Remove a feature's contribution (a delta clamp to 0): x <- x - f(x) * W_dec[f]."""
    return ClampFeature(feature, 0.0, positions)


@dataclass(frozen=True)
class AblateDirection:
    """Set the projection on a direction (or remove a subspace): x <- x - (x.u - value) u.

    `direction` is one vector [width] (u is it normalised; `value` 0 projects it out) or a
    stack [k, width] spanning a subspace, which is projected out: x <- x - B B^T x with B an
    orthonormal basis of the span (`value` must then be 0).
    """

    site: str
    direction: Tensor
    value: float = 0.0
    positions: Positions = ALL

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def check(self, widths: dict[str, int], shapes: dict[str, tuple]) -> None:
        _check_finite_number(self.value, "projection value")
        width = self.direction.shape[-1] if self.direction.ndim == 2 else self.direction.numel()
        if width != widths[self.site] or self.direction.ndim > 2:
            raise WorkbenchError(f"vector of width {width} does not fit site {self.site} (width {widths[self.site]})")
        _check_finite_tensor(self.direction, f"the direction for {self.site}")
        if self.direction.ndim == 2 and self.direction.shape[0] > 1 and self.value != 0.0:
            raise WorkbenchError("a subspace (several directions) can only be projected out: value must be 0")
        orthonormal_basis(self.direction)  # refuses a zero direction

    def hooks(self, state: InterventionState) -> list[Hook]:
        basis = orthonormal_basis(self.direction)  # [width, k]

        def hook(x: Tensor, hook) -> Tensor:
            flat = x.flatten(2)
            B = basis.to(x.device, x.dtype)
            new = flat - (flat @ B - self.value) @ B.T
            return _masked(x, new, self.positions.mask(state, *flat.shape[:2], x.device))

        return [(self.site, hook)]

    def describe(self) -> dict:
        rank = self.direction.shape[0] if self.direction.ndim == 2 else 1
        return dict(kind="ablate_direction", site=self.site, rank=rank, value=self.value, positions=str(self.positions))


def orthonormal_basis(directions: Tensor) -> Tensor:
    """[width] or [k, width] -> [width, rank] orthonormal basis of their span (rank-revealing QR, float64)."""
    d = directions.detach().double().reshape(-1, directions.shape[-1]).cpu()  # [k, width]
    if float(d.norm()) == 0.0:
        raise WorkbenchError("cannot ablate a zero direction")
    q, r = torch.linalg.qr(d.T)  # q [width, k]
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
    return q[:, keep].float()


@dataclass(frozen=True)
class AblateHead:
    """Zero one attention head's output (its `attn.hook_z` slice), or set it to `mean` [d_head]."""

    layer: int
    head: int
    mean: Tensor | None = None
    positions: Positions = ALL

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.attn.hook_z"

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def check(self, widths: dict[str, int], shapes: dict[str, tuple]) -> None:
        n_heads, d_head = shapes[self.site]
        if not 0 <= self.head < n_heads:
            raise WorkbenchError(f"head {self.head} is out of range: layer {self.layer} has {n_heads} heads (0..{n_heads - 1})")
        if self.mean is not None and self.mean.numel() != d_head:
            raise WorkbenchError(f"mean for head {self.layer}.{self.head} has {self.mean.numel()} values; d_head is {d_head}")

    def hooks(self, state: InterventionState) -> list[Hook]:
        def hook(z: Tensor, hook) -> Tensor:  # [batch, pos, head, d_head]
            new = z.clone()
            new[:, :, self.head] = 0.0 if self.mean is None else self.mean.to(z.device, z.dtype)
            return _masked(z, new.flatten(2), self.positions.mask(state, *z.shape[:2], z.device))

        return [(self.site, hook)]

    def describe(self) -> dict:
        return dict(kind="ablate_head", site=self.site, head=self.head, mean=self.mean is not None, positions=str(self.positions))


@dataclass(frozen=True)
class Patch:
    """Replace the activation at `site` with `source` (cached from another prompt), aligned by absolute position.

    `source` is [pos, *shape] (broadcast over the batch) or [batch, pos, *shape].
    """

    site: str
    source: Tensor
    positions: Positions = ALL

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def check(self, widths: dict[str, int], shapes: dict[str, tuple]) -> None:
        shape = tuple(self.source.shape)
        per_token = shapes[self.site]
        if shape[-len(per_token):] != per_token or len(shape) - len(per_token) not in (1, 2):
            raise WorkbenchError(f"patch source of shape {shape} does not fit site {self.site} ([batch,] pos, {', '.join(map(str, per_token))})")
        _check_finite_tensor(self.source, f"the patch source for {self.site}")

    def hooks(self, state: InterventionState) -> list[Hook]:
        def hook(x: Tensor, hook) -> Tensor:
            batch, n_pos = x.shape[:2]
            source = self.source.to(x.device, x.dtype)
            source = source[None] if source.ndim == x.ndim - 1 else source  # [1 or batch, source_pos, *shape]
            if source.shape[0] not in (1, batch):
                raise WorkbenchError(f"patch source for {self.site} has {source.shape[0]} rows for a batch of {batch}")
            mask = self.positions.mask(state, batch, n_pos, x.device)
            absolute = _absolute(state, x)
            covered = absolute < source.shape[1]  # [n_pos]
            wanted = torch.ones(batch, n_pos, dtype=torch.bool, device=x.device) if mask is None else mask
            if (wanted & ~covered[None]).any():
                raise WorkbenchError(f"patch source for {self.site} has {source.shape[1]} positions; "
                                     f"position {int(absolute[(wanted & ~covered[None]).any(0)].min())} was asked for")
            new = x.clone()
            taken = source[:, absolute[covered]]  # [1 or batch, n_covered, *shape]
            new[:, covered] = taken.expand(batch, *taken.shape[1:])
            return _masked(x, new.flatten(2), mask)

        return [(self.site, hook)]

    def describe(self) -> dict:
        return dict(kind="patch", site=self.site, positions=str(self.positions), source_shape=list(self.source.shape))

    @classmethod
    def from_prompt(cls, model: "TransformerBridge", prompt: str | Tensor, site: str, positions: Positions = ALL) -> "Patch":
        """A patch of `site` with the activations `model` computes on another prompt (text or [1, pos] tokens)."""
        check_sites(model, [site])
        tokens = model.to_tokens(prompt) if isinstance(prompt, str) else prompt
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name == site)
        return cls(site, cache[site][0].detach(), positions)


Intervention = Union[AddDirection, ClampFeature, AblateDirection, AblateHead, Patch]


# ---------------------------------------------------------------------------- applying
@contextlib.contextmanager
def intervene(
    model: "TransformerBridge",
    interventions: Sequence[Intervention],
    *,
    prompt_len: int | Tensor | None = None,
    everywhere: bool = False,
) -> Iterator[InterventionState]:
    """Apply `interventions` as forward hooks for the duration of the block; always remove them.

    Everything is checked before the first hook is added (unknown site, wrong width,
    out-of-range head, non-finite vector), so a bad intervention changes nothing.
    Yields the `InterventionState` (set `.offset` when decoding with a KV cache).
    """
    interventions = list(interventions)
    check_interventions(model, interventions)
    state = InterventionState(prompt_len=prompt_len, everywhere=everywhere)
    hooks = [h for iv in interventions for h in iv.hooks(state)]
    try:
        with model.hooks(fwd_hooks=hooks):
            yield state
    finally:
        state.pending.clear()


def check_interventions(model: "TransformerBridge", interventions: Sequence[Intervention]) -> None:
    """Raise a one-line WorkbenchError for the first intervention that cannot apply to `model`."""
    for iv in interventions:
        if not hasattr(iv, "hooks") or not hasattr(iv, "sites"):
            raise WorkbenchError(f"{type(iv).__name__} is not an intervention")
    sites = list(dict.fromkeys(s for iv in interventions for s in iv.sites))
    if not sites:
        return
    check_sites(model, sites)
    infos = site_info(model, sites)
    widths = {s: i.width for s, i in infos.items()}
    shapes = {s: i.shape for s, i in infos.items()}
    for iv in interventions:
        iv.check(widths, shapes)


def ablate_direction_everywhere(model: "TransformerBridge", direction: Tensor, positions: Positions = ALL) -> list[AblateDirection]:
    """Project `direction` out of every write into the residual stream: the embeddings and each attention and MLP output.

    The residual stream then never holds the direction, at any layer, which is what
    orthogonalising the writing weights makes permanent (`workbench.directions.orthogonalize`).
    The direction is first put in residual coordinates (`residual_direction`); a [k, d_model]
    stack removes the subspace it spans.
    """
    u = residual_direction(model, direction)
    return [AblateDirection(site, u, 0.0, positions) for site in residual_write_sites(model)]


def residual_write_sites(model: "TransformerBridge") -> list[str]:
    """Hook sites whose outputs are summed into the residual stream, in forward order."""
    names = set(model.hook_dict)
    wanted = ["hook_embed", "hook_pos_embed"]
    for layer in range(model.cfg.n_layers):
        wanted += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    present = [s for s in wanted if s in names]
    fired: set[str] = set()

    def seen(site: str):
        def hook(x, hook):
            fired.add(site)
            return x

        return hook

    with torch.no_grad():  # some names exist but never fire (a rotary model's hook_pos_embed)
        model.run_with_hooks(torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device),
                             fwd_hooks=[(s, seen(s)) for s in present])
    return [s for s in present if s in fired]


def residual_direction(model: "TransformerBridge", direction: Tensor) -> Tensor:
    """A unit vector (or, for a [k, d_model] stack, unit rows) in the residual coordinates the model's readers see.

    LayerNorm models centre what they read, and with processed weights (the default of
    `load_model`) every write is centred too, so a residual direction's component along
    the all-ones vector is never present and never read: it is removed here. The centred
    direction is also the one that means the same thing in raw HuggingFace coordinates
    (their residual differs from the processed one only along all-ones), which is what
    lets weight orthogonalisation of the raw weights match a hook-based ablation.
    """
    d = direction.detach().float()
    d = d.reshape(-1) if d.ndim != 2 else d
    if d.shape[-1] != model.cfg.d_model or d.ndim > 2:
        raise WorkbenchError(f"vector of width {d.shape[-1]} is not a residual direction (d_model {model.cfg.d_model})")
    _check_finite_tensor(d, "the direction")
    if centres_residual(model):
        d = d - d.mean(-1, keepdim=True)
    norm = d.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise WorkbenchError("the direction is zero in residual coordinates (a constant vector is invisible to LayerNorm)")
    return (d / norm).to(model.cfg.device)


def centres_residual(model: "TransformerBridge") -> bool:
    """True for LayerNorm models, whose readers ignore the residual's mean."""
    return str(getattr(model.cfg, "normalization_type", "") or "").startswith("LN")


# ---------------------------------------------------------------------------- internals
def _masked(x: Tensor, new_flat: Tensor, mask: Tensor | None) -> Tensor:
    """x with `new_flat` [batch, pos, width] written where mask [batch, pos] is True (everywhere when None)."""
    new = new_flat.view_as(x) if new_flat.shape != x.shape else new_flat
    if mask is None:
        return new
    return torch.where(mask.view(*mask.shape, *([1] * (x.ndim - 2))), new, x)


def _absolute(state: InterventionState, x: Tensor) -> Tensor:
    """[pos] absolute positions of the tokens in the current forward."""
    return state.offset + torch.arange(x.shape[1], device=x.device)


def _check_finite_number(value: float, what: str) -> None:
    try:
        ok = math.isfinite(float(value))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise WorkbenchError(f"{what} must be a finite number, got {value!r}")


def _check_finite_tensor(t: Tensor, what: str) -> None:
    if not torch.isfinite(t.detach()).all():
        raise WorkbenchError(f"{what} holds NaN or infinite values")
