"""SAELens and sparsify layouts: exact round trips, foreign files, and sparsify's own code as the oracle."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import save_file

from sae.dictionary import Dictionary, DictionaryConfig
from sae.interop import export_dictionary, import_dictionary, save_saelens, save_sparsify, sparsify_sites
from workbench.errors import WorkbenchError


def _trained_like(arch, **kw) -> Dictionary:
    cfg = DictionaryConfig(name=f"x-{arch}", arch=arch, d_in=kw.pop("d_in", 12), d_sae=40,
                           k=None if arch in ("relu", "jumprelu") else 3, model="m", site="blocks.1.hook_resid_post", **kw)
    d = Dictionary(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in (d.W_enc, d.W_dec):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        d.b_enc.normal_(0, 0.2, generator=g)
        d.b_dec.normal_(0, 0.2, generator=g)
        if d.threshold is not None:
            d.threshold.uniform_(0.0, 0.3, generator=g)
        if d.W_skip is not None:
            d.W_skip.normal_(0, 0.1, generator=g)
    return d


SAELENS = [("relu", {}), ("topk", {}), ("jumprelu", {}), ("batchtopk", {}), ("feature_choice", {}), ("matryoshka", {}),
           ("relu", dict(target_site="blocks.1.hook_mlp_out", d_out=7, skip=True)),
           ("jumprelu", dict(target_site="blocks.1.hook_mlp_out", d_out=7)),
           ("topk", dict(d_in=12, site_shape=(3, 4)))]


@pytest.mark.parametrize("arch, kw", SAELENS)
def test_saelens_layout_round_trips_exactly(tmp_path, arch, kw):
    d = _trained_like(arch, **kw)
    save_saelens(d, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = Dictionary.load(tmp_path / "s")
    assert back.cfg == d.cfg
    for key, t in d.tensors().items():
        assert torch.equal(back.tensors()[key], t), key
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["d_in"] == d.cfg.d_in and cfg["d_sae"] == 40 and cfg["meta"]["hook_name"] == d.cfg.site
    if d.cfg.n_heads:
        assert cfg["reshape_activations"] == "hook_z"


def _saelens_reference(w: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens's forward written out from its documentation (the oracle for foreign files)."""
    sae_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    arch = cfg.get("architecture", "standard")
    if arch == "jumprelu":
        f = torch.relu(pre) * (pre > w["threshold"])
    elif arch == "topk" or cfg.get("activation_fn_str") == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        v, i = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    else:
        f = torch.relu(pre)
    return f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("cfg", [
    {"architecture": "jumprelu", "d_in": 10, "d_sae": 30, "dtype": "float32", "apply_b_dec_to_input": True,
     "normalize_activations": "none", "meta": {"model_name": "gemma", "hook_name": "blocks.3.hook_resid_post"},
     "sae_lens_version": "6.5.0"},
    {"architecture": "standard", "d_in": 10, "d_sae": 30, "dtype": "torch.float32", "model_name": "gpt2-small",
     "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8, "hook_head_index": None, "activation_fn_str": "topk",
     "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": False, "normalize_activations": "none"},
    {"architecture": "standard", "d_in": 10, "d_sae": 30, "model_name": "gpt2-small", "hook_name": "blocks.0.hook_mlp_out"},
])
def test_foreign_saelens_files_compute_what_saelens_computes(tmp_path, cfg):
    g = torch.Generator().manual_seed(3)
    w = {"W_enc": torch.randn(10, 30, generator=g), "b_enc": torch.randn(30, generator=g) * 0.1,
         "W_dec": torch.randn(30, 10, generator=g), "b_dec": torch.randn(10, generator=g)}
    if cfg["architecture"] == "jumprelu":
        w["threshold"] = torch.rand(30, generator=g) * 0.5
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    d = Dictionary.load(folder)
    x = torch.randn(7, 10, generator=g)
    torch.testing.assert_close(d(x).output, _saelens_reference(w, cfg, x))
    assert d.cfg.site == (cfg.get("meta") or cfg)["hook_name"]


