"""Evaluation against fresh forward passes: splicing, ablations, densities, MLP sparsity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae.dictionary import Dictionary, DictionaryConfig
from sae.evaluate import density_histogram, evaluate_dictionary, mlp_sparsity, write_eval
from workbench.errors import WorkbenchError

RESID = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def rows(tiny_model):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, tiny_model.cfg.d_vocab, (6, 16), generator=g)
    t[:, 0] = tiny_model.tokenizer.bos_token_id
    return t


def _identity(d_model: int, **kw) -> Dictionary:
    """relu(x) - relu(-x) = x: a lossless dictionary, the oracle for the splice."""
    d = Dictionary(DictionaryConfig(name="id", arch="relu", d_in=d_model, d_sae=2 * d_model, **kw))
    with torch.no_grad():
        eye = torch.eye(d_model)
        d.W_enc.copy_(torch.cat([eye, -eye], 1))
        d.W_dec.copy_(torch.cat([eye, -eye], 0))
        d.b_enc.zero_()
        d.b_dec.zero_()
    return d


@torch.no_grad()
def _ce(model, rows, hooks=()):
    logits = model.run_with_hooks(rows, fwd_hooks=list(hooks))
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()))


def test_a_lossless_dictionary_recovers_all_of_the_loss(tiny_model, rows):
    r = evaluate_dictionary(tiny_model, _identity(tiny_model.cfg.d_model, site=RESID), rows, batch_size=4)
    assert r.fvu == pytest.approx(0.0, abs=1e-10) and r.cosine == pytest.approx(1.0)
    assert r.splice.ce_spliced == pytest.approx(r.splice.ce_clean, abs=1e-6)
    assert r.splice.kl_spliced == pytest.approx(0.0, abs=1e-7)
    assert r.splice.ce_recovered_zero == pytest.approx(1.0, abs=1e-5)
    assert r.tokens == 6 * 15 and r.l0 == tiny_model.cfg.d_model  # every position after BOS


def test_ablations_and_splice_match_fresh_forward_passes(tiny_model, rows):
    d = Dictionary(DictionaryConfig(name="tc", arch="topk", k=3, d_in=32, d_sae=48, site="blocks.0.ln2.hook_normalized",
                                    target_site="blocks.0.hook_mlp_out", skip=True), seed=3)
    with torch.no_grad():
        d.W_skip.normal_(0, 0.2, generator=torch.Generator().manual_seed(4))
    r = evaluate_dictionary(tiny_model, d, rows, batch_size=6)
    target = d.cfg.target_site
    clean = _ce(tiny_model, rows)
    stash = {}

    def read(x, hook):
        stash["x"] = x
        return x

    def splice(y, hook):
        out = d(stash["x"]).output.reshape(y.shape).clone()
        out[:, 0] = y[:, 0]  # BOS keeps its activation
        return out

    def zero(y, hook):
        out = torch.zeros_like(y)
        out[:, 0] = y[:, 0]
        return out

    spliced = _ce(tiny_model, rows, [(d.cfg.site, read), (target, splice)])
    zeroed = _ce(tiny_model, rows, [(target, zero)])
    assert r.splice.ce_clean == pytest.approx(clean, abs=1e-5)
    assert r.splice.ce_spliced == pytest.approx(spliced, abs=1e-5)
    assert r.splice.ce_zero == pytest.approx(zeroed, abs=1e-5)
    assert r.splice.ce_recovered_zero == pytest.approx((zeroed - spliced) / (zeroed - clean), rel=1e-3)


def test_attention_output_and_per_head_dictionaries_splice_into_hook_z(tiny_model, rows):
    cfg = tiny_model.cfg
    site = "blocks.1.attn.hook_z"
    whole = _identity(cfg.n_heads * cfg.d_head, site=site, site_shape=(cfg.n_heads, cfg.d_head))
    one = _identity(cfg.d_head, site=site, site_shape=(cfg.n_heads, cfg.d_head), head=2)
    imported = _identity(cfg.n_heads * cfg.d_head, site=site)  # e.g. a SAELens hook_z SAE: no site_shape recorded
    for d in (whole, one, imported):
        r = evaluate_dictionary(tiny_model, d, rows, batch_size=3)
        assert r.splice.kl_spliced == pytest.approx(0.0, abs=1e-7)
        assert r.fvu == pytest.approx(0.0, abs=1e-10)

    def zero_head(z, hook):  # a per-head dictionary is compared with ablating its head only
        z = z.clone()
        z[:, 1:, 2] = 0
        return z

    r = evaluate_dictionary(tiny_model, one, rows, batch_size=3)
    assert r.splice.ce_zero == pytest.approx(_ce(tiny_model, rows, [(site, zero_head)]), abs=1e-5)


def test_densities_dead_and_dense_fractions(tiny_model, rows):
    d = Dictionary(DictionaryConfig(name="t", arch="topk", k=4, d_in=32, d_sae=64, site=RESID), seed=5)
    r = evaluate_dictionary(tiny_model, d, rows, batch_size=6, dense_threshold=0.2)
    acts = {}
    tiny_model.run_with_hooks(rows, fwd_hooks=[(RESID, lambda x, hook: acts.setdefault("x", x))])
    f = d.encode(acts["x"][:, 1:]).flatten(0, 1)
    density = (f > 0).float().mean(0)
    torch.testing.assert_close(r.density, density)
    assert r.dead_fraction == pytest.approx(float((density == 0).float().mean()))
    assert r.dense_fraction == pytest.approx(float((density > 0.2).float().mean()))
    assert sum(n for _, _, n in r.histogram) == int((density > 0).sum())
    assert r.l0 == pytest.approx(4.0)


def test_density_histogram_bins():
    hist = density_histogram(torch.tensor([0.0, 1.2e-3, 0.05, 0.05, 1.0, 1e-12]))
    counts = {(lo, hi): n for lo, hi, n in hist}  # bins are (lo, hi] in log10 density; dead features are not counted
    assert counts[(-3.0, -2.5)] == 1 and counts[(-1.5, -1.0)] == 2 and counts[(-0.5, 0.0)] == 1
    assert counts[(-10.0, -8.0)] == 1 and sum(counts.values()) == 5


def test_width_mismatch_and_missing_sites_are_refused(tiny_model, rows):
    wide = Dictionary(DictionaryConfig(name="w", arch="relu", d_in=48, d_sae=8, site=RESID))
    with pytest.raises(WorkbenchError, match="reads width 48 but .* has width 32"):
        evaluate_dictionary(tiny_model, wide, rows)
    nowhere = Dictionary(DictionaryConfig(name="n", arch="relu", d_in=32, d_sae=8, site="blocks.9.hook_resid_post"))
    with pytest.raises(WorkbenchError, match="unknown site"):
        evaluate_dictionary(tiny_model, nowhere, rows)


def test_eval_tables_are_published(tiny_model, rows, workspace):
    r = evaluate_dictionary(tiny_model, _identity(32, site=RESID), rows, batch_size=6)
    write_eval(workspace, "tiny", r)
    row = workspace.sql("SELECT * FROM dictionary_evals")
    assert row["dictionary"][0] == "id" and row["ce_recovered_zero"][0] == pytest.approx(1.0, abs=1e-5)
    hist = workspace.sql("SELECT sum(features) AS n FROM feature_density_histograms")
    assert int(hist["n"][0]) == 64


def test_mlp_sparsity_counts_and_the_ppl_threshold(tiny_model, rows):
    out = mlp_sparsity(tiny_model, rows, p=0.05, batch_size=6, steps=10)
    acts = {}
    hooks = [(f"blocks.{i}.mlp.hook_post", lambda a, hook, i=i: acts.setdefault(i, a)) for i in range(2)]
    tiny_model.run_with_hooks(rows, fwd_hooks=hooks)
    base = _ce(tiny_model, rows)
    tau = out[0].threshold
    for r in out:
        a = acts[r.layer][:, 1:]
        assert r.nonpositive_fraction == pytest.approx(float((a <= 0).float().mean()))
        assert r.below_threshold_fraction == pytest.approx(float((a.abs() < tau).float().mean()))
    zeroed = [(f"blocks.{i}.mlp.hook_post", lambda a, hook: a * (a.abs() >= tau)) for i in range(2)]
    assert _ce(tiny_model, rows, zeroed) <= base + torch.log1p(torch.tensor(0.0005)).item() + 1e-6
