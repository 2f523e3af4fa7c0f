"""workbench.allocator: tuned, a loop's large blocks are reused instead of faulted in again; opt-outs are honoured.

The oracle is the kernel's count of minor page faults (`getrusage`) in a fresh process that allocates, fills and
frees the same 64 MiB block several times (with glibc's own `malloc`), as a forward pass does with its temporaries:
glibc's defaults map and unmap a block that large every time (16,384 faults per round); tuned, it stays in the heap
and faults no more. (`benchmarks/allocator_bench.py` measures the same on real forward passes.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import allocator

ROOT = Path(__file__).resolve().parents[1]
BLOCK_PAGES = 64 * 2**20 // 4096

# What both children start with: `rounds(n)` mallocs, fills and frees a 64 MiB block n times and returns the faults.
_CHURN = f"""
import ctypes, json, resource, sys
sys.path.insert(0, {str(ROOT)!r})
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rounds(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = libc.malloc(2**26)  # 64 MiB, every page written
        ctypes.memset(block, 1, 2**26)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""

_LOOP = _CHURN + """
from workbench.allocator import tune_malloc
state = tune_malloc()
rounds(2)  # the first round faults the block in whatever the setting
print(json.dumps({"state": state, "faults": rounds(4)}))
"""


def _child(code: str, timeout: int, **env_changes):
    """What a fresh process running `code` prints last, as JSON; no malloc settings of this process's environment."""
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV and not k.startswith("MALLOC_")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loop(**env_changes) -> dict:
    return _child(_LOOP, 120, **env_changes)


def _glibc() -> bool:
    import ctypes

    return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_tuned_loop_reuses_its_blocks_where_the_defaults_fault_them_in_every_time():
    default = _loop(**{allocator.ENV: "default"})
    tuned = _loop()
    assert default["state"] == f"left: {allocator.ENV}=default"
    assert tuned["state"] == "tuned"
    assert default["faults"] >= 4 * BLOCK_PAGES * 0.9, default  # mapped and unmapped each round
    assert tuned["faults"] < BLOCK_PAGES * 0.1, tuned  # reused from the heap


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_malloc_settings_given_in_the_environment_are_left_alone():
    given = _loop(MALLOC_ARENA_MAX="2")
    assert given["state"] == "left: malloc settings given in the environment"
    assert given["faults"] >= 4 * BLOCK_PAGES * 0.9  # glibc's own behaviour, untouched


@pytest.mark.parametrize("env, why", [
    ({allocator.ENV: "Default"}, f"left: {allocator.ENV}=default"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "left: another allocator is preloaded"),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "left: malloc settings given in the environment"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "left: malloc settings given in the environment"),
])
def test_opt_outs(monkeypatch, env, why):
    for key in (allocator.ENV, "LD_PRELOAD", "GLIBC_TUNABLES", *allocator._USER_SETTINGS):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert allocator._tune() == why  # returns before any mallopt: this process is not changed


def test_tune_malloc_runs_once_per_process():
    first = allocator.tune_malloc()
    assert allocator.tune_malloc() == first == allocator.malloc_state()


_AFTER_CACHE = _CHURN + """
from workbench.model import load_model
from workbench.store import ActivationStore
model = load_model({model!r}, device="cpu")  # tunes malloc
store = ActivationStore({ws!r})
store.cache(model, ["blocks.0.hook_resid_post"], 4096, batch_size=8, progress=False, run="first")
faults = []
for run in ("second", "third"):  # new runs, published as several segments each
    rounds(2)  # the heap holds the block again
    store.cache(model, ["blocks.0.hook_resid_post"], 4096, batch_size=8, segment_tokens=1024, progress=False, run=run)
    faults.append(rounds(2))
print(json.dumps(faults))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_a_cache_job_leaves_the_heap_it_kept_alone(model_dirs, tmp_path):
    """DuckDB trims every glibc heap (`malloc_trim(0)`) when a database instance starts or closes: a job that opened
    and closed its own token-table connection made the next forward passes fault their temporaries in again. The
    process's one connection (opened by its first job) stays open, so after a later job on a new run a 64 MiB block
    freed before it is still there to reuse. (A job that resumes a run opens its published segments first, which
    trims once, before its first forward pass.)"""
    faults = _child(_AFTER_CACHE.format(model=str(model_dirs["gpt2"]), ws=str(tmp_path / "ws")), 300)
    # a trimmed heap faults the whole block in again (16,384 pages); a job may leave the heap a few MiB short of it
    assert all(f < BLOCK_PAGES * 0.5 for f in faults), faults
