"""Feature tables: the streaming passes against a naive all-in-memory computation and fresh forward passes."""

from __future__ import annotations

import pytest
import torch

from sae.dictionary import Dictionary, DictionaryConfig
from sae.features import FeatureTableConfig, ModelSource, StoreSource, feature_tables, similar_features, write_feature_tables

SITE = "blocks.0.hook_resid_post"
CFG = FeatureTableConfig(n_top=4, n_quantiles=3, n_samples=2, window_before=3, window_after=2, chunk_rows=40, seed=1)


@pytest.fixture(scope="module")
def rows(tiny_model):
    t = torch.randint(0, tiny_model.cfg.d_vocab, (10, 12), generator=torch.Generator().manual_seed(0))
    t[:, 0] = tiny_model.tokenizer.bos_token_id
    return t


@pytest.fixture(scope="module")
def dictionary():
    d = Dictionary(DictionaryConfig(name="f", arch="topk", k=3, d_in=32, d_sae=24, site=SITE), seed=2)
    with torch.no_grad():
        d.b_enc[:4] = -5.0  # four features that never fire
    return d


def _all_features(model, d, rows, site=SITE):
    acts = {}
    model.run_with_hooks(rows, fwd_hooks=[(site, lambda x, hook: acts.setdefault("x", x))])
    return d.encode(d.site_input(acts["x"])).detach()  # [seq, pos, d_sae]


def test_streaming_tables_equal_the_naive_computation(tiny_model, rows, dictionary):
    tables = feature_tables(dictionary, ModelSource(tiny_model, SITE, rows, batch_size=3), CFG, model=tiny_model)
    f = _all_features(tiny_model, dictionary, rows)
    flat = f.flatten(0, 1)
    assert tables.tokens == flat.shape[0]
    by_feature = {r["feature"]: r for r in tables.features}
    for j in range(24):
        col = flat[:, j]
        row = by_feature[j]
        assert row["density"] == pytest.approx(float((col > 0).float().mean()))
        assert row["max_activation"] == pytest.approx(float(col.max().clamp_min(0)))
        if (col > 0).any():
            assert row["mean_activation"] == pytest.approx(float(col[col > 0].mean()), rel=1e-5)
    assert all(by_feature[j]["density"] == 0 for j in range(4))
    top = [e for e in tables.examples if e["kind"] == "top"]
    for j in range(4, 24):
        got = sorted(e["activation"] for e in top if e["feature"] == j)
        want = sorted(flat[:, j][flat[:, j] > 0].topk(min(4, int((flat[:, j] > 0).sum()))).values.tolist())
        assert got == pytest.approx(want)


def test_example_windows_match_a_fresh_forward_pass(tiny_model, rows, dictionary):
    tables = feature_tables(dictionary, ModelSource(tiny_model, SITE, rows, batch_size=3), CFG, model=tiny_model)
    f = _all_features(tiny_model, dictionary, rows)
    assert tables.examples
    for e in tables.examples:
        seq, pos, c = e["seq_id"], e["pos"], e["center"]
        lo = pos - c
        assert e["window_tokens"] == rows[seq, lo:lo + len(e["window_tokens"])].tolist()
        assert e["window_activations"] == pytest.approx(f[seq, lo:lo + len(e["window_tokens"]), e["feature"]].tolist(), abs=1e-6)
        assert e["window_activations"][c] == pytest.approx(e["activation"], abs=1e-6)
        assert c <= CFG.window_before and len(e["window_tokens"]) - c - 1 <= CFG.window_after


def test_quantile_samples_fall_in_their_intervals(tiny_model, rows, dictionary):
    tables = feature_tables(dictionary, ModelSource(tiny_model, SITE, rows, batch_size=3), CFG, model=tiny_model)
    flat = _all_features(tiny_model, dictionary, rows).flatten(0, 1)
    samples = [e for e in tables.examples if e["kind"] == "quantile"]
    for j in range(4, 24):
        col = flat[:, j][flat[:, j] > 0]
        mx = float(col.max())
        for q in range(3):
            inside = ((col / mx * 3).ceil().clamp(1, 3) - 1 == q).sum()
            mine = [e for e in samples if e["feature"] == j and e["quantile"] == q]
            assert len(mine) == min(2, int(inside))
            for e in mine:
                assert q * mx / 3 - 1e-6 <= e["activation"] <= (q + 1) * mx / 3 + 1e-6
            assert sorted(e["rank"] for e in mine) == list(range(len(mine)))