@pytest.mark.parametrize("transcoder", [False, True])
def test_sparsify_reads_what_we_write_and_we_read_what_it_writes(tmp_path, transcoder):
    pytest.importorskip("sparsify", reason="pip install eai-sparsify for this oracle")
    with contextlib.redirect_stdout(io.StringIO()):
        from sparsify import SparseCoder, SparseCoderConfig
    kw = dict(target_site="blocks.1.hook_mlp_out", site="blocks.1.ln2.hook_normalized", skip=True) if transcoder else {}
    d = _trained_like("topk", **{k: v for k, v in kw.items() if k != "site"})
    if transcoder:
        d = d.with_config(site=kw["site"])
    save_sparsify(d, tmp_path / "ours")
    theirs = SparseCoder.load_from_disk(tmp_path / "ours")
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).sae_out, d(x).output, rtol=1e-5, atol=1e-5)
    back = Dictionary.load(tmp_path / "ours")
    assert back.cfg == d.cfg and all(torch.equal(back.tensors()[k], v) for k, v in d.tensors().items())

    native = SparseCoder(12, SparseCoderConfig(num_latents=40, k=5, transcode=transcoder, skip_connection=transcoder))
    with torch.no_grad():
        native.b_dec.normal_(0, 0.3)
        native.encoder.bias.normal_(0, 0.1)
        if transcoder:
            native.W_dec.normal_(0, 0.2)
            native.W_skip.normal_(0, 0.1)
    folder = tmp_path / ("layers.1.mlp" if transcoder else "layers.2")
    native.save_to_disk(folder)
    ours = Dictionary.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).output, native(x).sae_out, rtol=1e-5, atol=1e-5)
    assert (ours.cfg.site, ours.cfg.target_site) == sparsify_sites(folder.name, transcoder)


def test_sparsify_hookpoints_map_to_transformerlens_sites():
    assert sparsify_sites("layers.6", False) == ("blocks.6.hook_resid_post", None)
    assert sparsify_sites("gpt_neox.layers.3.mlp", True) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert sparsify_sites("layers.3.mlp", False) == ("blocks.3.hook_mlp_out", None)
    assert sparsify_sites("embed_tokens", True) == (None, "embed_tokens:output")


def test_import_into_a_workspace_with_site_overrides(tmp_path, workspace):
    d = _trained_like("topk")
    save_sparsify(d, tmp_path / "layers.9")
    imported = import_dictionary(tmp_path / "layers.9", workspace, "brought", site="blocks.0.hook_resid_post", model="tiny")
    from sae.dictionary import load_dictionary

    loaded = load_dictionary(workspace, "brought")
    assert loaded.cfg.name == "brought" and loaded.cfg.site == "blocks.0.hook_resid_post" and loaded.cfg.model == "tiny"
    assert torch.equal(loaded.W_dec, d.W_dec) and loaded.cfg == imported.cfg
    with pytest.raises(WorkbenchError, match="already exists"):
        import_dictionary(tmp_path / "layers.9", workspace, "brought")


@pytest.mark.parametrize("arch, kw, layout, message", [
    ("codebook", {}, "saelens", "SAELens has no layout for a codebook SAE"),
    ("topk", dict(target_site="t", d_out=7), "saelens", "no layout for a topk transcoder.*sparsify"),
    ("jumprelu", {}, "sparsify", "sparsify stores TopK dictionaries only"),
    ("topk", dict(target_site="t", d_out=7), "sparsify", "output width = input width"),
    ("topk", {}, "onnx", "unknown layout 'onnx'"),
])
def test_layouts_refuse_what_they_cannot_hold(tmp_path, arch, kw, layout, message):
    d = _trained_like(arch, **kw)
    with pytest.raises(WorkbenchError, match=message):
        export_dictionary(d, tmp_path / "out", layout)
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_foreign_files_that_cannot_be_honoured_are_refused(tmp_path):
    w = {"W_enc": torch.zeros(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)}
    for name, cfg, message in [
        ("gated", {"architecture": "gated", "d_in": 4, "d_sae": 8}, "architecture 'gated' is not supported"),
        ("norm", {"architecture": "standard", "d_in": 4, "d_sae": 8, "normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ("nothr", {"architecture": "jumprelu", "d_in": 4, "d_sae": 8}, "lack the threshold"),
    ]:
        folder = tmp_path / name
        folder.mkdir()
        save_file(w, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(WorkbenchError, match=message):
            Dictionary.load(folder)
    (tmp_path / "gated" / "sae_weights.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(WorkbenchError, match="truncated or corrupt"):
        Dictionary.load(tmp_path / "gated")
