"""Two real processes under torchrun (gloo, CPU): DistributedDataParallel training through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_train_one_dictionary_over_gloo(tmp_path):
    ws = tmp_path / "ws"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "workbench", "train",
           "--workspace", str(ws), "--toy", "--arch", "topk", "--d-sae", "128", "--k", "4", "--tokens", "400000",
           "--batch-size", "512", "--lr", "3e-3", "--checkpoint-every", "100", "--name", "ddp", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # exactly one JSON object: rank 0's
    assert summary["processes"] == 2
    assert summary["tokens"] == summary["steps"] * 512 * 2  # each step consumes one batch per process
    assert summary["steps"] == -(-400_000 // 1024)

    from sae.dictionary import Dictionary
    from sae.toy import Toy, ToyConfig, recovery
    from workbench.workspace import Workspace

    d = Dictionary.load(ws / "dictionaries" / "ddp")
    toy = Toy(ToyConfig(seed=0))  # the toy `train --toy` uses
    assert recovery(d.W_dec.detach(), toy.features) > 0.95
    rows = Workspace(ws).sql("SELECT count(*) AS n, count(DISTINCT step) AS d FROM training_metrics WHERE dictionary = 'ddp'")
    assert int(rows["n"][0]) == int(rows["d"][0]) == summary["steps"]  # only rank 0 logs
    assert d.cfg.metadata["trained_tokens"] == summary["tokens"]
    x = toy.batch(123_456, 2048)
    with torch.no_grad():
        assert float((x - d(x).output).pow(2).sum() / (x - x.mean(0)).pow(2).sum()) < 0.2
