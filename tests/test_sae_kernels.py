"""The sparse training kernels against naive dense references (values and every gradient)."""

from __future__ import annotations

import pytest
import torch

from sae.kernels import (Selection, batch_topk_selection, feature_choice_selection, gather_pre, sparse_decode,
                         threshold_selection, topk_selection)

N, D_IN, D_SAE, D_OUT = 24, 6, 20, 5


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    W_enc = torch.randn(D_IN, D_SAE, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(D_SAE, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(D_SAE, D_OUT, generator=g, dtype=torch.float64, requires_grad=True)
    return x, W_enc, b_enc, W_dec


def _dense_mask(pre, kind):
    """The naive selections, written as dense masks."""
    if kind == "topk":
        return torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(3, dim=1).indices, True)
    if kind == "batchtopk":
        flat = pre.reshape(-1).topk(3 * N).indices
        return torch.zeros(pre.numel(), dtype=torch.bool).scatter(0, flat, True).reshape(pre.shape)
    if kind == "feature_choice":
        return torch.zeros_like(pre, dtype=torch.bool).scatter(0, pre.topk(4, dim=0).indices, True)
    return pre > 0.3


SELECT = {"topk": lambda p: topk_selection(p, 3), "batchtopk": lambda p: batch_topk_selection(p, 3 * N),
          "feature_choice": lambda p: feature_choice_selection(p, 4), "threshold": lambda p: threshold_selection(p, torch.tensor(0.3))}


@pytest.mark.parametrize("kind", list(SELECT))
def test_selection_is_the_dense_mask_in_token_major_order(kind):
    x, W_enc, b_enc, _ = _problem()
    pre = (x @ W_enc + b_enc).detach()
    sel = SELECT[kind](pre)
    mask = _dense_mask(pre, kind)
    got = torch.zeros_like(mask)
    got[sel.rows, sel.cols] = True
    assert torch.equal(got, mask)
    assert torch.equal(sel.rows, torch.sort(sel.rows, stable=True).values)  # CSR: grouped by token
    assert torch.equal(sel.crow.diff(), mask.sum(1))
    torch.testing.assert_close(sel.pre_values, pre[sel.rows, sel.cols], rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(SELECT))
def test_sparse_forward_and_backward_match_dense_autograd(kind):
    x, W_enc, b_enc, W_dec = _problem(1)
    x = x.clone().requires_grad_(True)
    target = torch.randn(N, D_OUT, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pre = (x @ W_enc + b_enc).detach()
    sel = SELECT[kind](pre)
    values = gather_pre(pre, x, W_enc, b_enc, sel).relu()
    loss = (sparse_decode(values, sel, W_dec) - target).pow(2).sum()
    grads = torch.autograd.grad(loss, [x, W_enc, b_enc, W_dec])

    mask = _dense_mask(pre, kind)
    f = (x @ W_enc + b_enc).relu() * mask  # the naive reference: dense features, dense decode
    ref_loss = (f @ W_dec - target).pow(2).sum()
    ref = torch.autograd.grad(ref_loss, [x, W_enc, b_enc, W_dec])
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


def test_transpose_times_is_sparse_transpose_product():
    g = torch.Generator().manual_seed(3)
    crow = torch.tensor([0, 2, 2, 5, 6])
    cols = torch.tensor([4, 1, 0, 4, 2, 3])
    sel = Selection(crow, cols, 5)
    values = torch.randn(6, generator=g, dtype=torch.float64)
    dense = torch.randn(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sel.transpose_times(values, dense), sel.dense(values).T @ dense)


def test_empty_rows_and_unsorted_columns_decode_correctly():
    W = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    sel = Selection(torch.tensor([0, 0, 3, 3, 4]), torch.tensor([6, 0, 2, 5]), 7)
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    out = sparse_decode(v, sel, W)
    ref = sel.dense(v) @ W
    torch.testing.assert_close(out, ref)
    gv, gw = torch.autograd.grad(out.sum(), [v, W])
    rv, rw = torch.autograd.grad(ref.sum(), [v, W])
    torch.testing.assert_close(gv, rv)
    torch.testing.assert_close(gw, rw)


def test_training_loss_gradients_match_a_naive_topk_sae():
    """The trainer's sparse loss (b_dec folded into the encoder bias) against the textbook dense TopK SAE."""
    from sae.dictionary import Dictionary, DictionaryConfig
    from sae.losses import dictionary_loss
    from sae.train import TrainConfig

    d = Dictionary(DictionaryConfig(name="t", arch="topk", d_in=8, d_sae=32, k=4), seed=4)
    with torch.no_grad():
        d.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
        d.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(7))
    dead = torch.zeros(32)
    dead[[3, 9, 17]] = 1.0
    parts = dictionary_loss(d, x, x, TrainConfig(auxk_coef=0.5), dead)
    params = [d.W_enc, d.b_enc, d.W_dec, d.b_dec]
    grads = torch.autograd.grad(parts.total, params)

    pre = (x - d.b_dec) @ d.W_enc + d.b_enc
    values, idx = pre.topk(4, dim=1)
    f = torch.zeros_like(pre).scatter(1, idx, values.relu())
    recon = f @ d.W_dec + d.b_dec
    var = (x - x.mean(0)).pow(2).sum()
    residual = x - recon
    fvu = residual.pow(2).sum() / var
    k_aux = 4  # d_in // 2, three dead features -> all of them, scaled by 3/4
    aux_pre = torch.where(dead.bool(), pre, -torch.inf)
    a_vals, a_idx = aux_pre.topk(3, dim=1)
    f_aux = torch.zeros_like(pre).scatter(1, a_idx, a_vals.relu())
    aux = (3 / k_aux) * (f_aux @ d.W_dec - residual.detach()).pow(2).sum() / var  # no b_dec in the aux decode
    ref = torch.autograd.grad(fvu + 0.5 * aux, params)
    torch.testing.assert_close(parts.fvu, fvu.detach())
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("two_stage", [False, True])
def test_batch_topk_is_exact_when_one_token_owns_most_of_the_budget(two_stage):
    pre = torch.randn(64, 50, generator=torch.Generator().manual_seed(8))
    pre[3] += 100.0  # token 3 wins all its 50 features: the two-stage path must widen its candidates
    sel = batch_topk_selection(pre, 128, two_stage=two_stage)
    ref = pre.reshape(-1).topk(128).indices.sort().values
    assert torch.equal((sel.rows * 50 + sel.cols).sort().values, ref)
    assert int((sel.rows == 3).sum()) == 50


def test_fused_chunked_topk_selects_what_one_big_topk_selects():
    from sae.kernels import fused_topk_selection

    g = torch.Generator().manual_seed(9)
    x, W = torch.randn(50, 7, generator=g), torch.randn(7, 30, generator=g)
    ref = topk_selection(x @ W, 4)
    got = fused_topk_selection(x, W, 4, chunk_rows=16)  # 16 does not divide 50: a short last chunk
    assert torch.equal(got.crow, ref.crow)
    assert torch.equal(torch.sort(got.cols.view(50, 4), 1).values, torch.sort(ref.cols.view(50, 4), 1).values)
    torch.testing.assert_close(got.pre_values.view(50, 4).sort(1).values, ref.pre_values.view(50, 4).sort(1).values)


def test_gather_pre_with_a_subtracted_input_bias_matches_autograd():
    x, W_enc, b_enc, W_dec = _problem(10)
    b_pre = torch.randn(D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    pre = ((x - b_pre) @ W_enc + b_enc).detach()
    sel = topk_selection(pre, 3)
    loss = (sparse_decode(gather_pre(pre, x, W_enc, b_enc, sel, b_pre).relu(), sel, W_dec) ** 2).sum()
    f = ((x - b_pre) @ W_enc + b_enc).relu() * _dense_mask(pre, "topk")
    ref = ((f @ W_dec) ** 2).sum()
    for g, r in zip(torch.autograd.grad(loss, [W_enc, b_enc, b_pre, W_dec]), torch.autograd.grad(ref, [W_enc, b_enc, b_pre, W_dec])):
        torch.testing.assert_close(g, r)
