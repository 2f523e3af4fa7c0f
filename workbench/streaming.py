"""Reading a store run back as batches: in order (`scan`) or shuffled (`batches`, `pairs`).

Site files are raw `.npy` arrays (see `workbench.store`), read through memory maps:
the page cache is the only buffer, and each row is copied once, from the map straight
into the batch that needs it.

How a shuffled epoch is made, with memory bounded by the buffer, not the run:

1. The selected rows (a range of the run's store order) are cut into *pieces* of
   `buffer_rows / PIECES` consecutive rows, never crossing a segment.
2. The pieces are put in a seeded random order; each run of PIECES pieces is one
   *block* (the shuffle buffer): PIECES windows from anywhere in the corpus.
3. A block's windows are memory-mapped and their chunks' checksums checked (each
   4096-row chunk once per process and version of its file, the first time a window
   touches it: see `VERIFIED`); its
   rows leave in a random permutation: each batch takes the next `batch_rows`
   positions of the permutation, sorted (so rows come from each window in file
   order), and gathers them straight from the maps into memory of its own
   (`BatchBuffers`: used again once the consumer has dropped the batch). The batch
   is a uniform random draw from the block; its rows are listed window by window.
   The last rows of a block open the next block's first batch.
4. A background thread plans the epoch and hands the work to `READ_THREADS` workers
   (two where the process may use two cores): whole batches are gathered at once, up
   to `IN_FLIGHT` ahead of the one the consumer is waiting for (fewer where they would
   hold more than `IN_FLIGHT_BYTES`), and the next block's
   windows are mapped and checked while this block's batches are gathered. numpy's
   gather and sums release the GIL. Batches reach the consumer in order, the same
   batches whatever the number of workers. When a block's last batch is gathered its
   maps are closed, so resident memory stays about two blocks (this one and the
   next) however large the run.

Every row is in exactly one piece and every piece in exactly one block, so an
epoch yields every selected row exactly once. Reading in order is the same
without the permutation, in store order.
"""

from __future__ import annotations

import collections
import contextlib
import math
import mmap
import os
import queue
import threading
import weakref
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from workbench.store import (CHUNK_ROWS, Run, Segment, Storage, chunk_checksums, damaged, read_segment_info, site_array,
                             site_file, unreadable)

PIECES = 8  # windows per shuffle block
CHUNK_BYTES = 8 * 2**20  # rows per in-order read (about this many bytes, a whole number of batches)
KEYS = ("seq_id", "pos")  # computed from the row index, not stored per site
# Every row of a mapped window is read, so its pages are mapped in one go (MAP_POPULATE, Linux) rather than
# faulted in one by one.
MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
# Worker threads that map a shuffled reader's windows and gather its batches: two where this process may use two
# cores (its CPU affinity, which a container or `taskset` narrows, not the machine's count); none (the reading thread
# does it all) where it may use one.
READ_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

IN_FLIGHT = 4  # batches a shuffled reader has handed to its workers beyond the one it is waiting for ...
IN_FLIGHT_BYTES = 32 * 2**20  # ... fewer where they would hold more than this (at least one)
READ_AHEAD = 2  # batches a reader's queue holds for the consumer
RESERVE_BYTES = 64 * 2**20  # batch memory a shuffled reader makes up front (`BatchBuffers.reserve`), at most

Columns = tuple[Tensor, ...]  # row-aligned tensors, one per selected column
T = TypeVar("T")

# Chunks whose checksum this process has checked, per version of a site file: {(path, device, inode, size, mtime_ns,
# ctime_ns): one flag per chunk}. Published files are never written again, and any write through the filesystem
# (damage included) gives the file a new mtime and ctime, hence a new key and a fresh check; so a later epoch in the
# same process skips the checksum pass over bytes already checked, which was a quarter of a warm shuffled epoch
# (2.7-3.0 GB/s instead of 1.9-2.3). Like DuckDB's buffer pool, it does not see bit rot under a file the process
# has already checked; a new process checks everything again. One version per path is kept (a newer one replaces
# it), so a long-lived process (the app) that sees runs re-cached does not collect flags for files long gone.
VERIFIED: dict[tuple, np.ndarray] = {}
_VERIFIED_LOCK = threading.Lock()


