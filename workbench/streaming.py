"""Reading a store run back as batches: in order (`scan`) or shuffled (`batches`, `pairs`).

How a shuffled epoch is made, with memory bounded by the buffer, not the run:

1. The selected rows (a range of the run's store order) are cut into *pieces* of
   `buffer_rows / PIECES` consecutive rows, never crossing a segment.
2. The pieces are put in a seeded random order; each run of PIECES pieces is one
   *block* (the shuffle buffer): PIECES windows from anywhere in the corpus.
3. A background thread reads a block's pieces from DuckDB (each segment attached
   read-only once, fixed-size array columns fetched as Arrow and viewed as tensors
   without copying) and concatenates them; DuckDB and torch release the GIL, so
   reading block k+1 overlaps the gathering of block k.
4. The block's rows leave in a random permutation, gathered straight into output
   batches (one copy per row); rows a block leaves over open the next block's first batch.

Every row is in exactly one piece and every piece in exactly one block, so an
epoch yields every selected row exactly once. Peak memory is about three blocks
(the one being gathered, the one queued, the one being read), whatever the run's size.
Reading in order is steps 3-4 without the permutation, in store order.
"""

from __future__ import annotations

import math
import queue
import threading
import warnings
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.store import READ_CONFIG, Run, Segment, Storage, damaged

PIECES = 8  # windows per shuffle block
CHUNK_BYTES = 8 * 2**20  # rows fetched from DuckDB per Arrow batch (about this many bytes)

Columns = tuple[Tensor, ...]  # row-aligned tensors, one per selected column
T = TypeVar("T")