def test_decoder_geometry_columns(tiny_model, rows, dictionary):
    tables = feature_tables(dictionary, ModelSource(tiny_model, SITE, rows), CFG, model=tiny_model)
    w = dictionary.W_dec.detach()
    cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    cos.fill_diagonal_(-2)
    logits = w @ tiny_model.W_U.detach()
    for r in tables.features:
        j = r["feature"]
        assert r["similar_features"] == cos[j].topk(5).indices.tolist()
        assert r["promoted_logits"] == pytest.approx(logits[j].topk(10).values.tolist(), rel=1e-5)
        assert r["suppressed_tokens"] == [tiny_model.tokenizer.decode([t]) for t in (-logits[j]).topk(10).indices.tolist()]
    idx, sims = similar_features(dictionary, 3, chunk=7)  # chunking does not change the answer
    assert idx.tolist() == cos.topk(3, dim=1).indices.tolist()


def test_attention_output_features_write_through_W_O_and_carry_head_shares(tiny_model, rows):
    cfg = tiny_model.cfg
    d = Dictionary(DictionaryConfig(name="z", arch="topk", k=3, d_in=cfg.n_heads * cfg.d_head, d_sae=16,
                                    site="blocks.1.attn.hook_z", site_shape=(cfg.n_heads, cfg.d_head)), seed=3)
    tables = feature_tables(d, ModelSource(tiny_model, d.cfg.site, rows), CFG, model=tiny_model)
    W_O = tiny_model.blocks[1].attn.W_O.detach()  # [head, d_head, d_model]
    direction = torch.einsum("fhd,hdm->fm", d.W_dec.detach().reshape(16, cfg.n_heads, cfg.d_head), W_O)
    logits = direction @ tiny_model.W_U.detach()
    for r in tables.features:
        assert r["promoted_logits"] == pytest.approx(logits[r["feature"]].topk(10).values.tolist(), rel=1e-4)
        assert sum(r["head_attribution"]) == pytest.approx(1.0)


def test_store_and_model_sources_give_the_same_tables(tiny_model, dictionary, workspace):
    from workbench.store import ActivationStore

    store = ActivationStore(workspace)
    store.cache(tiny_model, [SITE], 12 * 16, context=16, progress=False)
    source = StoreSource(store, tiny_model.cfg.model_name, SITE)
    token_rows = store.tokens(tiny_model.cfg.model_name, torch.arange(12))
    from_store = feature_tables(dictionary, source, CFG, model=tiny_model)
    from_model = feature_tables(dictionary, ModelSource(tiny_model, SITE, token_rows, batch_size=4), CFG, model=tiny_model)
    for a, b in zip(from_store.features, from_model.features):
        assert a["density"] == b["density"]
        assert a["max_activation"] == pytest.approx(b["max_activation"], rel=1e-5)
    key = lambda e: (e["feature"], e["kind"], e["seq_id"], e["pos"])  # noqa: E731
    assert sorted(map(key, [e for e in from_store.examples if e["kind"] == "top"])) == \
        sorted(map(key, [e for e in from_model.examples if e["kind"] == "top"]))
    write_feature_tables(workspace, from_store, tiny_model)
    got = workspace.sql("SELECT count(*) AS n, count(DISTINCT feature) AS f FROM features WHERE dictionary = 'f'")
    assert int(got["n"][0]) == 24 and int(got["f"][0]) == 24
    ex = workspace.sql("SELECT window_tokens, window_text, center FROM feature_examples LIMIT 1")
    assert len(ex["window_tokens"][0]) == len(ex["window_text"][0])