# ====================================================================== public entry points
def ordered_chunks(run: Run, columns: list[str], specs, start_row: int, max_rows: int | None, batch_rows: int) -> Iterator[Columns]:
    """The selected rows in store order, in chunks of about CHUNK_BYTES (a whole number of batches), read ahead."""
    chunk = max(1, (CHUNK_BYTES // _row_bytes(specs)) // batch_rows) * batch_rows

    def produce():
        reader = RunReader(run, columns, specs)
        for seg, lo, hi in segment_ranges(run, start_row, max_rows):
            for a in range(lo, hi, chunk):
                b = min(a + chunk, hi)
                arrays = reader.window(seg, a, b)
                yield tuple(reader.keys(name, seg, a, b) if array is None else _tensor(np.array(array), storage)
                            for name, array, (_, storage) in zip(columns, arrays, specs))

    return prefetched(produce, depth=READ_AHEAD)


def shuffled_batches(run: Run, columns: list[str], specs, start_row: int, max_rows: int | None, batch_rows: int,
                     buffer_rows: int, seed: int) -> Iterator[Columns]:
    """One shuffled epoch of the selected rows in batches of exactly `batch_rows` (the last may be short)."""
    piece = max(1, math.ceil(buffer_rows / PIECES))
    pieces = [(seg, a, min(a + piece, hi)) for seg, lo, hi in segment_ranges(run, start_row, max_rows) for a in range(lo, hi, piece)]
    order = np.random.default_rng(seed).permutation(len(pieces)).tolist()
    blocks = [[pieces[i] for i in order[g:g + PIECES]] for g in range(0, len(order), PIECES)]
    permute = np.random.default_rng([seed, 1])  # numpy's permutation is several times faster than torch.randperm here

    batch_bytes = batch_rows * _row_bytes(specs)
    ahead = max(1, min(IN_FLIGHT, IN_FLIGHT_BYTES // batch_bytes))
    # batches alive at once at most, unless the consumer keeps them: in flight (`ahead` + the one waited for, + one
    # joined from two parts), one on its way into the read-ahead queue, the queue's, and the consumer's current and next
    reserve = min(ahead + 3 + READ_AHEAD + 2, max(2, RESERVE_BYTES // batch_bytes))

    def produce():
        with _workers(READ_THREADS) as workers:
            yield from batches(RunReader(run, columns, specs, reserve), workers)

    def batches(reader: RunReader, workers: "ThreadPoolExecutor | _Inline") -> Iterator[Columns]:
        inflight: collections.deque = collections.deque()  # per batch in order: its parts' futures (2 at a block boundary)
        open_parts: list = []  # the parts of the batch a block's last rows opened
        count = 0
        mapped = [workers.submit(reader.window, *w) for w in blocks[0]] if blocks else []
        for b, windows in enumerate(blocks):
            maps = [f.result() for f in mapped]
            # the previous block's last gathers finish (its maps close) before the next block is mapped: two blocks
            # at most are mapped at once. The next block maps (and checks) on a worker while this block's batches
            # are gathered.
            futures.wait([f for parts in inflight for f in parts] + open_parts)
            mapped = [workers.submit(reader.window, *w) for w in blocks[b + 1]] if b + 1 < len(blocks) else []
            offsets = np.cumsum([0] + [hi - lo for _, lo, hi in windows])
            perm = permute.permutation(int(offsets[-1]))
            cuts = [0]
            if count:  # finish the batch the previous block left open
                cuts.append(min(batch_rows - count, len(perm)))
            cuts += range(cuts[-1] + batch_rows, len(perm) + 1, batch_rows)
            if cuts[-1] < len(perm):
                cuts.append(len(perm))
            for a, z in zip(cuts, cuts[1:]):
                part = workers.submit(reader.gather, windows, maps, offsets, perm[a:z])
                if count or z - a < batch_rows:  # a batch that spans two blocks, or the epoch's short last one
                    open_parts.append(part)
                    count += z - a
                    if count < batch_rows:
                        continue
                    parts, open_parts, count = open_parts, [], 0
                else:
                    parts = [part]
                inflight.append(parts)
                while len(inflight) > ahead:
                    yield _joined(inflight.popleft(), reader.buffers)
            del maps  # this block's windows are unmapped once its last gathers are done
        if open_parts:
            inflight.append(open_parts)
        while inflight:
            yield _joined(inflight.popleft(), reader.buffers)

    return prefetched(produce, depth=READ_AHEAD)


def rebatch(chunks: Iterable[Columns], batch_rows: int) -> Iterator[Columns]:
    """Cut a stream of row chunks into groups of exactly `batch_rows` rows (the last may be short)."""
    pending: list[Columns] = []
    count = 0
    for chunk in chunks:
        n, i = len(chunk[0]), 0
        if count:
            i = min(batch_rows - count, n)
            pending.append(tuple(c[:i] for c in chunk))
            count += i
            if count == batch_rows:
                yield tuple(_cat(parts) for parts in zip(*pending))
                pending, count = [], 0
        while n - i >= batch_rows:
            yield tuple(c[i:i + batch_rows] for c in chunk)
            i += batch_rows
        if i < n:
            pending.append(tuple(c[i:] for c in chunk))
            count += n - i
    if count:
        yield tuple(_cat(parts) for parts in zip(*pending))


def segment_ranges(run: Run, start_row: int, max_rows: int | None) -> list[tuple[Segment, int, int]]:
    """(segment, first row, end row) within each segment for the selected rows of the run, in store order."""
    ctx = run.manifest.context
    stop = run.rows if max_rows is None else min(run.rows, start_row + max_rows)
    ranges, offset = [], 0
    for seg in run.segments:
        n = seg.rows(ctx)
        lo, hi = max(start_row - offset, 0), min(stop - offset, n)
        if lo < hi:
            ranges.append((seg, lo, hi))
        offset += n
    return ranges


# ====================================================================== reading segments
class RunReader:
    """Memory-mapped windows of a run's site files, each 4096-row chunk checked against its checksum the first
    time this process touches that version of it (`VERIFIED`; a damaged file becomes one clear error naming it).

    A window maps only the chunks it covers (not the whole file), so the pages a reader has touched are
    unmapped, and leave its resident memory, as soon as the window's arrays are dropped.
    """

    def __init__(self, run: Run, columns: list[str], specs, reserve: int = 0):
        self.run, self.columns, self.specs = run, columns, specs
        self.infos: dict[Segment, dict] = {}
        self.buffers = BatchBuffers(reserve=reserve)  # batch memory (`reserve`: see `BatchBuffers`)
        self.layouts: dict[tuple[Segment, str], tuple[int, int, np.ndarray]] = {}

    def window(self, seg: Segment, lo: int, hi: int) -> list[np.ndarray | None]:
        """Per column, the rows [lo, hi) of `seg` as a read-only memory-mapped array (None for a key column)."""
        info = self.infos.get(seg)
        if info is None:
            info = self.infos[seg] = read_segment_info(seg)
        chunk = int(info.get("chunk_rows", CHUNK_ROWS))
        out = []
        for name, (width, storage) in zip(self.columns, self.specs):
            if name in KEYS:
                out.append(None)
                continue
            offset, rows, verified = self._layout(seg, name, info, width, storage)
            first, last = lo // chunk * chunk, min(-(-hi // chunk) * chunk, rows)  # the chunks the window covers
            if not verified[first // chunk:-(-last // chunk)].all():  # not all checked yet in this process
                cover = self._map(seg, name, offset, first, last, width, storage)
                self._check(seg, name, info, cover, first, chunk, verified)
                del cover  # a window maps its own rows only: the whole chunks were for their checksums
            out.append(self._map(seg, name, offset, lo, hi, width, storage))
        return out

    def keys(self, name: str, seg: Segment, a: int, b: int) -> Tensor:
        """seq_id or pos of the rows [a, b) of `seg`."""
        return self._window_keys(name, seg, a, np.arange(b - a))

    def gather(self, windows, maps, offsets: np.ndarray, picks: np.ndarray) -> Columns:
        """The block rows `picks` (positions in the block's concatenated windows), window by window, one copy each
        (safe to call from several threads at once)."""
        picks = np.sort(picks)
        bounds = np.searchsorted(picks, offsets)
        out = []
        for c, (name, (width, storage)) in enumerate(zip(self.columns, self.specs)):
            if name in KEYS:
                out.append(torch.cat([self._window_keys(name, seg, lo, picks[bounds[w]:bounds[w + 1]] - offsets[w])
                                      for w, (seg, lo, _) in enumerate(windows)]))
                continue
            batch = self.buffers.empty((len(picks), width), np.dtype(storage.numpy_dtype))
            for w in range(len(windows)):
                if bounds[w] < bounds[w + 1]:
                    # mode="clip": the rows are in range by construction, and numpy's default mode ("raise") gathers
                    # into a temporary and copies that into `out` (4.4 -> 5.4 GB/s in one thread here)
                    np.take(maps[w][c], picks[bounds[w]:bounds[w + 1]] - offsets[w], axis=0, out=batch[bounds[w]:bounds[w + 1]],
                            mode="clip")
            out.append(_tensor(batch, storage))
        return tuple(out)

    def _window_keys(self, name: str, seg: Segment, lo: int, rows: np.ndarray) -> Tensor:
        ctx = self.run.manifest.context
        rows = rows.astype(np.int64) + lo
        return torch.from_numpy(seg.first + rows // ctx if name == "seq_id" else rows % ctx)

    def _layout(self, seg: Segment, site: str, info: dict, width: int, storage: Storage) -> tuple[int, int, np.ndarray]:
        """(data offset, rows, `VERIFIED` flags) of a site file, from its header, checked against what the segment
        should hold."""
        key = (seg, site)
        if key not in self.layouts:
            array = site_array(seg, site, info, width, storage)  # parses and checks the header and the file size
            offset, rows = int(array.offset), len(array)
            del array
            chunks = -(-rows // int(info.get("chunk_rows", CHUNK_ROWS)))
            self.layouts[key] = (offset, rows, _verified_flags(site_file(seg.path, site), chunks))
        return self.layouts[key]

    def _map(self, seg: Segment, site: str, offset: int, first: int, last: int, width: int, storage: Storage) -> np.ndarray:
        """Rows [first, last) of a site file, memory-mapped read-only."""
        row_bytes = width * storage.itemsize
        start = offset + first * row_bytes
        aligned = start // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        path = site_file(seg.path, site)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                region = mmap.mmap(fd, start - aligned + (last - first) * row_bytes, flags=MAP_FLAGS, prot=mmap.PROT_READ,
                                   offset=aligned)
            finally:
                os.close(fd)
        except (OSError, ValueError) as e:
            raise unreadable(seg, e, path) from e
        dtype = np.dtype(storage.numpy_dtype)
        return np.frombuffer(region, dtype=dtype, count=(last - first) * width, offset=start - aligned).reshape(-1, width)

    def _check(self, seg: Segment, site: str, info: dict, cover: np.ndarray, first: int, chunk: int,
               done: np.ndarray) -> None:
        """Check the chunks of `cover` (rows from `first`, a chunk boundary) not checked yet in this process (`done`:
        the file's `VERIFIED` flags, set here)."""
        expected = info["sites"].get(site, {}).get("checksums")
        if expected is None:
            raise damaged(seg, ValueError(f"segment.json has no checksums for {site}"))
        for i in range(0, len(cover), chunk):
            c = (first + i) // chunk
            if done[c]:
                continue
            (got,) = chunk_checksums(cover[i:i + chunk], chunk)
            if c >= len(expected) or got != expected[c]:
                raise damaged(seg, ValueError(f"rows {c * chunk}-{c * chunk + len(cover[i:i + chunk]) - 1} of {site} do not "
                                              "match their checksum"), site_file(seg.path, site))
            done[c] = True


def _verified_flags(path, chunks: int) -> np.ndarray:
    """The `VERIFIED` flags of the version of `path` on disk now (an unreadable file gets flags of its own, unshared:
    reading it fails later with the usual message)."""
    try:
        st = os.stat(path)
    except OSError:
        return np.zeros(chunks, dtype=bool)
    key = (os.fspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _VERIFIED_LOCK:
        flags = VERIFIED.get(key)
        if flags is None or len(flags) != chunks:
            for stale in [k for k in VERIFIED if k[0] == key[0] and k != key]:  # older versions of this path: gone
                del VERIFIED[stale]
            flags = VERIFIED[key] = np.zeros(chunks, dtype=bool)
        return flags


class BatchBuffers:
    """Memory for the batches a reader gathers, used again once nobody holds the batch made over it.

    A fresh 4 MiB array per batch is memory the kernel must fault in and zero each time (glibc hands large
    blocks back to the system when they are freed): a second pass over every byte. A shuffled epoch of 1 KB
    rows ran at 3.0-3.3 GB/s that way against 3.6-4.6 with blocks used again (this 2-core VM). So the reader
    keeps up to `keep` blocks of bytes, each as large as the largest batch asked for so far, and hands out a numpy
    *view* of one shaped as asked: the batch tensor (`torch.from_numpy`), its views and anything made from them
    keep that view alive, and the block is handed out again only once the view is gone (a weak reference to it
    is dead). Any shape fits any block (a short batch at a block boundary takes a whole one), so memory kept is
    at most `keep` full batches, however many shapes an epoch asks for. When all kept blocks are held, a new
    block is made and takes the place of the longest held one, which the reader forgets (its holder keeps it
    alive): a consumer that keeps some batches never pins the reader to fresh memory for the rest.
    """

    def __init__(self, keep: int = 16, reserve: int = 0):
        self.keep = keep
        # Blocks made before any is used again, one per request: a reader that can have `reserve` batches alive at
        # once touches them all in its first `reserve` batches, so its memory does not creep up over a long epoch
        # each time the consumer happens to fall behind far enough to need one more.
        self.reserve = min(reserve, keep)
        self.blocks: list[list] = []  # [block (uint8), weak reference to the view over it], longest held first
        self.size = 0  # bytes of the largest request so far: every block made since is this large
        self.lock = threading.Lock()  # workers gather batches at the same time

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * dtype.itemsize
        with self.lock:
            for i, entry in enumerate(self.blocks if len(self.blocks) >= self.reserve else ()):
                if entry[1]() is None and len(entry[0]) >= nbytes:
                    view = entry[0][:nbytes].view(dtype).reshape(shape)
                    entry[1] = weakref.ref(view)
                    self.blocks.append(self.blocks.pop(i))  # most recently handed out last
                    return view
            self.size = max(self.size, nbytes)
            block = np.empty(self.size, dtype=np.uint8)
            view = block[:nbytes].view(dtype).reshape(shape)
            if self.keep:
                if len(self.blocks) >= self.keep:
                    self.blocks.pop(0)
                self.blocks.append([block, weakref.ref(view)])
            return view


class _Inline:
    """A thread pool with no threads: each call runs at once in the reading thread (one core)."""

    @staticmethod
    def submit(fn: Callable[..., T], *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # raised where the result is taken, as from a worker
            future.set_exception(e)
        return future


@contextlib.contextmanager
def _workers(count: int) -> Iterator["ThreadPoolExecutor | _Inline"]:
    """`count` worker threads (none where the process may use one core), shut down on exit: tasks not started
    are cancelled, and those running are waited for."""
    if count <= 1:
        yield _Inline()
        return
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="store-reader-worker")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _joined(parts: list[Future], buffers: BatchBuffers) -> Columns:
    """The batch made of its parts' gathers, in order (one part, or two where it spans a block boundary); a joined
    batch is written into `buffers` too, so a long epoch makes no fresh memory at its block boundaries."""
    results = [part.result() for part in parts]
    if len(results) == 1:
        return results[0]
    return tuple(_cat(columns, buffers) for columns in zip(*results))


# ====================================================================== read-ahead
class _Failure:
    """An exception raised in the reading thread, on its way to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetched(produce: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """Run `produce()` in a background thread, at most `depth` items ahead of the consumer.

    Errors raised by the producer are re-raised in the consumer. When the consumer
    stops early (break, exception, garbage collection) the producer is told to stop,
    its generator is closed in its own thread, and joined.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        source = produce()
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer
            put(_Failure(e))
        finally:
            source.close()

    thread = threading.Thread(target=run, name="store-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


# ====================================================================== small helpers
def _tensor(a: np.ndarray, storage: Storage | None) -> Tensor:
    """A tensor over `a` (raw 16-bit words viewed as float16/bfloat16) that keeps `a` itself alive: `BatchBuffers`
    hands a block out again once its view `a` is gone. (A numpy view of `a`, `a.view(np.int16)`, has as its base
    the block, not `a`, so a tensor over it let `a` die at once and the block be reused under a batch still held.)"""
    if a.dtype == np.uint16:
        return torch.from_numpy(a).view(storage.torch_dtype)
    return torch.from_numpy(a)


def _numpy(x: Tensor) -> np.ndarray:
    """A numpy view of `x` (float16/bfloat16 as int16 bits)."""
    return x.view(torch.int16).numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.numpy()


def _cat(parts: Sequence[Tensor], buffers: "BatchBuffers | None" = None) -> Tensor:
    """torch.cat by numpy (single-threaded: torch's threaded copies were measured 10x slower on a busy machine), into
    memory from `buffers` if given."""
    if len(parts) == 1:
        return parts[0]
    arrays = [_numpy(p) for p in parts]
    out = None if buffers is None else buffers.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
    out = torch.from_numpy(np.concatenate(arrays, out=out))
    return out.view(parts[0].dtype) if parts[0].dtype in (torch.float16, torch.bfloat16) else out


def _row_bytes(specs) -> int:
    return sum(w * (s.itemsize if s else 4) for w, s in specs)
