"""The train / eval / features commands end to end on a tiny model, their one-line errors, and a killed run resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
RESID = "blocks.0.hook_resid_post"
SITES = [RESID, "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, model_dirs):
    """A workspace whose store holds the tiny GPT-2's activations at four sites."""
    from workbench.model import load_model
    from workbench.store import ActivationStore

    ws = tmp_path_factory.mktemp("cli") / "ws"
    model = load_model(model_dirs["gpt2"], device="cpu")
    ActivationStore(ws).cache(model, SITES, 24_576, context=64, progress=False)
    return ws, str(model_dirs["gpt2"])


def _json(capsys, argv) -> dict:
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def _error(capsys, argv) -> str:
    """The single `error:` line the CLI printed (model loading may print its own progress bar before it)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and err.rstrip().endswith(lines[0])
    return lines[0]


def test_train_eval_features_end_to_end(cached, capsys):
    ws, model = cached
    base = ["--workspace", str(ws), "--model", model]
    out = _json(capsys, ["train", *base, "--site", RESID, "--arch", "topk,jumprelu", "--d-sae", "64", "--k", "4",
                         "--tokens", "20000", "--batch-size", "512", "--name", "r"])
    names = [d["name"] for d in out["dictionaries"]]
    assert names == ["r-topk-64-k4", "r-jumprelu-64-k4"] and out["steps"] == 40
    tc = _json(capsys, ["train", *base, "--site", "blocks.0.ln2.hook_normalized", "--target", "blocks.0.hook_mlp_out",
                        "--arch", "topk", "--skip", "--d-sae", "64", "--k", "4", "--tokens", "20000", "--batch-size", "512"])
    assert tc["dictionaries"][0]["target_site"] == "blocks.0.hook_mlp_out"
    heads = _json(capsys, ["train", *base, "--site", "blocks.1.attn.hook_z", "--arch", "codebook", "--heads", "all",
                           "--d-sae", "16", "--k", "2", "--tokens", "10000", "--batch-size", "512"])
    assert [d["head"] for d in heads["dictionaries"]] == [0, 1, 2, 3]

    evaluated = _json(capsys, ["eval", *base, "--dictionary", f"r-topk-64-k4,{tc['dictionaries'][0]['name']}",
                               "--tokens", "2048", "--context", "64"])
    for row in evaluated["dictionaries"]:
        assert row["l0"] == pytest.approx(4.0) and 0 <= row["fvu"] < 1
        assert row["ce_spliced"] <= row["ce_zero"] + 0.05
    features = _json(capsys, ["features", "--workspace", str(ws), "--dictionary", "r-topk-64-k4", "--top", "3"])
    assert features["dictionaries"][0]["source"].startswith("store:") and features["dictionaries"][0]["features"] == 64

    from workbench.workspace import Workspace

    w = Workspace(ws)
    assert {"training_metrics", "dictionaries", "dictionary_evals", "feature_density_histograms", "features",
            "feature_examples"} <= set(w.tables())
    curve = w.sql("SELECT step, fvu FROM training_metrics WHERE dictionary = 'r-topk-64-k4' ORDER BY step")
    assert list(curve["step"]) == list(range(1, 41))
    assert curve["fvu"].iloc[-5:].mean() < curve["fvu"].iloc[:5].mean()  # it learned


def test_toy_and_mlp_sparsity_checks(cached, capsys):
    ws, model = cached
    out = _json(capsys, ["eval", "--workspace", str(ws), "--toy", "--archs", "topk", "--toy-tokens", "200000"])
    assert out["toy"][0]["arch"] == "topk" and out["toy"][0]["recovery"] > 0.9
    mlp = _json(capsys, ["eval", "--workspace", str(ws), "--mlp-sparsity", "--model", model, "--tokens", "1024", "--context", "64"])
    assert [r["layer"] for r in mlp["mlp_sparsity"]] == [0, 1]


@pytest.mark.parametrize("argv, message", [
    (["train", "--toy", "--arch", "gated"], "unknown architecture 'gated'"),
    (["train", "--toy", "--arch", "topk", "--d-sae", "16", "--k", "32"], "k=32 is larger than d_sae=16"),
    (["train", "--toy", "--arch", "topk,relu", "--d-sae", "16,32,64"], "--d-sae lists 3 values for 2 architectures"),
    (["train", "--site", "blocks.1.hook_resid_pre", "--arch", "topk"], "no cached activations of blocks.1.hook_resid_pre"),
    (["train", "--site", RESID, "--heads", "all"], "--heads needs a per-head site"),
    (["train", "--site", "blocks.1.attn.hook_z", "--heads", "7"], r"head\(s\) \[7\] out of range"),
    (["eval", "--dictionary", "nope"], "no dictionary 'nope'"),
    (["eval"], "say what to evaluate"),
])
def test_bad_input_is_one_line(cached, capsys, argv, message):
    ws, model = cached
    extra = ["--workspace", str(ws)] + (["--model", model] if argv[0] == "train" and "--toy" not in argv else [])
    import re

    assert re.search(message, _error(capsys, argv + extra))


def test_eval_refuses_a_dictionary_of_another_width_and_a_truncated_file(cached, capsys):
    from sae.dictionary import Dictionary, DictionaryConfig
    from workbench.workspace import Workspace

    ws, model = cached
    folder = Workspace(ws).dictionaries_dir
    Dictionary(DictionaryConfig(name="wide", arch="relu", d_in=48, d_sae=8, site=RESID, model=model)).save(folder / "wide")
    assert "reads width 48 but" in _error(capsys, ["eval", "--workspace", str(ws), "--dictionary", "wide", "--tokens", "256"])
    Dictionary(DictionaryConfig(name="cut", arch="relu", d_in=32, d_sae=8, site=RESID, model=model)).save(folder / "cut")
    weights = folder / "cut" / "dictionary.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert "truncated or corrupt" in _error(capsys, ["eval", "--workspace", str(ws), "--dictionary", "cut"])


def test_a_killed_training_process_resumes_to_the_same_weights(tmp_path, capsys):
    """SIGKILL after a checkpoint (a real process), rerun: the result equals an uninterrupted run, bit for bit."""
    args = ["train", "--toy", "--arch", "batchtopk", "--d-sae", "64", "--k", "3", "--tokens", "150000", "--batch-size", "256",
            "--lr", "3e-3", "--checkpoint-every", "40", "--log-every", "10", "--name", "k"]
    straight = _json(capsys, args + ["--workspace", str(tmp_path / "a")])
    ws = tmp_path / "b"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "workbench", *args, "--workspace", str(ws)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = ws / "dictionaries" / "k" / "checkpoint" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not state.exists():
        pytest.fail("the training process ended before its first checkpoint")
    resumed = _json(capsys, args + ["--workspace", str(ws)])
    assert resumed["resumed_from_step"] >= 40
    from sae.dictionary import Dictionary

    a = Dictionary.load(tmp_path / "a" / "dictionaries" / "k")
    b = Dictionary.load(ws / "dictionaries" / "k")
    for key, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[key]), key
    assert resumed["steps"] == straight["steps"]