# ====================================================================== public entry points
def ordered_chunks(run: Run, columns: list[str], specs, start_row: int, max_rows: int | None, batch_rows: int) -> Iterator[Columns]:
    """The selected rows in store order, in chunks of about CHUNK_BYTES (a whole number of batches), read ahead."""
    chunk = max(1, (CHUNK_BYTES // _row_bytes(specs)) // batch_rows) * batch_rows  # so most batches are views

    def produce():
        with RunReader() as reader:
            for seg, lo, hi in segment_ranges(run, start_row, max_rows):
                yield from reader.read(seg, columns, specs, lo, hi, chunk)

    return prefetched(produce, depth=4)


def shuffled_batches(run: Run, columns: list[str], specs, start_row: int, max_rows: int | None, batch_rows: int,
                     buffer_rows: int, seed: int) -> Iterator[Columns]:
    """One shuffled epoch of the selected rows in batches of exactly `batch_rows` (the last may be short)."""
    piece = max(1, math.ceil(buffer_rows / PIECES))
    pieces = [(seg, a, min(a + piece, hi)) for seg, lo, hi in segment_ranges(run, start_row, max_rows) for a in range(lo, hi, piece)]
    order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(seed)).tolist()
    chunk = max(1, CHUNK_BYTES // _row_bytes(specs))

    def produce():
        ring = _BlockRing(3, piece * PIECES)  # consumer's block + queued block + the one being filled
        with RunReader() as reader:
            for g in range(0, len(order), PIECES):
                parts = []
                for seg, lo, hi in (pieces[i] for i in order[g:g + PIECES]):
                    parts += reader.read(seg, columns, specs, lo, hi, chunk)
                yield parts[0] if len(parts) == 1 else ring.fill(parts)

    permute = torch.Generator().manual_seed(seed + 1)  # the main thread's own generator (the reader thread has the other)
    yield from _gather(prefetched(produce, depth=1), batch_rows, permute)


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
    """One private in-memory DuckDB connection that attaches a run's segments read-only as they are first needed.

    Attaching (rather than `duckdb.connect(path)`) means a connection the process
    already holds on a segment, whatever its settings, neither blocks nor is disturbed.
    """

    def __init__(self):
        import duckdb

        self.con = duckdb.connect(":memory:", config=READ_CONFIG)
        self.aliases: dict[str, str] = {}

    def __enter__(self) -> "RunReader":
        return self

    def __exit__(self, *exc) -> None:
        self.con.close()

    def read(self, seg: Segment, columns: list[str], specs, lo: int, hi: int, chunk: int) -> Iterator[Columns]:
        """Rows [lo, hi) of one segment (`rowid` order is insertion order, i.e. store order), `chunk` rows at a time."""
        import duckdb

        select = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
        try:
            alias = self._attach(seg)
            query = f"SELECT {select} FROM {alias}.activations WHERE rowid >= {lo} AND rowid < {hi}"
            for batch in self.con.sql(query).to_arrow_reader(chunk):
                yield tuple(column_tensor(batch.column(i), w, s) for i, (w, s) in enumerate(specs))
        except duckdb.Error as e:
            if not seg.path.exists():
                raise WorkbenchError(f"segment file {seg.path} disappeared while being read (was it deleted?)") from e
            raise damaged(seg, e) from e

    def _attach(self, seg: Segment) -> str:
        key = str(seg.path)
        if key not in self.aliases:
            alias = f"s{len(self.aliases)}"
            self.con.execute(f"ATTACH '{key.replace(chr(39), chr(39) * 2)}' AS {alias} (READ_ONLY)")
            self.aliases[key] = alias
        return self.aliases[key]


def column_tensor(column, width: int, storage: Storage | None) -> Tensor:
    """A zero-copy tensor over one Arrow column: [rows, width] for an array column, [rows] for a key column."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Arrow memory is read-only to numpy; nothing here writes to it
        if storage is None:
            return torch.from_numpy(column.to_numpy(zero_copy_only=False))
        values = column.flatten().to_numpy(zero_copy_only=True)
        if storage.numpy_dtype is np.uint16:
            return torch.from_numpy(values.view(np.int16)).view(storage.torch_dtype).view(-1, width)
        return torch.from_numpy(values).view(-1, width)


# ====================================================================== shuffling and read-ahead
def _gather(blocks: Iterable[Columns], batch_rows: int, generator: torch.Generator) -> Iterator[Columns]:
    """Each block's rows in a random permutation, gathered into batches of `batch_rows` (one copy per row)."""
    leftover: Columns | None = None
    for block in blocks:
        order = torch.randperm(len(block[0]), generator=generator)
        start = 0
        if leftover is not None:
            start = min(batch_rows - len(leftover[0]), len(order))
            leftover = tuple(_cat([old, _take(b, order[:start])]) for old, b in zip(leftover, block))
            if len(leftover[0]) < batch_rows:
                continue
            yield leftover
            leftover = None
        for a in range(start, len(order) - batch_rows + 1, batch_rows):
            yield tuple(_take(b, order[a:a + batch_rows]) for b in block)
        rest = (len(order) - start) % batch_rows
        if rest:
            leftover = tuple(_take(b, order[len(order) - rest:]) for b in block)
    if leftover is not None:
        yield leftover


class _Failure:
    """An exception raised in the reading thread, on its way to the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


_DONE = object()


def prefetched(produce: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """Run `produce()` in a background thread, at most `depth` items ahead of the consumer.

    Errors raised by the producer are re-raised in the consumer. When the consumer
    stops early (break, exception, garbage collection) the producer is told to stop,
    its generator is closed in its own thread (closing its DuckDB connection), and joined.
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


class _BlockRing:
    """A few reusable block buffers. Filling a fresh 100 MB array each block costs page faults that were
    measured to halve the read rate; reusing buffers avoids them. With a queue of depth 1 between reader
    and consumer, three buffers are never overwritten while in use: the reader can only start refilling
    a buffer after the consumer has taken the block that followed it, which it does when done with it."""

    def __init__(self, count: int, rows: int):
        self.count, self.rows, self.next = count, rows, 0
        self.buffers: list[list[np.ndarray]] | None = None

    def fill(self, parts: list[Columns]) -> Columns:
        """Copy the chunks `parts` (each a tuple of columns) into the next buffer; return views of the filled rows."""
        if self.buffers is None:
            self.buffers = [[np.empty((self.rows, *c.shape[1:]), dtype=_numpy(c).dtype) for c in parts[0]] for _ in range(self.count)]
        columns = self.buffers[self.next]
        self.next = (self.next + 1) % self.count
        n = 0
        for part in parts:
            k = len(part[0])
            for buffer, c in zip(columns, part):
                buffer[n:n + k] = _numpy(c)
            n += k
        return tuple(_tensor(buffer[:n], c.dtype) for buffer, c in zip(columns, parts[0]))


def _numpy(x: Tensor) -> np.ndarray:
    """A numpy view of `x` (float16/bfloat16 as int16 bits)."""
    return x.view(torch.int16).numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.numpy()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """The inverse of `_numpy`."""
    t = torch.from_numpy(a)
    return t.view(dtype) if dtype in (torch.float16, torch.bfloat16) else t


def _take(x: Tensor, rows: Tensor) -> Tensor:
    """x[rows] as a new tensor, gathered by numpy: single-threaded, it keeps its speed when the machine is
    oversubscribed, where torch's multi-threaded index_select was measured 10x slower."""
    return _tensor(np.take(_numpy(x), rows.numpy(), axis=0), x.dtype)


def _cat(parts: Sequence[Tensor]) -> Tensor:
    """torch.cat by numpy (single-threaded, for the same reason as `_take`)."""
    return _tensor(np.concatenate([_numpy(p) for p in parts]), parts[0].dtype)


def _row_bytes(specs) -> int:
    return sum(w * (s.itemsize if s else 4) for w, s in specs)
