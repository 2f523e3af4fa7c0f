"""The Dictionary type: one invariant test over every variant, files, folding, heads, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from sae.dictionary import ARCHS, THRESHOLD_ARCHS, Dictionary, DictionaryConfig, load_dictionary
from workbench.errors import WorkbenchError


def _dictionary(arch: str, **kw) -> Dictionary:
    cfg = DictionaryConfig(name=f"d-{arch}", arch=arch, d_in=12, d_sae=40, k=None if arch in ("relu", "jumprelu") else 3, **kw)
    d = Dictionary(cfg, seed=1)
    with torch.no_grad():  # make every term matter
        g = torch.Generator().manual_seed(2)
        if arch != "codebook":
            d.b_enc.normal_(0, 0.2, generator=g)
            d.b_dec.normal_(0, 0.3, generator=g)
        if d.threshold is not None:
            d.threshold.uniform_(0.05, 0.3, generator=g)
        if d.W_skip is not None:
            d.W_skip.normal_(0, 0.1, generator=g)
    return d


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_keeps_the_dictionary_invariants(arch):
    d = _dictionary(arch)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    pre = d.pre_activations(x)
    f = d.encode(x)
    assert f.shape == (2, 5, 40) and pre.shape == (2, 5, 40)
    out = d(x)
    torch.testing.assert_close(out.output, d.decode(f))
    torch.testing.assert_close(out.features, f)
    torch.testing.assert_close(pre, (x - d.b_dec if d.cfg.apply_b_dec_to_input else x) @ d.W_enc + d.b_enc)
    active = (f != 0).sum(-1)
    if arch in ("topk", "codebook"):
        assert bool((active <= 3).all())
    if arch in THRESHOLD_ARCHS:  # a per-token rule: pre above the threshold, value = pre
        torch.testing.assert_close(f, pre * (pre > d.threshold))
    if arch == "codebook":  # decode = the sum of the chosen codes
        codes = d.codes(x)
        torch.testing.assert_close(out.output, d.W_dec[codes].sum(-2) + d.b_dec)
        assert set(f.unique().tolist()) <= {0.0, 1.0}
    assert (f >= 0).all() if arch != "codebook" else True
    one = d.encode(x[0, :1])  # no batch dependence at inference
    torch.testing.assert_close(one, f[0, :1])


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(tmp_path, arch):
    d = _dictionary(arch, site="blocks.0.hook_resid_post", model="m")
    d.save(tmp_path / "d")
    back = Dictionary.load(tmp_path / "d")
    assert back.cfg == d.cfg
    for key, tensor in d.tensors().items():
        assert torch.equal(back.tensors()[key], tensor), key
    if d.threshold is not None:
        assert back.threshold.dtype == torch.float32


def test_threshold_stays_raw_float32_in_a_bfloat16_dictionary(tmp_path):
    from safetensors import safe_open

    d = Dictionary(DictionaryConfig(name="jb", arch="jumprelu", d_in=8, d_sae=16, dtype="bfloat16"))
    with torch.no_grad():
        d.threshold.fill_(0.123456789)
    d.save(tmp_path / "jb")
    with safe_open(str(tmp_path / "jb" / "dictionary.safetensors"), "pt") as f:
        assert f.get_tensor("threshold").dtype == torch.float32
        assert f.get_tensor("W_enc").dtype == torch.bfloat16
        assert float(f.get_tensor("threshold")[0]) == pytest.approx(0.123456789, rel=1e-7)
        assert "log_threshold" not in f.keys()


FOLDED = ["relu", "topk", "jumprelu", "batchtopk", "feature_choice"]


@pytest.mark.parametrize("arch, transcoder", [(a, False) for a in FOLDED + ["codebook"]] + [(a, True) for a in FOLDED])
def test_folding_the_input_scale_preserves_outputs_in_model_units(arch, transcoder):
    """Weights trained on (x * s_in -> y * s_out) fold into weights on raw units with the same predictions."""
    kw = dict(d_out=7, target_site="b", site="a", skip=True) if transcoder else {}
    d = _dictionary(arch, **kw)
    s_in, s_out = 3.7, 0.41 if transcoder else 3.7
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(4)) / s_in
    trained = d(x * s_in)
    folded = d.with_config()
    folded.fold_scale(s_in, s_out)
    got = folded(x)
    torch.testing.assert_close(got.output, trained.output / s_out, rtol=1e-5, atol=1e-5)
    same_support = (got.features != 0) == (trained.features != 0)
    assert bool(same_support.all())
    if arch != "codebook":  # features in model units; decoder rows keep their norms
        torch.testing.assert_close(got.features, trained.features / s_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded.W_dec, d.W_dec)


def test_attention_output_sae_splits_pre_activations_exactly_over_heads():
    d = Dictionary(DictionaryConfig(name="z", arch="topk", k=4, d_in=24, d_sae=30, site="blocks.0.attn.hook_z", site_shape=(3, 8)), seed=5)
    with torch.no_grad():
        d.b_dec.normal_(0, 0.2, generator=torch.Generator().manual_seed(6))
    z = torch.randn(2, 4, 3, 8, generator=torch.Generator().manual_seed(7))
    x = d.site_input(z)
    assert x.shape == (2, 4, 24)
    parts = d.head_contributions(x)
    assert parts.shape == (2, 4, 3, 30)
    torch.testing.assert_close(parts.sum(-2) + d.b_enc, d.pre_activations(x))
    share = d.head_attribution()
    assert share.shape == (30, 3)
    torch.testing.assert_close(share.sum(-1), torch.ones(30))
    with torch.no_grad():  # a feature whose decoder lives in head 1 only is attributed to head 1
        d.W_dec[5] = 0
        d.W_dec[5, 8:16] = 1.0
    assert d.head_attribution()[5].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_single_head_dictionary_reads_and_writes_its_slice():
    d = Dictionary(DictionaryConfig(name="h", arch="codebook", k=2, d_in=8, d_sae=16, site="blocks.0.attn.hook_z",
                                    site_shape=(3, 8), head=1), seed=8)
    z = torch.randn(2, 4, 3, 8, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(d.site_input(z), z[:, :, 1])
    torch.testing.assert_close(d.site_input(z.flatten(2)), z[:, :, 1])
    new = d.write_site(d(d.site_input(z)).output, z)
    torch.testing.assert_close(new[:, :, [0, 2]], z[:, :, [0, 2]])
    torch.testing.assert_close(new[:, :, 1], d(z[:, :, 1]).output)


def test_load_dictionary_from_a_workspace(workspace):
    d = _dictionary("topk")
    d.save(workspace.dictionaries_dir / d.cfg.name)
    assert load_dictionary(workspace, d.cfg.name).cfg == d.cfg
    with pytest.raises(WorkbenchError, match="no dictionary 'nope'.*has d-topk"):
        load_dictionary(workspace, "nope")


@pytest.mark.parametrize("kw, message", [
    (dict(arch="gated"), "unknown architecture 'gated'"),
    (dict(arch="topk", k=50), "k=50 is larger than d_sae=40"),
    (dict(arch="topk", k=None), "needs k >= 1"),
    (dict(arch="matryoshka", k=2, prefixes=(10, 5, 40)), "prefixes .* must increase"),
    (dict(arch="relu", site_shape=(3, 5)), "d_in=12 does not match the site's width 15"),
    (dict(arch="relu", head=3, site_shape=(4, 12)), None),
    (dict(arch="relu", head=4, site_shape=(4, 12)), "head 4 is out of range: the site has 4 heads"),
    (dict(arch="relu", head=0), "head 0 needs a per-head site"),
])
def test_bad_configs_are_refused_in_one_line(kw, message):
    kw = {"k": None, **kw}
    if message is None:
        DictionaryConfig(name="x", d_in=12, d_sae=40, **kw)
        return
    with pytest.raises(WorkbenchError, match=message) as e:
        DictionaryConfig(name="x", d_in=12, d_sae=40, **kw)
    assert "\n" not in str(e.value)


def test_width_mismatch_with_the_site_is_refused():
    d = _dictionary("relu", site="s")
    with pytest.raises(WorkbenchError, match="expects width 12 .* width 16"):
        d.site_input(torch.zeros(3, 16))


def test_missing_truncated_or_corrupt_files_are_refused_and_left_alone(tmp_path):
    d = _dictionary("jumprelu")
    folder = d.save(tmp_path / "d")
    weights = folder / "dictionary.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkbenchError, match="truncated or corrupt"):
        Dictionary.load(folder)
    assert weights.read_bytes() == data[: len(data) // 2]  # nothing rewritten
    weights.unlink()
    with pytest.raises(WorkbenchError, match="is missing"):
        Dictionary.load(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        Dictionary.load(folder)
    cfg = d.cfg.to_json()
    cfg["arch"] = "gated"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(WorkbenchError, match="unknown architecture 'gated'"):
        Dictionary.load(folder)
    with pytest.raises(WorkbenchError, match="no cfg.json"):
        Dictionary.load(tmp_path / "empty")


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    from safetensors.torch import save_file

    d = _dictionary("relu")
    folder = d.save(tmp_path / "d")
    t = d.tensors()
    t["W_dec"] = torch.zeros(40, 13)
    save_file(t, str(folder / "dictionary.safetensors"))
    with pytest.raises(WorkbenchError, match="W_dec has shape \\(40, 13\\), expected \\(40, 12\\)"):
        Dictionary.load(folder)
