"""load_model on every promised architecture, offline; bad names fail fast with one line."""

from __future__ import annotations

import time

import pytest
import torch

from tests.tiny import ARCHITECTURES
from workbench.errors import WorkbenchError
from workbench.model import check_sites, load_model, resolve_model_dir, site_info, stop_layer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_loads_and_caches(arch, model_dirs):
    """Boot through the real path, cache residual/MLP/attention sites, and match HF's own next-token distribution."""
    from transformers import AutoModelForCausalLM

    model = load_model(model_dirs[arch], device="cpu")
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z", "blocks.1.hook_resid_pre"]
    infos = site_info(model, sites)
    assert infos["blocks.0.hook_resid_post"].width == model.cfg.d_model
    assert infos["blocks.0.attn.hook_z"].shape == (model.cfg.n_heads, model.cfg.d_head)
    tokens = model.to_tokens("When Mary and John went to the store")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in sites)
    for site in sites:
        assert cache[site].shape[:2] == tokens.shape
        assert torch.isfinite(cache[site]).all()
    # Weight processing shifts logits by a per-position constant only: the distributions must agree with HF.
    hf = AutoModelForCausalLM.from_pretrained(model_dirs[arch], attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(logits.log_softmax(-1), expected, atol=2e-4, rtol=0)


def test_resid_post_equals_next_resid_pre(tiny_model):
    tokens = tiny_model.to_tokens("Friends Alice and Bob")
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"))
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])


def test_stop_layer():
    class Cfg:
        n_layers = 4

    class M:
        cfg = Cfg()

    assert stop_layer(M(), ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]) == 3
    assert stop_layer(M(), ["blocks.3.hook_resid_post"]) is None
    assert stop_layer(M(), ["ln_final.hook_normalized"]) is None
    assert stop_layer(M(), ["hook_embed"]) == 0 or stop_layer(M(), ["hook_embed"]) is not None


def test_unknown_site_lists_valid_ones(tiny_model):
    with pytest.raises(WorkbenchError) as e:
        check_sites(tiny_model, ["blocks.0.hook_resid_post", "blocks.9.hook_nope"])
    message = str(e.value)
    assert "blocks.9.hook_nope" in message and "hook_resid_post" in message and "\n" not in message


def test_attention_pattern_is_not_a_per_token_site(tiny_model):
    with pytest.raises(WorkbenchError, match="not a per-token activation"):
        site_info(tiny_model, ["blocks.0.attn.hook_pattern"])


def test_hub_name_fails_fast_offline(monkeypatch):
    """No hang, no retry loop: a closed endpoint answers at once, and the message says what to do instead."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(WorkbenchError) as e:
        load_model("EleutherAI/pythia-70m-not-cached")
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "local" in message and "directory" in message and "\n" not in message


def test_hub_name_fails_fast_with_real_endpoint(monkeypatch):
    """The default endpoint on a machine with no route out: DNS or connect fails within the probe's timeout."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    start = time.monotonic()
    try:
        resolve_model_dir("gpt2")
    except WorkbenchError as e:
        assert "cannot be reached" in str(e) or "cache" in str(e)
    assert time.monotonic() - start < 15


def test_bad_paths(tmp_path):
    with pytest.raises(WorkbenchError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(WorkbenchError, match="not a directory"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_corrupt_model_dir_is_one_line(tmp_path, model_dirs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dirs["gpt2"], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WorkbenchError) as e:
        load_model(broken)
    assert "\n" not in str(e.value)
