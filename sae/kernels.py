"""Sparse training kernels: one dense matmul per step, everything else over the active features only.

A TopK-style dictionary activates `nnz = k * batch` of the `batch * d_sae`
feature slots. Only the encoder pre-activations need the dense product
`x @ W_enc`; every other term of the forward and backward pass touches the
active entries alone:

1. select the active (token, feature) pairs from the detached pre-activations
   (`Selection`, a CSR pattern: token n owns entries `crow[n]:crow[n+1]`);
2. `gather_pre`: their values, with a backward that is a gather + scatter over
   the active entries only (encoder weight gradient = one sparse-dense product
   `G^T x` with G the [batch, d_sae] sparse gradient, bias gradient = a bincount);
3. `sparse_decode`: the reconstruction `sum_j v_j W_dec[f_j]` as an
   `embedding_bag`; its backward is a sampled dense-dense product for the
   value gradients (`<W_dec[f], g[n]>` only where (n, f) is active) and a
   sparse-dense product `S^T g` for the decoder gradient.

The feature-sorted transpose of the pattern is shared by both backwards and
built once per `Selection`. Each kernel has a dense reference in
`tests/test_sae_kernels.py`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor



class Selection:
    """The active (token, feature) pairs of a batch, in CSR order (grouped by token).

    crow: [batch + 1] offsets; cols: [nnz] feature index of each entry. The
    feature-sorted transpose (`by_feature`) is computed on first use and cached.
    """

    def __init__(self, crow: Tensor, cols: Tensor, n_features: int, pre_values: Tensor | None = None):
        self.crow = crow
        self.cols = cols
        self.n_features = n_features
        self.pre_values = pre_values  # [nnz] the detached pre-activations at the entries, when the selection saw them
        self._rows: Tensor | None = None
        self._by_feature: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def n_tokens(self) -> int:
        return self.crow.numel() - 1

    @property
    def rows(self) -> Tensor:
        """[nnz] token index of each entry."""
        if self._rows is None:
            counts = self.crow.diff()
            self._rows = torch.repeat_interleave(torch.arange(self.n_tokens, device=self.cols.device), counts)
        return self._rows

    def by_feature(self) -> tuple[Tensor, Tensor, Tensor]:
        """(perm, fcrow, frows): entries sorted by feature, as a CSR of the [d_sae, batch] transpose."""
        if self._by_feature is None:
            perm = _argsort(self.cols)
            counts = torch.bincount(self.cols, minlength=self.n_features)
            fcrow = torch.zeros(self.n_features + 1, dtype=torch.long, device=self.cols.device)
            torch.cumsum(counts, 0, out=fcrow[1:])
            self._by_feature = (perm, fcrow, self.rows[perm])
        return self._by_feature

    def transpose_times(self, values: Tensor, dense: Tensor) -> Tensor:
        """S^T @ dense for S = this pattern filled with `values`: [d_sae, dense.shape[1]]."""
        perm, fcrow, frows = self.by_feature()
        matrix = _csr(fcrow, frows, values[perm].to(dense.dtype), (self.n_features, self.n_tokens))
        out = dense.new_empty(self.n_features, dense.shape[1])
        return torch.addmm(out, matrix, dense, beta=0, out=out)  # beta=0: no zero-fill and no copy of the result

    def dense(self, values: Tensor) -> Tensor:
        """The [batch, d_sae] dense matrix with `values` at the active entries (for tests and small batches)."""
        out = values.new_zeros(self.n_tokens, self.n_features)
        out[self.rows, self.cols] = values
        return out


def topk_selection(pre: Tensor, k: int) -> Selection:
    """The k largest pre-activations of each token (ties broken by torch.topk)."""
    values, idx = pre.topk(k, dim=-1, sorted=False)  # [batch, k]
    n = pre.shape[0]
    crow = torch.arange(0, n * k + 1, k, device=pre.device)
    return Selection(crow, idx.reshape(-1), pre.shape[1], values.reshape(-1))


def fused_topk_selection(x: Tensor, W: Tensor, k: int, chunk_rows: int) -> Selection:
    """`topk_selection(x @ W, k)` without materialising x @ W: rows go through the matmul and the top-k in
    chunks small enough to stay in cache (about 20% faster on CPU than one big product then one big top-k)."""
    n, f = x.shape[0], W.shape[1]
    values = x.new_empty(n, k)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    buf = x.new_empty(min(chunk_rows, n), f)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        part = torch.mm(x[rows], W, out=buf[: rows.stop - rows.start])
        torch.topk(part, k, dim=1, sorted=False, out=(values[rows], idx[rows]))
    crow = torch.arange(0, n * k + 1, k, device=x.device)
    return Selection(crow, idx.reshape(-1), f, values.reshape(-1))


def batch_topk_selection(pre: Tensor, budget: int, two_stage: bool | None = None) -> Selection:
    """The `budget` largest pre-activations over the whole [batch, d_sae] matrix (BatchTopK / Mutual Choice).

    Large matrices go in two exact stages: each token's m = 4 * budget / batch best
    entries are the candidates, and the budget best candidates are the answer unless
    some token had all m of its candidates chosen (it might own more); then m
    doubles and it retries. A flat top-k over batch * d_sae entries is ~2x slower
    there; small matrices (`two_stage=None` decides by size) use it directly.
    """
    n, f = pre.shape
    budget = min(budget, n * f)
    if two_stage is None:
        two_stage = n * f >= 2**20
    if not two_stage:
        values, flat = pre.reshape(-1).topk(budget, sorted=False)
        order = _argsort(flat)
        return _from_flat(flat[order], n, f, values[order])
    m = min(f, max(1, 4 * math.ceil(budget / n)))
    while True:
        cand_vals, cand_idx = pre.topk(m, dim=1, sorted=False)  # [batch, m]
        values, flat = cand_vals.reshape(-1).topk(budget, sorted=False)
        saturated = m < f and bool((torch.bincount(torch.div(flat, m, rounding_mode="floor"), minlength=n) >= m).any())
        if not saturated:
            break
        m = min(f, 2 * m)
    rows = torch.div(flat, m, rounding_mode="floor")
    cols = cand_idx.reshape(-1)[flat]
    key = rows * f + cols
    order = _argsort(key)  # token-major order
    return _from_flat(key[order], n, f, values[order])


def feature_choice_selection(pre: Tensor, capacity: int) -> Selection:
    """Each feature takes the `capacity` tokens of the batch with its largest pre-activations (Feature Choice)."""
    n, f = pre.shape
    m = min(capacity, n)
    values, token_idx = pre.T.contiguous().topk(m, dim=1, sorted=False)  # [d_sae, m]; contiguous rows are ~10x faster
    flat = (token_idx * f + torch.arange(f, device=pre.device)[:, None]).reshape(-1)
    order = _argsort(flat)
    return _from_flat(flat[order], n, f, values.reshape(-1)[order])


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """Entries with pre-activation strictly above `threshold` (scalar or [d_sae])."""
    n, f = pre.shape
    flat = (pre > threshold).reshape(-1).nonzero().squeeze(1)
    return _from_flat(flat, n, f, pre.reshape(-1)[flat])


def gather_pre(pre: Tensor | None, x: Tensor, W_enc: Tensor, b_enc: Tensor, sel: Selection,
               b_pre: Tensor | None = None) -> Tensor:
    """Values of `pre = (x - b_pre) @ W_enc + b_enc` at the selected entries, differentiable in x, W_enc, b_enc, b_pre.

    `pre` is the already computed (detached) product, or None when the selection carries
    its values (`sel.pre_values`); only the gradient is sparse. `b_pre` (an SAE's b_dec,
    subtracted from its input) gets the gradient -W_enc @ dL/db_enc.
    """
    return _GatherPre.apply(pre, x, W_enc, b_enc, sel, b_pre)


def sparse_decode(values: Tensor, sel: Selection, W_dec: Tensor) -> Tensor:
    """sum_j values_j * W_dec[cols_j] per token: [batch, d_out], differentiable in values and W_dec."""
    return _SparseDecode.apply(values, sel, W_dec)


class _GatherPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, x, W_enc, b_enc, sel, b_pre):
        ctx.sel = sel
        ctx.save_for_backward(x, W_enc, b_pre)
        values = sel.pre_values if sel.pre_values is not None else pre.reshape(-1)[sel.rows * sel.n_features + sel.cols]
        return values.to(W_enc.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        sel: Selection = ctx.sel
        x, W_enc, b_pre = ctx.saved_tensors
        grad_x = grad_W = grad_b = grad_b_pre = None
        if ctx.needs_input_grad[1]:  # G @ W_enc^T, G the sparse [batch, d_sae] gradient
            grad_x = torch.nn.functional.embedding_bag(
                sel.cols, W_enc.t().contiguous(), offsets=sel.crow[:-1], per_sample_weights=grad, mode="sum"
            ).to(x.dtype)
        if ctx.needs_input_grad[2]:
            x_in = x.to(grad.dtype) if b_pre is None else x.to(grad.dtype) - b_pre.detach().to(grad.dtype)
            grad_W = sel.transpose_times(grad, x_in).t()  # (G^T x_in)^T: [d_in, d_sae]
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[5]:
            grad_b = torch.bincount(sel.cols, weights=grad, minlength=sel.n_features).to(grad.dtype)
        if ctx.needs_input_grad[5]:
            grad_b_pre = -(W_enc.detach().to(grad.dtype) @ grad_b)
        return None, grad_x, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, grad_b_pre


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, sel, W_dec):
        ctx.sel = sel
        ctx.save_for_backward(values, W_dec)
        return torch.nn.functional.embedding_bag(
            sel.cols, W_dec, offsets=sel.crow[:-1], per_sample_weights=values.to(W_dec.dtype), mode="sum"
        )

    @staticmethod
    def backward(ctx, grad):
        sel: Selection = ctx.sel
        values, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:  # <W_dec[f], g[n]> at the active (n, f) only
            pattern = _csr(sel.crow, sel.cols, grad.new_zeros(sel.cols.numel()), (sel.n_tokens, sel.n_features))
            grad_values = torch.sparse.sampled_addmm(pattern, grad, W_dec.t()).values().to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = sel.transpose_times(values.to(grad.dtype), grad)
        return grad_values, None, grad_W


def _csr(crow: Tensor, cols: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor built without invariant checks (our patterns are valid by construction) or beta warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, values, size=size, check_invariants=False)


def _argsort(keys: Tensor) -> Tensor:
    """Stable argsort of non-negative integer keys; int32 keys take torch's radix path (~40x faster on CPU)."""
    if keys.numel() and int(keys.max()) < 2**31 - 1:
        keys = keys.to(torch.int32)
    return torch.sort(keys, stable=True).indices


def _from_flat(flat: Tensor, n: int, f: int, values: Tensor) -> Selection:
    rows = torch.div(flat, f, rounding_mode="floor")
    cols = flat - rows * f
    crow = torch.zeros(n + 1, dtype=torch.long, device=flat.device)
    torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
    sel = Selection(crow, cols, f, values)
    sel._rows = rows
    return sel
