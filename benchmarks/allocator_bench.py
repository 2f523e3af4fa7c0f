"""glibc malloc as it comes against `workbench.allocator.tune_malloc`, in fresh processes side by side.

Each workload runs in a fresh child process per round, with glibc's defaults (`WORKBENCH_MALLOC=default`) and
tuned, alternating (default, tuned, default, tuned, ...) so drift in the machine's speed hits both alike. A child
loads its model, runs one untimed warm-up pass, then `--passes` timed passes, and reports the median pass's seconds,
its minor page faults and system time (`getrusage`), and the process's peak RSS (VmHWM). Workloads:

- `reference`: bare forward passes of the reference model with the cache job's capture hooks (3 sites of block 0,
  `stop_at_layer`, batch 32 x 128), 512k tokens a pass: the denominator of `store_bench.py`'s caching ratio;
- `cache`: the cache job itself (`ActivationStore.cache`) over the same tokens, into a fresh workspace each pass;
- `gpt2-small shape`: the same bare forward passes on a randomly initialised model of GPT-2 small's shape (sites
  at layer 5), 16k tokens a pass.

    python benchmarks/allocator_bench.py [--rounds 3] [--passes 2] [--workloads reference,cache,gpt2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, resource, shutil, statistics, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
import torch
from store_bench import corpus_rows
from workbench.allocator import malloc_state
from workbench.caching import capture
from workbench.model import load_model, stop_layer
from workbench.store import ActivationStore

workload, tmp, passes = {workload!r}, {tmp!r}, {passes}
if workload == "gpt2":
    from pathlib import Path
    from store_bench import large_model
    path, n_tokens = large_model(Path(tmp)), 16384
else:
    path, n_tokens = "ref-gpt2", 524288
model = load_model(path, device="cpu")
layer = max(0, model.cfg.n_layers // 2 - 1)
sites = [f"blocks.{{layer}}.hook_resid_post", f"blocks.{{layer}}.hook_mlp_out", f"blocks.{{layer}}.attn.hook_z"]
stop, context, batch = stop_layer(model, sites), 128, 32
tokens = corpus_rows(model.tokenizer, n_tokens // context, context)
workspace = os.path.join(tmp, "ws-" + str(os.getpid()))

def one_pass():
    if workload == "cache":
        shutil.rmtree(workspace, ignore_errors=True)
        ActivationStore(workspace).cache(model, sites, tokens.numel(), context=context, batch_size=batch, progress=False)
    else:
        for i in range(0, len(tokens), batch):
            capture(model, tokens[i:i + batch], sites, torch.float32, stop, sink=lambda site, x: None)

one_pass()
runs = []
for _ in range(passes):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    one_pass()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    runs.append((seconds, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
shutil.rmtree(workspace, ignore_errors=True)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
seconds, faults, system = sorted(runs)[len(runs) // 2]
print(json.dumps({{"seconds": seconds, "faults": faults, "system": system, "peak": peak, "state": malloc_state()}}))
"""

WORKLOADS = {"reference": "reference bare forward, 512k tokens", "cache": "reference cache job, 512k tokens",
             "gpt2": "gpt2-small-shape bare forward, 16k tokens"}


def main() -> None:
    args = _parse()
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        sys.exit(f"error: unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="allocator-bench-") as tmp:
        for workload in workloads:
            results[workload] = {"default": [], "tuned": []}
            for r in range(args.rounds):
                for setting in ("default", "tuned"):
                    out = _child(workload, setting, tmp, args.passes)
                    results[workload][setting].append(out)
                    print(f"{WORKLOADS[workload]}, round {r + 1}, {setting:7s} ({out['state']}): {out['seconds']:.2f} s, "
                          f"{out['faults']:,} page faults, {out['system']:.2f} s system time, peak RSS {out['peak']:.0f} MiB",
                          flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; medians over {args.rounds} fresh processes each")
    for workload, by in results.items():
        med = {s: {k: statistics.median(o[k] for o in runs) for k in ("seconds", "faults", "system", "peak")}
               for s, runs in by.items()}
        d, t = med["default"], med["tuned"]
        print(f"{WORKLOADS[workload]}: tuned / default time = {t['seconds'] / d['seconds']:.2f} "
              f"({d['seconds']:.2f} -> {t['seconds']:.2f} s); page faults {d['faults']:,.0f} -> {t['faults']:,.0f}; "
              f"system time {d['system']:.2f} -> {t['system']:.2f} s; peak RSS {d['peak']:.0f} -> {t['peak']:.0f} MiB")


def _child(workload: str, setting: str, tmp: str, passes: int) -> dict:
    env = dict(os.environ)
    env.pop("WORKBENCH_MALLOC", None)
    if setting == "default":
        env["WORKBENCH_MALLOC"] = "default"
    code = _CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), workload=workload, tmp=tmp, passes=passes)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"error: the {workload} child ({setting}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per setting and workload")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per process (after one warm-up)")
    parser.add_argument("--workloads", default="reference,cache,gpt2", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    return parser.parse_args()


if __name__ == "__main__":
    main()
