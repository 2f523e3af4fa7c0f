"""TopK SAE training throughput, measured side by side in one run.

Setting (issue 4): d_in=256, d_sae=4096, k=32, batch 4096, float32, Adam, on
the same activations. Contenders:

- workbench: `sae.train.Trainer.step` (sparse kernels, fused Adam, dead-feature
  tracking, decoder-norm constraint: the real training step);
- plain:     a plain PyTorch TopK SAE written here (dense decode, autograd, torch.optim.Adam);
- sparsify:  EleutherAI sparsify's `SparseCoder` driven by a plain Adam loop
  (`pip install eai-sparsify`), with the same decoder-norm constraint its trainer applies;
  also reported with fused Adam, so the optimizer's share of the difference is visible.

Rounds alternate between contenders (A B C A B C ...) so that load from other
processes hits them alike; the figures are medians over rounds and the ratios
come from this one run. Also printed: the machine's dense matmul rate and the
share of the one-encoder-matmul ceiling reached (exact TopK needs one dense
[batch, d_in] x [d_in, d_sae] product per step; everything else can be sparse).

    python benchmarks/sae_bench.py [--rounds 5] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D_IN, D_SAE, K, BATCH = 256, 4096, 32, 4096


def main() -> None:
    args = _parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = _activations(args.steps + 1)
    contenders = {"workbench": _workbench(batches), "plain": _plain(batches)}
    sparsify = _sparsify(batches, fused=False)
    if sparsify is None:
        print("sparsify: not installed; `pip install eai-sparsify` (it installs beside torch 2.13 and transformer-lens 4.3)")
    else:
        contenders["sparsify"] = sparsify
        contenders["sparsify+fusedAdam"] = _sparsify(batches, fused=True)
    contenders["matmul"] = _matmul(batches)
    times = {name: [] for name in contenders}
    for name, step in contenders.items():  # warm-up (allocations, first-call costs)
        step(0)
    for _ in range(args.rounds):
        for name, step in contenders.items():
            start = time.perf_counter()
            for i in range(args.steps):
                step(1 + i)
            times[name].append((time.perf_counter() - start) / args.steps)
    _report(times, args)


def _activations(n: int) -> list[torch.Tensor]:
    """Sparse-feature activations of width 256 (the superposition toy at this size)."""
    from sae.toy import Toy, ToyConfig

    toy = Toy(ToyConfig(d_in=D_IN, n_features=8 * D_SAE, p_active=0.004, seed=1))
    return [toy.batch(i, BATCH) for i in range(n)]


def _workbench(batches):
    from sae.dictionary import DictionaryConfig
    from sae.train import TrainConfig, Trainer

    cfg = DictionaryConfig(name="bench", arch="topk", d_in=D_IN, d_sae=D_SAE, k=K)
    trainer = Trainer([cfg], TrainConfig(tokens=10**9, batch_size=BATCH, lr=1e-4, device="cpu"))
    return lambda i: trainer.step(batches[i % len(batches)])


def _plain(batches):
    """The textbook TopK SAE: dense feature matrix, dense decode, autograd, default Adam."""
    W_enc = torch.nn.Parameter(torch.randn(D_IN, D_SAE) / D_IN**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(D_SAE))
    W_dec = torch.nn.Parameter(W_enc.data.T.contiguous())
    b_dec = torch.nn.Parameter(torch.zeros(D_IN))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)

    def step(i):
        x = batches[i % len(batches)]
        pre = torch.relu((x - b_dec) @ W_enc + b_enc)
        values, idx = pre.topk(K, dim=-1, sorted=False)
        f = torch.zeros_like(pre).scatter(-1, idx, values)
        out = f @ W_dec + b_dec
        loss = (out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def _sparsify(batches, fused: bool):
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a note about Triton on import
            from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K), device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=fused)
    dead = torch.zeros(D_SAE, dtype=torch.bool)

    def step(i):
        x = batches[i % len(batches)]
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def _matmul(batches):
    W = torch.randn(D_IN, D_SAE)
    out = torch.empty(BATCH, D_SAE)
    return lambda i: torch.mm(batches[i % len(batches)], W, out=out)


def _report(times: dict[str, list[float]], args) -> None:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rate = {name: BATCH / t for name, t in med.items()}
    flops = 2 * BATCH * D_IN * D_SAE / med["matmul"]
    ceiling = rate["matmul"]
    print(f"TopK SAE d_in={D_IN} d_sae={D_SAE} k={K} batch={BATCH} float32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    print(f"dense matmul: {flops / 1e9:.1f} GFLOP/s -> one-encoder-matmul ceiling {ceiling:,.0f} activations/s")
    for name in times:
        if name == "matmul":
            continue
        spread = f"[{BATCH / max(times[name]):,.0f} .. {BATCH / min(times[name]):,.0f}]"
        print(f"{name:20s} {rate[name]:10,.0f} activations/s {spread:>24s}  {med[name] * 1e3:7.1f} ms/step  "
              f"{rate[name] / ceiling:6.1%} of ceiling")
    print(f"ratio workbench / plain:    {rate['workbench'] / rate['plain']:.2f}x")
    if "sparsify" in rate:
        print(f"ratio workbench / sparsify: {rate['workbench'] / rate['sparsify']:.2f}x   (goal >= 2x)")
        print(f"ratio workbench / sparsify with fused Adam: {rate['workbench'] / rate['sparsify+fusedAdam']:.2f}x")


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per contender")
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    return p.parse_args()


if __name__ == "__main__":
    main()
