"""glibc malloc settings for the workbench's loops: keep freed memory for the next batch instead of faulting it in again.

A forward pass (or a training step) on the CPU allocates the same large temporaries batch after batch, and glibc's
defaults give them back to the kernel between batches: a block of 32 MiB or more is `mmap`ped and unmapped every
time, and the top of the heap is trimmed whenever more than twice the last unmapped block's size is free there. The
next batch then faults every page in again, and on this project's virtual machines a fault costs about 2 us of
system time. Measured with `benchmarks/allocator_bench.py` (bare forward passes with the cache job's hooks, fresh
processes, alternating, medians of 3; 2026-11-24, 2 cores): the reference model's pass over 512k tokens took 4.60 s
with 455k faults (0.88 s of system time) with the defaults and 3.99 s with none tuned (0.87 of the time); the
GPT-2-small-shaped model's pass over 16k tokens 12.28 s with 1.7M faults (3.5 s of system time) and 10.55 s with
none (0.86; 0.67 and 0.78 in two earlier runs).

`tune_malloc()` therefore sets, through `mallopt`:

- `M_MMAP_MAX = 0`: no block is `mmap`ped; every one comes from a heap and stays there for reuse. (A thread's arena
  that cannot hold a block still maps it: glibc falls back to `mmap` there whatever this says.)
- `M_TRIM_THRESHOLD = 1 GiB`: the top of the heap is given back only when more than 1 GiB of it is free, so a loop's
  temporaries stay resident between batches, and a one-off giant block freed at the top still goes back.

The cost is memory the process keeps: its resident size stays near its high-water mark instead of falling between
batches, and that mark rises a little where freed blocks no longer go back (peak RSS in the same runs: reference
729 -> 731 MiB, GPT-2-small shape 2004 -> 2058 MiB, the cache job 806 -> 838 MiB). Set `WORKBENCH_MALLOC=default`
to leave glibc as it is; settings the user already made (`MALLOC_*_` variables, `GLIBC_TUNABLES` for malloc, or an
allocator preloaded with `LD_PRELOAD` such as jemalloc or tcmalloc) are left alone too, as is any libc but glibc.

The workbench calls it when it has loaded a model (loading itself runs with glibc's defaults) and when it trains
dictionaries. Reading the activation store does not call it: its batches were as fast either way (shuffled 2.5 GB/s
both ways in `store_bench.py`), while `np.load`, the read target's yardstick, runs 2-2.7 times as fast tuned, since
its 410 MB array no longer faults in afresh. It is process-wide and cannot be undone within the process (glibc's adaptive
threshold stays off once a setting is made). DuckDB undoes part of it: it calls `malloc_trim(0)` whenever a database
instance starts or closes, which hands every free page back; the cache job keeps one instance open for the process
(`caching.TokenTables.shared`) for that reason.
"""

from __future__ import annotations

import ctypes
import os
import threading

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_MAX = -4
TRIM_BYTES = 1 << 30
ENV = "WORKBENCH_MALLOC"  # "default": leave glibc's malloc as it is
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_lock = threading.Lock()
_state: str | None = None


def tune_malloc() -> str:
    """Apply the settings above once per process (later calls return at once); return what was done: "tuned", or
    "left: <why>" when glibc's malloc was left as it is."""
    global _state
    with _lock:
        if _state is None:
            _state = _tune()
        return _state


def malloc_state() -> str | None:
    """What `tune_malloc` did in this process, or None if it has not run."""
    return _state


def _tune() -> str:
    if os.environ.get(ENV, "").strip().lower() == "default":
        return f"left: {ENV}=default"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _OTHER_ALLOCATORS):
        return "left: another allocator is preloaded"
    if any(name in os.environ for name in _USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left: malloc settings given in the environment"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "left: not glibc"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) != 1:  # 1: accepted
        return "left: mallopt refused"
    return "tuned"
