"""Training losses of every variant, on inputs already scaled to a fixed norm.

Reconstruction is always the fraction of variance unexplained
`FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2` (scale free, so one set of
coefficients works at any site). Per variant:

- topk / batchtopk / mutual_choice / feature_choice / matryoshka / codebook run the
  sparse kernels (`sae.kernels`): one dense matmul, everything else over the active
  entries. Matryoshka averages the FVU of each nested prefix of the features.
- relu adds `l1_coef * mean_n sum_i f_ni ||W_dec_i|| / rms(y - mean y)`.
- jumprelu adds `l0_coef * mean_n ||f_n||_0` through a straight-through estimator on
  the raw float32 threshold theta, with a rectangle kernel K of width eps
  (`jumprelu_bandwidth`): d/dtheta of pre * H(pre - theta) is -(theta/eps) K((pre - theta)/eps),
  d/dtheta of H(pre - theta) is -(1/eps) K(...); d/dpre is H(pre - theta) and 0.

Dead features. aux-k (topk, batchtopk, matryoshka): the k_aux = d_out/2 largest
pre-activations among dead features reconstruct the *detached* residual
`e = y - y_hat`, decoded without b_dec (e already contains it), weighted by
min(n_dead / k_aux, 1). aux_zipf (mutual_choice, feature_choice; after
"Adaptive Sparse Allocation with Mutual Choice & Feature Choice SAEs"): the same,
but each feature carries an under-use weight u in [0, 1], how far its density falls
below a Zipf law fitted to the density-rank curve (1 for dead, 0 on the law), and
candidates are ranked by u * pre. With u in {0, 1} it is exactly aux-k. (The paper
names the loss without publishing code; this is our reading, documented in docs/sae.md.)
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from sae.dictionary import K_ARCHS, THRESHOLD_ARCHS, Dictionary
from sae.kernels import (Selection, batch_topk_selection, feature_choice_selection, fused_topk_selection, gather_pre,
                         sparse_decode, topk_selection)

if TYPE_CHECKING:
    from sae.train import TrainConfig

SPARSE_ARCHS = K_ARCHS  # trained through the sparse kernels


class LossParts(NamedTuple):
    total: Tensor
    fvu: Tensor
    aux: Tensor
    l0: Tensor  # mean active features per token
    fired: Tensor  # [d_sae] tokens on which each feature fired in this batch
    threshold_stat: Tensor | None  # batch-level variants: this batch's selection threshold (scalar or [d_sae])


def dictionary_loss(d: Dictionary, x: Tensor, y: Tensor, cfg: "TrainConfig", aux_weights: Tensor | None) -> LossParts:
    """The training loss of `d` on normalised inputs x [batch, d_in] and targets y [batch, d_out].

    `aux_weights` [d_sae] in [0, 1] marks features for the aux loss (None: no aux term).
    """
    if d.cfg.arch in SPARSE_ARCHS:
        return _sparse_loss(d, x, y, cfg, aux_weights)
    return _dense_loss(d, x, y, cfg)


def training_selection(d: Dictionary, pre: Tensor) -> Selection:
    """Which (token, feature) pairs are active in this training batch, per variant."""
    cfg, n = d.cfg, pre.shape[0]
    if cfg.arch in ("topk", "codebook"):
        return topk_selection(pre, cfg.k)
    if cfg.arch == "feature_choice":
        return feature_choice_selection(pre, math.ceil(cfg.k * n / cfg.d_sae))
    return batch_topk_selection(pre, cfg.k * n)  # batchtopk, mutual_choice, matryoshka


def _sparse_loss(d: Dictionary, x: Tensor, y: Tensor, cfg: "TrainConfig", aux_weights: Tensor | None) -> LossParts:
    b_pre = d.b_dec if d.cfg.apply_b_dec_to_input else None  # an SAE encodes x - b_dec
    pre, sel = _select(d, x, b_pre, per_token_fast_path=aux_weights is None)
    if d.cfg.arch == "codebook":
        values = x.new_ones(sel.cols.numel())  # chosen codes enter with weight 1
    else:
        values = gather_pre(pre, x, d.W_enc, d.b_enc, sel, b_pre).relu()
    variance = _variance(y)
    if d.cfg.arch == "matryoshka":
        recon, fvu_terms = _matryoshka_decode(d, values, sel, y, variance)
        recon_loss = torch.stack(fvu_terms).mean()
    else:
        recon = sparse_decode(values, sel, d.W_dec) + d.b_dec
        recon_loss = None
    if d.W_skip is not None:
        recon = recon + x @ d.W_skip
    residual = y - recon
    fvu = residual.pow(2).sum() / variance
    aux = _aux_loss(d, pre, x, b_pre, residual, variance, aux_weights) if aux_weights is not None else fvu.new_zeros(())
    coef = cfg.aux_zipf_coef if d.cfg.arch in ("mutual_choice", "feature_choice") else cfg.auxk_coef
    total = (recon_loss if recon_loss is not None else fvu) + coef * aux
    active = values.detach() > 0
    fired = torch.bincount(sel.cols[active], minlength=d.cfg.d_sae)
    return LossParts(total, fvu.detach(), aux.detach(), active.sum() / x.shape[0], fired, _threshold_stat(d, sel, values))


@torch.no_grad()
def _select(d: Dictionary, x: Tensor, b_pre: Tensor | None, per_token_fast_path: bool) -> tuple[Tensor | None, Selection]:
    """The one dense matmul and the variant's selection; pre [batch, d_sae] is None when the fused path skipped it.

    (x - b_dec) @ W_enc + b_enc = x @ W_enc + bias, and the bias rides along as an extra
    input row, so the product needs no broadcast copy of the bias.
    """
    with _autocast(x):
        bias = d.b_enc - b_pre @ d.W_enc if b_pre is not None else d.b_enc
        x_aug = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        W_aug = torch.cat([d.W_enc, bias[None]], 0)
        if d.cfg.arch in ("topk", "codebook") and per_token_fast_path and x.device.type == "cpu":
            return None, fused_topk_selection(x_aug, W_aug, d.cfg.k, 512 if torch.get_num_threads() == 1 else x.shape[0])
        pre = x_aug @ W_aug
        return pre, training_selection(d, pre)


def _dense_loss(d: Dictionary, x: Tensor, y: Tensor, cfg: "TrainConfig") -> LossParts:
    with _autocast(x):
        pre = d.pre_activations(x)
        if d.cfg.arch == "jumprelu":
            f = _JumpReLU.apply(pre, d.threshold, cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coef * _Step.apply(pre, d.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
        else:  # relu: L1 weighted by decoder norms, divided by the target's rms so it is scale free
            f = torch.relu(pre)
            rms = (_variance(y) / y.shape[0]).sqrt().detach()
            penalty = cfg.l1_coef * (f * d.W_dec.norm(dim=1)).sum(-1).mean() / rms
        recon = d.decode(f)
        if d.W_skip is not None:
            recon = recon + x @ d.W_skip
    residual = y - recon.float()
    fvu = residual.pow(2).sum() / _variance(y)
    active = f.detach() > 0
    zero = fvu.new_zeros(())
    return LossParts(fvu + penalty.float(), fvu.detach(), zero, active.sum(-1).float().mean(), active.sum(0), None)


def _matryoshka_decode(d: Dictionary, values: Tensor, sel: Selection, y: Tensor, variance: Tensor):
    """Reconstructions from each nested prefix of the features; returns the full one and each prefix's FVU."""
    prefixes = torch.tensor(d.cfg.prefixes, device=sel.cols.device)
    band = torch.searchsorted(prefixes, sel.cols, right=True)  # entry belongs to every prefix from `band` on
    recon, fvus = d.b_dec.expand(y.shape[0], -1), []
    for b in range(len(d.cfg.prefixes)):
        mask = band == b
        part = _sub_selection(sel, mask)
        recon = recon + sparse_decode(values[mask], part, d.W_dec)
        fvus.append((y - recon).pow(2).sum() / variance)
    return recon, fvus


