"""Activation store: read rate, caching overhead and peak memory, measured side by side in one run.

Three targets (issue 3), each printed as a ratio from this one run:

1. read: streaming a site into training batches (`ActivationStore.batches`,
   batch 4096, shuffled through the default 128 MiB buffer, and in order) versus
   reading the same bytes from a raw `.npy` file with `np.load` (target >= 0.60).
   Also printed: `np.load` of the whole file followed by batches gathered along one
   random permutation (the naive shuffle with everything in RAM). The run is written
   by the cache job's own segment writer from random rows, so the measurement does
   not wait on a forward pass.
   Both files sit in the page cache (the warm-up round reads them). Then the same
   two reads with both files dropped from the page cache before each run (the
   cache job writes with O_DIRECT, so a fresh run's first epoch reads the disk).
2. cache: `ActivationStore.cache` end to end (tokenize, forward, copy, finiteness
   check, write, publish) versus a bare forward pass over the same token rows with
   the same capture hooks and the same `stop_at_layer` (target <= 1.25), over 512k
   tokens by default (three full segments and a one-sequence tail, so publishing
   overlaps computing as in any real run; `--cache-tokens 65536` shows the one-segment
   case, where the fixed cost of publishing about 0.2 s is not hidden). Also printed:
   against tokenizing the same corpus plus the bare forward (what any pass over a
   corpus costs), since on this tiny model tokenizing costs a tenth of the forward
   pass itself; and where the overhead goes, from one more contender: tokenizing, the
   forward pass and the job's own staging (`SiteFile.put`) with the buffers given back
   unwritten. The differences of medians (tokenizing, staging, then writing and
   publishing) are printed as shares of the bare forward pass.
   Each round caches into an empty workspace: the previous round's output is deleted
   (untimed), so its page-cache pages are free again. Without that, every round's
   786 MB take pages this virtual machine has never touched, which cost about
   2.8 ms/MB the first time (the host backs them then): the reference ratio was 2.1
   that way, against about 1.6 for the first round.
   The reference model is the worst case for this ratio: its forward pass up to
   the sites is one 128-wide block, cheaper per token than moving the 1.5 KB of
   activations it produces. The same contenders then run on a randomly initialised
   model of GPT-2 small's shape (768 wide, 12 layers, sites at layer 5, 32k tokens
   by default), where the forward pass costs what it does in models people study.
3. memory: peak RSS of a caching process and of a streaming process at 100k and 1M
   tokens (fresh subprocesses, three alternating rounds, medians; target: no growth with
   tokens), beside a bare forward loop over the same tokens, whose own peak shows what
   the model and glibc's heap do without the store. Two processes' peaks differ by up
   to about 100 MiB whatever their length, so the 1M processes also report their peak
   after their first 100k tokens: the same process's peak at 100k and at 1M tokens,
   free of that noise.
3b. long (`--parts long`, not run by default: about 80 s a round): one caching and one
   bare-forward process per round followed to 3M tokens, reporting their peaks after
   100k, 300k, 1M, 2M and 3M tokens, to see whether growth stops after the first
   million.
4. sql (`--parts sql`, not run by default): `store.sql` (the `activations` view opened over every segment,
   then a point lookup on seq_id), five calls a round, on two runs of 16 segments each, one with 16 times the
   other's tokens; their ratio shows whether the view's cost follows the run's tokens or its segments.

Rounds alternate between contenders (A B C A B C ...) so load from other processes
hits them alike; ratios are printed from the medians, and from the best rounds in
parentheses; the caching ratio also as the median of each round's own ratio (its two
runs a few seconds apart). On a machine shared with other jobs all of them move a lot
from run to run.

glibc's malloc: the read part runs first, as glibc sets it (the workbench tunes malloc when
it loads a model or trains, not when it reads the store); `--tuned-read` runs it tuned, where
`np.load` gets 2-2.7 times as fast (its 410 MB array is reused from the heap instead of
faulted in afresh) and the store's batches do not change. The cache and memory parts run
tuned, every contender alike (`workbench/allocator.py`; `benchmarks/allocator_bench.py`
compares tuned with glibc's defaults).

    python benchmarks/store_bench.py [--rounds 5] [--read-rows 400000] [--width 256]
                                     [--cache-tokens 524288] [--cache-large-tokens 32768]
                                     [--parts read,cache,memory[,long,sql]] [--memory-rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 4096


def main() -> None:
    args = _parse()
    parts = set(args.parts.split(","))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        tmp = Path(tmp)
        from workbench.allocator import malloc_state, tune_malloc

        if args.tuned_read:
            tune_malloc()
        read = bench_read(tmp, args) if "read" in parts else None
        read_malloc = malloc_state() or "as glibc sets it"
        cache = bench_cache(tmp, args) if "cache" in parts else None
        memory = bench_memory(tmp, args) if "memory" in parts else None
        long = bench_memory_long(tmp, args) if "long" in parts else None
        sql = bench_sql(tmp, args) if "sql" in parts else None
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; ratios from medians (and from best rounds) of alternating rounds")
    if read:
        print(f"1. read   : store.batches (shuffled) / np.load  = {_ratio(read, 'shuffled', 'npy')}   (target >= 0.60; "
              f"glibc malloc {read_malloc})")
        print(f"           store.batches (in order) / np.load  = {_ratio(read, 'ordered', 'npy')}")
        print(f"           store.batches (shuffled) / np.load + in-memory shuffle (whole file in RAM) = {_ratio(read, 'shuffled', 'npy_shuffled')}")
        print(f"           both read from disk (dropped from the page cache): store.batches (shuffled) / np.load = "
              f"{_ratio(read, 'shuffled_cold', 'npy_cold')}")
    for label, times in (cache or {}).items():
        print(f"2. cache  : {label}: store.cache / bare forward with the same hooks = {_ratio(times, 'forward', 'cache')}   (target <= 1.25; "
              f"glibc malloc {malloc_state()}); "
              f"median of each round's own ratio {_paired(times, 'forward', 'cache')}")
        print(f"           {label}: store.cache / (tokenizing the corpus + bare forward) = {_ratio(times, 'tokenize_forward', 'cache')}")
        print(f"           {label}: where the rest goes, as shares of the bare forward: tokenizing "
              f"{_share(times, 'tokenize_forward', 'forward')}, staging {_share(times, 'tok_fwd_stage', 'tokenize_forward')}, "
              f"writing and publishing {_share(times, 'cache', 'tok_fwd_stage')}")
    if memory:
        rounds = len(memory["cache"][0])
        for key, label in (("cache", "caching          "), ("forward", "bare forward loop"), ("stream", "streaming        ")):
            small, large = memory[key]
            a, b = statistics.median(small), statistics.median(large)
            spread = f"100k {min(small):.0f}-{max(small):.0f}, 1M {min(large):.0f}-{max(large):.0f}"
            print(f"3. memory : {label} 1M / 100k tokens: median peak RSS of {rounds} {b / a:.2f} ({a:.0f} -> {b:.0f} MiB; {spread})"
                  f"{'   (target: no growth)' if key != 'forward' else '   (reference: the model alone)'}")
        for key, label in (("cache", "caching          "), ("forward", "bare forward loop")):
            ratios = [end / early for early, end in zip(memory[f"{key}@100k"][1], memory[key][1])]
            print(f"           {label} within each 1M process, peak at the end / peak after its first 100k tokens: "
                  f"median {statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)})")
    if sql:
        print(f"4. sql    : store.sql over {SQL_SEGMENTS} segments (opening the view, then a seq_id lookup), "
              f"{SQL_SEGMENTS * SQL_SEQUENCES[1] * 128:,} / {SQL_SEGMENTS * SQL_SEQUENCES[0] * 128:,} tokens = {_ratio(sql, 'small', 'large')}   "
              f"(information: the view's cost follows segments, not tokens)")
    if long:
        for key, label in (("cache", "caching          "), ("forward", "bare forward loop")):
            ratios = [peaks[-1] / peaks[0] for peaks in long[key]]
            later = [peaks[-1] / peaks[2] for peaks in long[key]]
            print(f"3b. long  : {label} within each 3M process, peak after 3M / after 100k tokens: median "
                  f"{statistics.median(ratios):.2f} ({', '.join(f'{x:.2f}' for x in ratios)}); 3M / 1M: "
                  f"{', '.join(f'{x:.2f}' for x in later)}")


def _share(times: dict[str, list[float]], more: str, less: str) -> str:
    """(median(more) - median(less)) / median(forward): what one step adds, as a share of the bare forward pass."""
    return f"{(statistics.median(times[more]) - statistics.median(times[less])) / statistics.median(times['forward']):+.2f}"


def _paired(times: dict[str, list[float]], a: str, b: str) -> str:
    """The median over rounds of time(b) / time(a) within one round (the two ran a few seconds apart, so drift in the
    machine's speed over minutes cancels), with the spread of those per-round ratios."""
    ratios = sorted(y / x for x, y in zip(times[a], times[b]))
    return f"{statistics.median(ratios):.2f} (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"


def _ratio(times: dict[str, list[float]], a: str, b: str) -> str:
    """time(b) / time(a): a rate ratio a/b for reads, a cost ratio b/a for caching; median (best)."""
    median = statistics.median(times[b]) / statistics.median(times[a])
    best = min(times[b]) / min(times[a])
    return f"{median:.2f} ({best:.2f})"


# ====================================================================== 1. read rate
def bench_read(tmp: Path, args) -> dict[str, float]:
    from workbench.store import ActivationStore

    rows, width = args.read_rows, args.width
    store = ActivationStore(tmp / "read-ws")
    model = "bench/random-rows"
    npy = tmp / "rows.npy"
    write_random_run(store, model, "random", rows, width, npy)
    mb = rows * width * 4 / 1e6
    print(f"read: {rows:,} rows x {width} float32 = {mb:.0f} MB; batch {BATCH}")

    def from_npy():
        np.load(npy)

    def shuffled():
        for _ in store.batches(model, "x", BATCH):
            pass

    def ordered():
        for _ in store.batches(model, "x", BATCH, shuffle=False):
            pass

    def npy_shuffled():
        for _ in npy_batches(npy, BATCH):
            pass

    warm = _rounds({"npy": from_npy, "shuffled": shuffled, "ordered": ordered, "npy_shuffled": npy_shuffled}, args.rounds, mb)
    # The cache job writes with O_DIRECT, so a fresh run is not in the page cache: its first epoch reads the disk.
    # Both sides cold: every file is dropped from the page cache (fsynced, clean: POSIX_FADV_DONTNEED) before each run.
    files = [npy, *sorted(store.workspace.store_dir.rglob("*.npy"))]
    print("read, both files dropped from the page cache before each run:")
    cold = _rounds({"npy_cold": from_npy, "shuffled_cold": shuffled}, args.rounds, mb, after=lambda name: _drop_cached(files))
    return {**warm, **cold}


def _drop_cached(paths: list[Path]) -> None:
    """Ask the kernel to drop `paths` from the page cache (clean pages go; nothing is lost)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_random_run(store, model: str, run: str, rows: int, width: int, npy: Path | None = None, context: int = 128,
                     per_segment: int | None = None) -> None:
    """A store run of random float32 rows written by the cache job's own segment writer (and the same rows as .npy);
    `per_segment` sequences a segment (default: about 256 MiB)."""
    from workbench.caching import SegmentWriter
    from workbench.store import RunManifest, run_directory, segment_path

    sequences = rows // context
    per_segment = per_segment or max(1, (256 * 2**20) // (context * width * 4))
    manifest = RunManifest(model, run, ("x",), {"x": (width,)}, "float32", context, "random", "all", "-", per_segment, sequences)
    directory = run_directory(store.workspace, model, run)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(manifest.to_json())
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(sequences * context, width)) if npy else None
    generator = torch.Generator().manual_seed(0)
    for first in range(0, sequences, per_segment):
        end = min(first + per_segment, sequences)
        writer = SegmentWriter(directory, first, manifest)
        for s in range(first, end, 32):
            n = min(32, end - s)
            x = torch.randn((n, context, width), generator=generator)  # [batch, pos, width]
            if out is not None:
                out[s * context:(s + n) * context] = x.reshape(-1, width).numpy()
            writer.append(s, torch.zeros((n, context), dtype=torch.long), {"x": x})
        writer.finish(segment_path(directory, first, end), first, end, after=lambda table: None)
        writer.wait()
    if out is not None:
        out.flush()
        del out


def npy_batches(npy: Path, batch: int):
    """The naive in-memory shuffle: np.load the whole file, then gather batches along one random permutation."""
    rows = np.load(npy)
    perm = np.random.default_rng(0).permutation(len(rows))
    for a in range(0, len(rows), batch):
        yield torch.from_numpy(rows[np.sort(perm[a:a + batch])])


# ====================================================================== 4. SQL over a run
SQL_SEGMENTS = 16
SQL_SEQUENCES = (64, 1024)  # a segment's sequences in the small and the large run (16x the tokens)


def bench_sql(tmp: Path, args) -> dict[str, list[float]]:
    """Seconds per `store.sql` call (the `activations` view opened over every segment, then one point lookup) on two
    runs of SQL_SEGMENTS segments each, one with 16 times the other's tokens."""
    from workbench.store import ActivationStore

    store = ActivationStore(tmp / "sql-ws")
    for name, per_segment in zip(("small", "large"), SQL_SEQUENCES):
        write_random_run(store, f"bench/sql-{name}", "random", SQL_SEGMENTS * per_segment * 128, 16, per_segment=per_segment)
    query = "SELECT count(*) AS n FROM activations WHERE seq_id = 5"
    print(f"sql: {SQL_SEGMENTS} segments of {SQL_SEQUENCES[0] * 128:,} and of {SQL_SEQUENCES[1] * 128:,} tokens; {query}")

    def call(name: str):
        def run():
            for _ in range(5):
                assert store.sql(query, model=f"bench/sql-{name}")["n"][0] == 128
        return run

    return _rounds({"small": call("small"), "large": call("large")}, args.rounds, None)


# ====================================================================== 2. caching overhead
def bench_cache(tmp: Path, args) -> dict[str, dict[str, list[float]]]:
    """The caching contenders on the reference model, then (unless --cache-large-tokens 0) on a model of GPT-2 small's shape."""
    out = {"reference": bench_cache_model(tmp, args, small_model(tmp), args.cache_tokens)}
    if args.cache_large_tokens > 0:
        out["gpt2-small shape"] = bench_cache_model(tmp, args, large_model(tmp), args.cache_large_tokens)
    return out


def bench_cache_model(tmp: Path, args, model_path: str, n_tokens: int) -> dict[str, list[float]]:
    from data.corpus import documents, token_chunks
    from workbench.caching import SiteFile, capture, stage_pool
    from workbench.model import load_model, stop_layer
    from workbench.store import STORAGE, ActivationStore, RunningChecksums

    model = load_model(model_path, device="cpu")
    n_layers = model.cfg.n_layers
    layer = max(0, n_layers // 2 - 1)
    sites = [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.attn.hook_z"]
    context, batch = 128, 32
    sequences = n_tokens // context
    tokens = corpus_rows(model.tokenizer, sequences, context)
    stop = stop_layer(model, sites)
    print(f"cache: {model.cfg.model_name} (d_model {model.cfg.d_model}, {n_layers} layers), {tokens.numel():,} tokens, "
          f"sites {', '.join(sites)}, batch {batch} x {context}, stop_at_layer={stop}")

    def bare_forward(rows: torch.Tensor, sink=None) -> None:
        """One forward pass with the cache job's capture hooks (ending the pass at the last site, as they do), each
        keeping a reference to its activation instead of staging a copy (or handing it to `sink`)."""
        kept = {}
        capture(model, rows, sites, torch.float32, stop, sink=sink or kept.__setitem__)

    def forward():
        for i in range(0, len(tokens), batch):
            bare_forward(tokens[i:i + batch])

    def tokenize_and_forward(sink=None):
        pending, done = [], 0
        for row in token_chunks(model.tokenizer, documents("reference", "train"), context):
            pending.append(row)
            if len(pending) == batch or done + len(pending) == sequences:
                bare_forward(torch.tensor(pending), sink)
                done, pending = done + len(pending), []
                if done == sequences:
                    break

    def tokenize_forward_stage():
        """Tokenizing and the forward pass with the job's own staging (`SiteFile.put`: the copy into its pool of
        buffers, the finiteness sum, the checksums), each full buffer given straight back instead of written: caching
        up to its writes and publishing."""
        pool = stage_pool(len(sites), extra=1)
        files: dict[str, SiteFile] = {}
        with tempfile.TemporaryDirectory(dir=tmp) as scratch:  # the files are opened (as the job does), never written
            def stage(site: str, x: torch.Tensor) -> None:
                if site not in files:
                    files[site] = SiteFile(Path(scratch) / f"{site}.npy", pool, STORAGE["float32"],
                                           RunningChecksums(x[0, 0].numel() * 4), lambda item: pool.give(item[2]))
                files[site].put(x, lambda: None)

            tokenize_and_forward(stage)
            for f in files.values():
                f.close()

    workspace = tmp / "cache-ws"

    def cache():
        ActivationStore(workspace).cache(model, sites, tokens.numel(), context=context, batch_size=batch, progress=False)

    def tidy(name: str) -> None:  # untimed: every round caches into an empty workspace
        if name == "cache":
            shutil.rmtree(workspace)

    capture(model, tokens[:2], sites, torch.float32, stop)  # warm-up
    seconds = _rounds({"forward": forward, "tokenize_forward": tokenize_and_forward, "tok_fwd_stage": tokenize_forward_stage,
                       "cache": cache}, args.rounds, None, tidy)
    rates = {k: tokens.numel() / statistics.median(v) for k, v in seconds.items()}
    print(f"  (median {rates['forward']:,.0f} tokens/s bare, {rates['cache']:,.0f} tokens/s caching)")
    return seconds


def corpus_rows(tokenizer, sequences: int, context: int = 128) -> torch.Tensor:
    """The first `sequences` rows of `context` tokens of the reference training corpus, as the cache job cuts them."""
    from data.corpus import documents, token_chunks

    return torch.tensor(list(token_chunks(tokenizer, documents("reference", "train"), context, limit=sequences)))


def large_model(tmp: Path) -> str:
    """A randomly initialised model of GPT-2 small's shape (d_model 768, 12 layers, 12 heads, MLP 3072) with the
    reference tokenizer: where a forward pass costs what it does in the models researchers study, so the ratio shows
    the store's overhead against real compute rather than against one 128-wide block."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from data import bundled_model_dir

    directory = tmp / "gpt2-small-shape"
    if not (directory / "config.json").is_file():
        source = bundled_model_dir("ref-gpt2")
        if (source / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        else:
            from tests.tiny import tiny_tokenizer
            tokenizer = tiny_tokenizer()
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=768, n_layer=12, n_head=12,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return str(directory)


def small_model(tmp: Path) -> str:
    """The reference model when it is built, else a small random GPT-2 (d_model 256, 4 layers) made here."""
    from data import bundled_model_dir

    if (bundled_model_dir("ref-gpt2") / "config.json").is_file():
        return "ref-gpt2"
    from tests.tiny import build_tiny_model, tiny_tokenizer

    directory = tmp / "small-gpt2"
    build_tiny_model("gpt2", directory, tiny_tokenizer(), d_model=256, n_layers=4)
    return str(directory)


# ====================================================================== 3. peak memory
# Peak RSS of this process image: VmHWM, not ru_maxrss (which carries the parent's peak across fork + exec).
_PEAK = """
def peak_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
MARKS = {marks!r}
early = []
def passed(tokens):  # keeps the peak so far, once, as each mark (tokens gone through) is passed
    while len(early) < len(MARKS) and tokens >= MARKS[len(early)]:
        early.append(peak_mib())
"""
_MEMORY_SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]  # what the caching and the bare-forward children capture

_CACHE_CHILD = _PEAK + """
import sys
sys.path.insert(0, {root!r})
import workbench.caching as caching
from workbench.model import load_model
from workbench.store import ActivationStore
model = load_model({model!r}, device="cpu")
store = ActivationStore({ws!r})
seen = [0]
begin = caching.SegmentWriter.begin
def counted(self, first_seq, tokens):  # tokens of the batches begun so far
    seen[0] += tokens.numel()
    passed(seen[0])
    return begin(self, first_seq, tokens)
caching.SegmentWriter.begin = counted
store.cache(model, {sites!r}, {tokens}, batch_size=64, progress=False)
print(*early, peak_mib())
"""

_FORWARD_CHILD = _PEAK + """
import sys, torch
sys.path.insert(0, {root!r})
from data.corpus import documents, token_chunks
from workbench.caching import capture
from workbench.model import load_model, stop_layer
model = load_model({model!r}, device="cpu")
sites = {sites!r}
stop, rows, done = stop_layer(model, sites), [], 0
for row in token_chunks(model.tokenizer, documents("reference", "train"), 128):
    rows.append(row)
    if len(rows) == 64 or done + len(rows) * 128 >= {tokens}:
        capture(model, torch.tensor(rows), sites, torch.float32, stop)
        done, rows = done + len(rows) * 128, []
        passed(done)
        if done >= {tokens}:
            break
print(*early, peak_mib())
"""

_STREAM_CHILD = _PEAK + """
import sys
sys.path.insert(0, {root!r})
from workbench.store import ActivationStore
store = ActivationStore({ws!r})
rows = 0
for x in store.batches({model!r}, "x", 4096, buffer_rows=16384):
    rows += len(x)
assert rows == {rows}, rows
print(peak_mib())
"""


def bench_memory(tmp: Path, args) -> dict[str, list[list[float]]]:
    """Peak RSS of fresh processes at 100k and 1M tokens, `--memory-rounds` alternating rounds each: caching (tiny
    GPT-2, two sites), a bare forward loop over the same tokens with the same capture hooks (no store), and
    streaming 100k and 1M rows. One process's peak moves by up to about 100 MiB from run to run (where glibc's
    heap happens to fragment around the forward pass's temporaries), so one sample per size can show growth
    that is not there, or hide growth that is: medians are compared."""
    from workbench.store import ActivationStore

    model_dir = _tiny_model(tmp)
    sizes = (100_000, 1_000_000)
    result = {name: [[] for _ in sizes] for name in ("cache", "forward", "stream")}
    result.update({f"{name}@100k": [[] for _ in sizes] for name in ("cache", "forward")})
    for tokens in sizes:
        store = ActivationStore(tmp / f"mem-stream-{tokens}")
        write_random_run(store, "bench/random-rows", "random", tokens, args.width)
    for r in range(args.memory_rounds):
        for i, tokens in enumerate(sizes):
            ws = tmp / f"mem-cache-{tokens}"
            shutil.rmtree(ws, ignore_errors=True)
            start = time.perf_counter()
            early, peak = _cache_peaks(model_dir, ws, tokens, [100_000])
            result["cache"][i].append(peak)
            result["cache@100k"][i].append(early)
            took = time.perf_counter() - start
            early, peak = _forward_peaks(model_dir, tokens, [100_000])
            result["forward"][i].append(peak)
            result["forward@100k"][i].append(early)
            rows = tokens // 128 * 128
            result["stream"][i].append(_child(_STREAM_CHILD.format(root=str(ROOT), ws=str(tmp / f"mem-stream-{tokens}"),
                                                                    model="bench/random-rows", rows=rows, marks=[]))[0])
            print(f"memory round {r + 1}: {tokens:>9,} tokens: peak RSS caching {result['cache'][i][-1]:.0f} MiB "
                  f"(after 100k tokens {result['cache@100k'][i][-1]:.0f}; {took:.0f} s), bare forward loop "
                  f"{result['forward'][i][-1]:.0f} MiB (after 100k {result['forward@100k'][i][-1]:.0f}), streaming {rows:,} "
                  f"rows x {args.width} (buffer 16,384 rows) {result['stream'][i][-1]:.0f} MiB")
    return result


_LONG_MARKS = [100_000, 300_000, 1_000_000, 2_000_000, 3_000_000]


def bench_memory_long(tmp: Path, args) -> dict[str, list[list[float]]]:
    """One caching and one bare-forward process per round, each followed to 3M tokens: the peak RSS after
    100k, 300k, 1M, 2M and 3M tokens of the same process (the model and sites of `bench_memory`)."""
    model_dir = _tiny_model(tmp)
    tokens, out = _LONG_MARKS[-1], {"cache": [], "forward": []}
    for r in range(args.memory_rounds):
        ws = tmp / "mem-long"
        shutil.rmtree(ws, ignore_errors=True)
        out["cache"].append(_cache_peaks(model_dir, ws, tokens, _LONG_MARKS)[:-1])
        out["forward"].append(_forward_peaks(model_dir, tokens, _LONG_MARKS)[:-1])
        for key in out:
            print(f"long memory round {r + 1}: {key:8s} peak RSS after " + ", ".join(
                f"{m / 1e6:g}M {v:.0f}" for m, v in zip(_LONG_MARKS, out[key][-1])) + " MiB")
    shutil.rmtree(tmp / "mem-long", ignore_errors=True)
    return out


def _tiny_model(tmp: Path) -> Path:
    """The tiny GPT-2 the memory parts cache from, built once per bench run."""
    from tests.tiny import build_tiny_model, tiny_tokenizer

    model_dir = tmp / "tiny-gpt2"
    if not (model_dir / "config.json").is_file():
        build_tiny_model("gpt2", model_dir, tiny_tokenizer())
    return model_dir


def _cache_peaks(model_dir: Path, ws: Path, tokens: int, marks: list[int]) -> list[float]:
    """A fresh caching process's peak RSS after each of `marks` tokens, then at its end (MiB)."""
    return _child(_CACHE_CHILD.format(root=str(ROOT), model=str(model_dir), ws=str(ws), tokens=tokens, sites=_MEMORY_SITES, marks=marks))


def _forward_peaks(model_dir: Path, tokens: int, marks: list[int]) -> list[float]:
    """The same for a bare forward loop over the same tokens with the same capture hooks."""
    return _child(_FORWARD_CHILD.format(root=str(ROOT), model=str(model_dir), tokens=tokens, sites=_MEMORY_SITES, marks=marks))


def _child(code: str) -> list[float]:
    """What a fresh process running `code` prints on its last line: peak RSS figures, MiB."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]


# ====================================================================== helpers
def _rounds(contenders: dict, rounds: int, megabytes: float | None, after=None) -> dict[str, list[float]]:
    """Seconds per round for each contender, rounds alternating (A B C A B C ...) so load from other
    processes hits them alike; prints best and median (as MB/s when `megabytes` is given).
    `after(name)`, if given, runs untimed after each run of a contender."""
    times = {name: [] for name in contenders}
    for name, fn in contenders.items():  # warm-up: page cache, first-call costs
        fn()
        if after:
            after(name)
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if after:
                after(name)
    for name, t in times.items():
        shown = [f"{megabytes / x:.0f}" if megabytes else f"{x:.2f}" for x in (min(t), statistics.median(t))]
        print(f"  {name:13s} best {shown[0]:>8s}   median {shown[1]:>8s} {'MB/s' if megabytes else 's'}")
    return times


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--read-rows", type=int, default=400_000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--cache-tokens", type=int, default=524_288, help="tokens cached with the reference model")
    parser.add_argument("--cache-large-tokens", type=int, default=32_768,
                        help="tokens cached with the GPT-2-small-shaped model (0: skip it)")
    parser.add_argument("--parts", default="read,cache,memory",
                        help="comma-separated subset of read,cache,memory,long,sql (long: one process each followed to 3M tokens; "
                             "sql: store.sql's cost on two runs of the same segments, one with 16x the tokens)")
    parser.add_argument("--memory-rounds", type=int, default=3, help="fresh processes per size and contender for the peaks")
    parser.add_argument("--tuned-read", action="store_true",
                        help="run the read part with glibc malloc tuned as the workbench tunes it for models and training")
    return parser.parse_args()


if __name__ == "__main__":
    main()
