"""The superposition toy: activations built from known sparse features, so recovery can be measured.

A toy holds `n_features` unit directions in `d_in` dimensions (more features
than dimensions: superposition). Each sample switches every feature on
independently with probability `p_active`, gives it a magnitude in
[0.5, 1.5), and sums `offset + sum_i a_i * direction_i (+ noise)`.

Variants of the same construction plant other ground truths:
- `d_out > 0`: a transcoder target `y = sum_i a_i * target_direction_i` in another space;
- `n_heads > 0`: each feature lives inside one head's slice of the input (an
  attention-output layout), so its head attribution is known;
- `discrete = True`: exactly `k` features per sample, each with weight 1 (a codebook's world).

`recovery(dictionary, toy)` is the mean over true features of the best cosine
with any learned decoder row (mean max cosine similarity; 1.0 = every true
feature has a learned copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class ToyConfig:
    """A planted sparse-feature world."""

    d_in: int = 32
    """Width of the activations."""
    n_features: int = 64
    """Number of true features (more than d_in: superposition)."""
    p_active: float = 0.04
    """Probability that a feature is on in a sample (ignored when discrete)."""
    d_out: int = 0
    """When > 0, also a transcoder target of this width."""
    n_heads: int = 0
    """When > 0, each feature lives in one of n_heads equal slices of the input."""
    discrete: bool = False
    """Exactly k features per sample, weight 1 each (codebook toy)."""
    k: int = 2
    """Features per sample when discrete."""
    offset: float = 0.5
    """Norm of a constant offset added to every sample (what b_dec must learn)."""
    noise: float = 0.0
    """Std of isotropic Gaussian noise added to each sample."""
    seed: int = 0


class Toy:
    """The planted features of a ToyConfig, and deterministic batches drawn from them."""

    def __init__(self, cfg: ToyConfig):
        if cfg.n_heads and cfg.d_in % cfg.n_heads:
            raise WorkbenchError(f"toy d_in={cfg.d_in} is not divisible into {cfg.n_heads} heads")
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.features = _unit_rows(_directions(cfg, gen))  # [n_features, d_in]
        self.offset = _unit_rows(torch.randn(1, cfg.d_in, generator=gen))[0] * cfg.offset
        self.target_features = _unit_rows(torch.randn(cfg.n_features, cfg.d_out, generator=gen)) if cfg.d_out else None
        self.heads = torch.arange(cfg.n_features) % cfg.n_heads if cfg.n_heads else None

    def batch(self, index: int, batch_size: int) -> Tensor | tuple[Tensor, Tensor]:
        """Batch number `index` (deterministic: a resumed run gets the same data); x or (x, y)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7919 * index + 1)
        coeffs = self._coefficients(batch_size, gen)  # [batch, n_features]
        x = coeffs @ self.features + self.offset
        if self.cfg.noise:
            x = x + self.cfg.noise * torch.randn(x.shape, generator=gen)
        if self.target_features is not None:
            return x, coeffs @ self.target_features
        return x

    def batches(self, batch_size: int, n_batches: int | None = None, start: int = 0) -> Iterator:
        index = start
        while n_batches is None or index < start + n_batches:
            yield self.batch(index, batch_size)
            index += 1

    def _coefficients(self, n: int, gen: torch.Generator) -> Tensor:
        cfg = self.cfg
        if cfg.discrete:
            chosen = torch.rand(n, cfg.n_features, generator=gen).topk(cfg.k, dim=1).indices
            return torch.zeros(n, cfg.n_features).scatter_(1, chosen, 1.0)
        on = torch.rand(n, cfg.n_features, generator=gen) < cfg.p_active
        return on * (0.5 + torch.rand(n, cfg.n_features, generator=gen))


def recovery(learned: Tensor, true: Tensor) -> float:
    """Mean over true features [n, d] of the max cosine with any learned row [m, d]."""
    sims = _unit_rows(true.float()) @ _unit_rows(learned.float()).T
    return float(sims.max(dim=1).values.mean())


def _directions(cfg: ToyConfig, gen: torch.Generator) -> Tensor:
    directions = torch.randn(cfg.n_features, cfg.d_in, generator=gen)
    if cfg.n_heads:
        d_head = cfg.d_in // cfg.n_heads
        mask = torch.zeros(cfg.n_features, cfg.d_in)
        for i in range(cfg.n_features):
            h = i % cfg.n_heads
            mask[i, h * d_head:(h + 1) * d_head] = 1.0
        directions = directions * mask
    return directions


def _unit_rows(m: Tensor) -> Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def expected_l0(cfg: ToyConfig) -> float:
    """Average number of true features on per sample."""
    return float(cfg.k) if cfg.discrete else cfg.p_active * cfg.n_features