def _sub_selection(sel: Selection, mask: Tensor) -> Selection:
    counts = torch.zeros(sel.n_tokens, dtype=torch.long, device=mask.device).index_add_(0, sel.rows, mask.long())
    crow = torch.zeros(sel.n_tokens + 1, dtype=torch.long, device=mask.device)
    torch.cumsum(counts, 0, out=crow[1:])
    part = Selection(crow, sel.cols[mask], sel.n_features)
    part._rows = sel.rows[mask]
    return part


def _aux_loss(d, pre, x, b_pre, residual, variance, weights) -> Tensor:
    """aux-k / aux_zipf: the best-ranked marked features reconstruct the detached residual, without b_dec."""
    n_marked = int((weights > 0).sum())
    nominal = max(1, d.cfg.d_out // 2)
    if n_marked == 0:
        return residual.new_zeros(())
    k_aux = min(nominal, n_marked)
    scores = torch.where(weights > 0, pre * weights.to(pre.dtype), torch.finfo(pre.dtype).min)
    sel = topk_selection(scores, k_aux)
    sel.pre_values = None  # the scores ranked; the values are the real pre-activations
    values = gather_pre(pre, x, d.W_enc, d.b_enc, sel, b_pre).relu()
    predicted = sparse_decode(values, sel, d.W_dec)
    return min(n_marked / nominal, 1.0) * (predicted - residual.detach()).pow(2).sum() / variance


def _threshold_stat(d: Dictionary, sel: Selection, values: Tensor) -> Tensor | None:
    """This batch's selection threshold: the smallest positive selected activation (per feature for feature_choice)."""
    arch = d.cfg.arch
    if arch not in THRESHOLD_ARCHS or arch == "jumprelu":
        return None
    v = values.detach().float()
    big = torch.finfo(torch.float32).max
    if arch == "feature_choice":
        per_feature = torch.full((d.cfg.d_sae,), big, device=v.device).scatter_reduce(
            0, sel.cols, torch.where(v > 0, v, big), reduce="amin")
        return torch.where(per_feature == big, torch.zeros_like(per_feature), per_feature)
    positive = v[v > 0]
    return positive.min() if positive.numel() else v.new_zeros(())


def aux_zipf_weights(density: Tensor, head_fraction: float = 0.5) -> Tensor:
    """Under-use weight in [0, 1] per feature: how far its density falls below a Zipf law fitted to the density-rank curve.

    Densities sorted in decreasing order follow d(r) ~ C r^-alpha over the head of
    the ranking; a log-log least-squares fit on the live features of the top
    `head_fraction` of ranks gives the expected density at each rank. A feature's
    weight is log10(expected / observed) clipped to [0, 1]: one decade below the
    law (or dead) is 1, on or above the law is 0.
    """
    f = density.numel()
    sorted_density, order = density.float().sort(descending=True)
    ranks = torch.arange(1, f + 1, device=density.device, dtype=torch.float32)
    head = (ranks <= max(2, int(f * head_fraction))) & (sorted_density > 0)
    if int(head.sum()) < 2:
        return (density <= 0).float()
    lx, ly = ranks[head].log(), sorted_density[head].log()
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).pow(2).sum().clamp_min(1e-12)
    expected = (ly.mean() + slope * (ranks.log() - lx.mean())).exp()
    gap = torch.log10(expected / sorted_density.clamp_min(1e-12)).clamp(0, 1)
    return torch.empty_like(gap).scatter_(0, order, gap)


class _JumpReLU(torch.autograd.Function):
    """f = pre * H(pre - theta). d/dpre = H(pre - theta); d/dtheta = -(theta/eps) K((pre - theta)/eps), K = 1 on |u| < 1/2."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = (-(threshold / eps) * window * grad).sum(tuple(range(grad.dim() - 1)))
        return (pre > threshold).to(grad.dtype) * grad, grad_threshold.to(threshold.dtype), None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty. d/dpre = 0; d/dtheta = -(1/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = (-(1.0 / eps) * window * grad).sum(tuple(range(grad.dim() - 1)))
        return None, grad_threshold.to(threshold.dtype), None


def _variance(y: Tensor) -> Tensor:
    return (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)


def _autocast(x: Tensor):
    """bf16 autocast on a GPU; nothing on CPU."""
    if x.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
