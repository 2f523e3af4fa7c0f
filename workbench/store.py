"""The activation store: model activations cached in DuckDB, streamed back as training batches.

Layout (full schema and SQL examples in docs/store.md):

    <workspace>/store/<model>/<run>/run.json                 the run's manifest (sites, shapes, dtype, corpus, ...)
    <workspace>/store/<model>/<run>/seg-<first>-<end>/       published segments, immutable: tokens.duckdb,
                                                              <site>.npy per site, segment.json
    <workspace>/tables/activation_catalog/<model>.<run>.<hash>.parquet   catalog rows (one per site), for Workspace.sql
    <workspace>/tables/activation_tokens/<model>.<run>.<hash>.<first>-<end>.parquet   token rows, for Workspace.sql
    <workspace>/jobs/cache.<model>.<run>.<hash>.json         progress of a running cache job

A *run* is one model over one corpus (context, dtype and a set of sites); it is
addressed by (model name, site), plus the run name when a model has several runs
holding that site. A run's rows are token positions: row (seq_id, pos) is
position `pos` of the `seq_id`-th chunk of `context` tokens cut from the corpus.

A *segment* holds the sequences [first, end) of a run in one directory:
`tokens.duckdb` (table `tokens(seq_id, pos, token)`, the tokens once), one raw
`<site>.npy` per site ([rows, width] in the storage dtype, float16/bfloat16 as raw
16-bit words) whose row i is the token row i of `tokens`, so the sites of a row
share its key and two sites are row-aligned by construction (transcoder pairs),
and `segment.json` (shapes and a checksum per 4096-row chunk of every site file).
Activation values live in `.npy` files rather than DuckDB tables because DuckDB's
own column storage was measured here at ~100 MB/s writing and ~0.8-1.6 GB/s
reading wide array rows against 3+ GB/s for a raw file: the cache job and the
shuffled reader could not get near a bare forward pass or a raw read through it.
SQL still sees every value: `connect(model=...)` puts a DuckDB view `activations`
over the memory-mapped files (zero copy), and tokens and the catalog are DuckDB
and Parquet tables.

Concurrency follows DuckDB's locking rule (one writer per file; any connection
elsewhere blocks that writer) by never sharing a file between a writer and a
reader: a cache job writes each segment into a private temporary directory and publishes
it by `os.replace` only after every file is complete and fsynced; a published
segment is never opened for writing again. Readers list the published
segments when they start and open each read-only only while reading it, so they
never see a half-written segment and never block the job.

Resume: sequences are cut from the corpus in a fixed order, so a segment's
content is a function of its range. A re-run lists the published segments,
discards temporary files a killed job left, and computes only the missing ranges:
no row is duplicated or lost whatever moment the previous job died.

Reading (`workbench.streaming`): `batches`/`pairs` shuffle through a bounded
buffer: blocks of `buffer_rows` rows, each 8 windows of consecutive rows from
random places in the run, memory-mapped and gathered straight into batches in a
random permutation by a background thread; one call is one epoch covering every
row exactly once.
`scan` streams rows in order with their (seq_id, pos) keys; `tokens` gives token
rows for context windows; `connect`/`sql` answer ad-hoc SQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.errors import one_line as _one_line
from workbench.workspace import Workspace, check_name, sql_path

if TYPE_CHECKING:
    import duckdb
    import pandas as pd

FORMAT_VERSION = 2
CATALOG_TABLE = "activation_catalog"
TOKENS_TABLE = "activation_tokens"
BUFFER_BYTES = 128 * 2**20  # default shuffle-buffer (block) size: the rows a block's batches are drawn from
CHUNK_ROWS = 4096  # rows per checksum chunk of a site file
# One thread per reading connection streams fastest here (measured); the memory cap keeps DuckDB's own page
# cache from growing with the data read.
READ_CONFIG = {"threads": 1, "memory_limit": "64MB"}


class Storage(NamedTuple):
    """How one storage dtype is laid out: the torch dtype, the DuckDB element type, the numpy element type."""

    torch_dtype: torch.dtype
    sql_type: str
    numpy_dtype: type
    itemsize: int


STORAGE = {
    "float32": Storage(torch.float32, "FLOAT", np.float32, 4),
    "float16": Storage(torch.float16, "USMALLINT", np.uint16, 2),  # raw IEEE half bits
    "bfloat16": Storage(torch.bfloat16, "USMALLINT", np.uint16, 2),  # raw bfloat16 bits
}


def storage_name(dtype: str | torch.dtype) -> str:
    """'float32', 'float16' or 'bfloat16' for a name or torch dtype; WorkbenchError otherwise."""
    for name, storage in STORAGE.items():
        if dtype == name or dtype == storage.torch_dtype:
            return name
    raise WorkbenchError(f"unknown storage dtype {dtype!r}; choose one of {', '.join(STORAGE)}")


# ====================================================================== records
@dataclass(frozen=True)
class RunManifest:
    """What a run holds; saved as `run.json` beside its segments and checked on every resume."""

    model: str  # the model name as given to load_model (a local path is made absolute)
    run: str  # the run name (unique per model)
    sites: tuple[str, ...]  # hook names, in column order
    shapes: dict[str, tuple[int, ...]]  # per-token shape of each site, e.g. (n_heads, d_head) for attn.hook_z
    dtype: str  # storage dtype: float32 | float16 | bfloat16
    context: int  # tokens per sequence (BOS first)
    corpus: str  # "reference", a file path or a hub dataset name[:config]
    split: str  # corpus split the sequences come from
    tokenizer: str  # fingerprint of the tokenizer, so a resume cannot mix token streams
    segment_sequences: int  # sequences per segment file (fixed for the run)
    target_sequences: int  # sequences requested so far (a larger --tokens extends the run)
    exhausted_at: int | None = None  # sequence count where the corpus ran out, if it did
    created: float = field(default_factory=time.time)
    format: int = FORMAT_VERSION

    def width(self, site: str) -> int:
        return int(np.prod(self.shapes[site]))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RunManifest":
        raw = json.loads(text)
        raw["sites"] = tuple(raw["sites"])
        raw["shapes"] = {k: tuple(v) for k, v in raw["shapes"].items()}
        return cls(**raw)


class Segment(NamedTuple):
    """A published segment directory holding sequences [first, end) of a run."""

    first: int
    end: int
    path: Path

    def rows(self, context: int) -> int:
        return (self.end - self.first) * context


@dataclass(frozen=True)
class Run:
    """A run as found on disk: its manifest and its published segments, in sequence order."""

    manifest: RunManifest
    directory: Path
    segments: tuple[Segment, ...]

    @property
    def name(self) -> str:
        return self.manifest.run

    @property
    def sequences(self) -> int:
        return sum(s.end - s.first for s in self.segments)

    @property
    def rows(self) -> int:
        return self.sequences * self.manifest.context

    @property
    def complete(self) -> bool:
        """Every requested sequence (or every one the corpus had) is published."""
        wanted = self.manifest.target_sequences
        if self.manifest.exhausted_at is not None:
            wanted = min(wanted, self.manifest.exhausted_at)
        return self.sequences >= wanted and _contiguous(self.segments)


class ScanBatch(NamedTuple):
    """Rows in store order with their keys (unpacks as `seq_ids, positions, acts`)."""

    seq_ids: Tensor  # [rows] int64
    positions: Tensor  # [rows] int64
    acts: Tensor  # [rows, width]


# ====================================================================== the store
class ActivationStore:
    """Cached activations of a workspace: write with `cache`, read with `batches`, `pairs`, `scan`, `tokens`, `sql`."""

    def __init__(self, workspace: Workspace | str | os.PathLike | None = None):
        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace(workspace)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.workspace.root)!r})"

    # ------------------------------------------------------------------ writing
    def cache(self, model, sites: Sequence[str] | str, n_tokens: int, corpus: str = "reference", context: int = 128,
              dtype: str | torch.dtype = "float32", **options):
        """Run `model` over `n_tokens` tokens of `corpus` and store the activations of `sites`.

        `model` is a TransformerBridge from `load_model` or a model name. Options:
        `run` (name; default derived from corpus, context and dtype), `batch_size`
        (sequences per forward pass), `split`, `segment_tokens`, `progress`.
        Returns a `workbench.caching.CacheResult`. See `workbench.caching`.
        """
        from workbench.caching import cache_activations

        return cache_activations(self, model, sites, n_tokens, corpus=corpus, context=context, dtype=dtype, **options)

    # ------------------------------------------------------------------ what is there
    def runs(self, model: str | None = None) -> list[Run]:
        """Every run in the store (of `model` only, when given), ordered by model then run name."""
        root = self.workspace.store_dir
        if not root.is_dir():
            return []
        wanted = None if model is None else model_name(model)
        found = []
        for manifest_path in sorted(root.glob("*/*/run.json")):
            manifest = read_manifest(manifest_path)
            if wanted is None or manifest.model == wanted:
                found.append(Run(manifest, manifest_path.parent, tuple(list_segments(manifest_path.parent))))
        return found

    def run(self, model, sites: Sequence[str] | str, run: str | None = None) -> Run:
        """The one run of `model` holding all of `sites` (named `run` when given); a clear error otherwise."""
        sites = [sites] if isinstance(sites, str) else list(sites)
        name = model_name(model)
        runs = self.runs(name)
        if run is not None:
            match = [r for r in runs if r.name == run]
            if not match:
                raise WorkbenchError(f"model {name!r} has no cached run {run!r}; {_describe_runs(runs, name)}")
            missing = [s for s in sites if s not in match[0].manifest.sites]
            if missing:
                raise WorkbenchError(f"run {run!r} of {name!r} does not hold {', '.join(missing)}; it holds {', '.join(match[0].manifest.sites)}")
            return match[0]
        holding = [r for r in runs if all(s in r.manifest.sites for s in sites) and r.segments]
        if len(holding) == 1:
            return holding[0]
        if not holding:
            raise WorkbenchError(
                f"no cached activations of {', '.join(sites)} for model {name!r}; {_describe_runs(runs, name)}; "
                f"cache them with `python -m workbench cache --model {name} --sites {','.join(sites)} --tokens N`"
            )
        raise WorkbenchError(
            f"{', '.join(sites)} of {name!r} is cached in several runs ({', '.join(r.name for r in holding)}); pass run=NAME (--run)"
        )

    def catalog(self) -> "pd.DataFrame":
        """One row per (run, site): model, run, site, width, shape, dtype, rows, sequences, context, corpus, ..."""
        import pandas as pd

        rows = [entry for r in self.runs() for entry in catalog_rows(r)]
        columns = list(CatalogEntry._fields)
        return pd.DataFrame(rows, columns=columns)

    def progress(self, model, run: str) -> dict | None:
        """The progress record of the cache job of (model, run), with `alive` saying whether its process still runs."""
        record = self.workspace.read_json(f"jobs/{job_name(model_name(model), run)}.json")
        if record is not None:
            record["alive"] = record.get("status") == "running" and _pid_alive(record.get("pid"))
        return record

    # ------------------------------------------------------------------ streaming
    def batches(self, model, site: str, batch_size: int, *, dtype: torch.dtype = torch.float32, device="cpu",
                shuffle: bool = True, seed: int = 0, buffer_rows: int | None = None, max_rows: int | None = None,
                start_row: int = 0, drop_last: bool = False, run: str | None = None) -> Iterator[Tensor]:
        """One epoch of [batch, width] activation batches of `site` (every selected row exactly once).

        Rows [start_row, start_row + max_rows) of the run's store order are selected.
        `shuffle` draws blocks of `buffer_rows` rows (default: 128 MiB worth; a block
        is memory-mapped while its batches are gathered), each made of 8 windows of consecutive
        rows from random places in the run, in a seeded random order, and emits each
        block's rows in a random permutation (see `workbench.streaming`). Without
        `shuffle`, rows come in store order. Values are converted to `dtype` on
        `device`; per-head sites come flat (reshape with the catalog's `shape`).
        Every batch is a fresh tensor of its own (never a view of the files).
        """
        for (x,) in self._stream([site], batch_size, dtype, device, shuffle, seed, buffer_rows, max_rows, start_row, drop_last, run, model):
            yield x

    def pairs(self, model, site_in: str, site_out: str, batch_size: int, *, dtype: torch.dtype = torch.float32,
              device="cpu", shuffle: bool = True, seed: int = 0, buffer_rows: int | None = None,
              max_rows: int | None = None, start_row: int = 0, drop_last: bool = False,
              run: str | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Like `batches`, for two sites at once: (x_in[batch, w_in], x_out[batch, w_out]) from the same token rows."""
        if site_in == site_out:
            raise WorkbenchError(f"pairs needs two different sites, got {site_in} twice")
        yield from self._stream([site_in, site_out], batch_size, dtype, device, shuffle, seed, buffer_rows, max_rows, start_row, drop_last, run, model)

    def scan(self, model, site: str, batch_rows: int, *, dtype: torch.dtype = torch.float32, device="cpu",
             start_row: int = 0, max_rows: int | None = None, run: str | None = None) -> Iterator[ScanBatch]:
        """Rows of `site` in store order (sequence by sequence), `batch_rows` at a time, with their (seq_id, pos) keys."""
        from workbench import streaming

        _check_positive(batch_rows, "batch_rows")
        dtype, device = _delivery(dtype, device)
        found = self.run(model, [site], run)
        _check_selection(found, start_row, max_rows)
        specs = [(1, None), (1, None), (found.manifest.width(site), STORAGE[found.manifest.dtype])]
        chunks = streaming.ordered_chunks(found, ["seq_id", "pos", site], specs, start_row, max_rows, batch_rows)
        for seq, pos, acts in streaming.rebatch(chunks, batch_rows):
            yield ScanBatch(seq.long(), pos.long(), _deliver(acts, dtype, device))

    def tokens(self, model, seq_ids: Iterable[int] | Tensor, *, run: str | None = None, site: str | None = None) -> Tensor:
        """[len(seq_ids), context] token ids of the given sequences (for context windows around a row).

        With several runs for the model, name the run or a site that picks one.
        """
        ids = torch.as_tensor(seq_ids, dtype=torch.long).reshape(-1)
        found = self._token_run(model, run, site)
        ctx = found.manifest.context
        out = torch.full((len(ids), ctx), -1, dtype=torch.long)
        for seg in found.segments:
            inside = ((ids >= seg.first) & (ids < seg.end)).nonzero().reshape(-1)
            if len(inside):
                out[inside] = _segment_tokens(seg, ids[inside], ctx)
        missing = (out[:, 0] < 0).nonzero().reshape(-1)
        if len(missing):
            raise WorkbenchError(f"sequence(s) {', '.join(str(int(ids[i])) for i in missing[:5])} are not in run {found.name!r} (it holds {found.sequences} sequences)")
        return out

    # ------------------------------------------------------------------ SQL
    @contextlib.contextmanager
    def connect(self, model=None, run: str | None = None, site: str | None = None,
                tables: Iterable[str] | None = None) -> Iterator["duckdb.DuckDBPyConnection"]:
        """A read-only DuckDB connection: the workspace's tables, plus (for a model) the view `activations`.

        `activations(seq_id, pos, token, "<site>" ...)` is the run's rows across its
        segments; float16/bfloat16 sites are decoded to FLOAT arrays. The macros
        `f16(bits)` and `bf16(bits)` decode single raw values. `tables` limits the
        workspace views (as in `Workspace.connect`). Close it promptly: nothing is
        locked while it is open, but it pins the files it attached.
        """
        with self.workspace.connect(tables=tables) as con:
            con.execute(_HALF_MACROS)
            if model is not None:
                found = self._token_run(model, run, site)
                _attach_run(con, found)
            yield con

    def sql(self, query: str, params: list | None = None, *, model=None, run: str | None = None, site: str | None = None,
            tables: Iterable[str] | None = None) -> "pd.DataFrame":
        """Run one query (see `connect` for what it can see) and return a pandas DataFrame."""
        with self.connect(model, run, site, tables) as con:
            try:
                return con.execute(query, params or []).df()
            except Exception as e:
                if type(e).__module__.startswith(("duckdb", "_duckdb")):
                    raise WorkbenchError(f"SQL error: {_one_line(e)}") from e
                raise

    # ------------------------------------------------------------------ internals
    def _stream(self, sites, batch_size, dtype, device, shuffle, seed, buffer_rows, max_rows, start_row, drop_last, run, model):
        from workbench import streaming

        _check_positive(batch_size, "batch_size")
        dtype, device = _delivery(dtype, device)
        found = self.run(model, sites, run)
        storage = STORAGE[found.manifest.dtype]
        specs = [(found.manifest.width(s), storage) for s in sites]
        _check_selection(found, start_row, max_rows)
        if shuffle:
            row_bytes = sum(w * storage.itemsize for w, _ in specs)
            block = buffer_rows if buffer_rows is not None else max(8 * batch_size, BUFFER_BYTES // row_bytes)
            _check_positive(block, "buffer_rows")
            groups = streaming.shuffled_batches(found, list(sites), specs, start_row, max_rows, batch_size, block, seed)
        else:
            groups = streaming.rebatch(streaming.ordered_chunks(found, list(sites), specs, start_row, max_rows, batch_size), batch_size)
        for group in groups:
            if drop_last and len(group[0]) < batch_size:
                return
            yield tuple(_deliver(x, dtype, device) for x in group)

    def _token_run(self, model, run: str | None, site: str | None) -> Run:
        if site is not None:
            return self.run(model, [site], run)
        runs = [r for r in self.runs(model) if run is None or r.name == run]
        if len(runs) == 1:
            return runs[0]
        name = model_name(model)
        if not runs:
            raise WorkbenchError(f"model {name!r} has no cached run{'' if run is None else ' ' + repr(run)}; {_describe_runs(self.runs(name), name)}")
        raise WorkbenchError(f"model {name!r} has several cached runs ({', '.join(r.name for r in runs)}); pass run=NAME")


# ====================================================================== catalog
class CatalogEntry(NamedTuple):
    """One row of the catalog: a site of a run."""

    model: str
    run: str
    site: str
    width: int
    shape: list
    dtype: str
    rows: int
    sequences: int
    context: int
    corpus: str
    split: str
    created: float  # unix time the run started
    updated: float  # unix time of its latest published segment
    complete: bool
    path: str


def catalog_rows(run: Run) -> list[CatalogEntry]:
    m = run.manifest
    updated = max((s.path.stat().st_mtime for s in run.segments if s.path.exists()), default=m.created)
    return [
        CatalogEntry(m.model, m.run, site, m.width(site), list(m.shapes[site]), m.dtype, run.rows, run.sequences,
                     m.context, m.corpus, m.split, m.created, updated, run.complete, str(run.directory))
        for site in m.sites
    ]


# ====================================================================== names and files
def model_name(model) -> str:
    """The name a model is stored under: what load_model was given, with a local path made absolute."""
    from data import BUNDLED_MODELS

    name = model if isinstance(model, str) else getattr(getattr(model, "cfg", None), "model_name", None)
    if not isinstance(name, str) or not name:
        raise WorkbenchError(f"expected a model name or a loaded model, got {model!r}")
    path = Path(name).expanduser()
    if name not in BUNDLED_MODELS and path.exists():
        return str(path.resolve())
    return name


def model_slug(name: str) -> str:
    """A directory name for a model name: readable, and unique (a hash is added when characters were dropped)."""
    slug = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("._-")
    if slug == name and len(slug) <= 48:
        return slug
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{slug[-40:].lstrip('._-')}-{digest}" if slug else digest


def run_key(model: str, run: str) -> str:
    """`<model slug>.<run>.<hash>`: a file-name key for a run, unambiguous even when names contain dots."""
    digest = hashlib.sha1(f"{model}\n{run}".encode()).hexdigest()[:8]
    return f"{model_slug(model)}.{run}.{digest}"


def job_name(model: str, run: str) -> str:
    """The job-lock and progress-file name of the cache job of (model, run)."""
    return f"cache.{run_key(model, run)}"


def run_directory(workspace: Workspace, model: str, run: str) -> Path:
    check_name(run, "run name")
    return workspace.store_dir / model_slug(model) / run


def read_manifest(path: Path) -> RunManifest:
    try:
        manifest = RunManifest.from_json(path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise WorkbenchError(f"{path} is damaged ({_one_line(e)}); restore it or remove the run's directory {path.parent}") from e
    if manifest.format != FORMAT_VERSION:
        raise WorkbenchError(f"run {manifest.run!r} of {manifest.model!r} was cached in store format {manifest.format}; this "
                             f"version reads format {FORMAT_VERSION} (see docs/store.md): remove {path.parent} and cache it again")
    return manifest


_SEGMENT = re.compile(r"^seg-(\d+)-(\d+)$")


def segment_path(directory: Path, first: int, end: int) -> Path:
    return directory / f"seg-{first:09d}-{end:09d}"


def list_segments(directory: Path) -> list[Segment]:
    """Published segments of a run directory, in sequence order (temporary directories are ignored)."""
    found = []
    for path in directory.glob("seg-*"):
        match = _SEGMENT.match(path.name)
        if match and path.is_dir():
            found.append(Segment(int(match[1]), int(match[2]), path))
    return sorted(found)


def site_file(segment_dir: Path, site: str) -> Path:
    """The raw array file of `site` in a segment directory (hook names are file-safe; checked when caching)."""
    return segment_dir / f"{site}.npy"


def read_segment_info(segment: Segment) -> dict:
    """A segment's `segment.json`: first, end, context, dtype, chunk_rows, sites {site: {shape, checksums}}."""
    try:
        info = json.loads((segment.path / "segment.json").read_text())
        if (info["first"], info["end"]) != (segment.first, segment.end) or not isinstance(info["sites"], dict):
            raise ValueError(f"it describes sequences {info['first']}-{info['end'] - 1}")
        return info
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise damaged(segment, e) from e


def site_array(segment: Segment, site: str, info: dict, width: int, storage: "Storage") -> np.ndarray:
    """The [rows, width] array of `site` in `segment`, memory-mapped read-only (no data is read yet)."""
    path = site_file(segment.path, site)
    rows = (segment.end - segment.first) * int(info["context"])
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise unreadable(segment, e, path) from e
    if array.shape != (rows, width) or array.dtype != np.dtype(storage.numpy_dtype):
        raise damaged(segment, ValueError(f"{path.name} holds {array.dtype}{list(array.shape)}, expected "
                                           f"{np.dtype(storage.numpy_dtype)}{[rows, width]}"), path)
    return array


def chunk_checksums(array: np.ndarray, chunk_rows: int = CHUNK_ROWS) -> list[int]:
    """The 64-bit wrapping sum of the raw bytes (as little-endian words, zero-padded) of each `chunk_rows` chunk.

    About 19 GB/s here (a copy runs at about 5): cheap enough to check every chunk a reader touches, and any
    damaged word changes it (unlike a plain float sum, it sees every bit).
    """
    running = RunningChecksums(array.dtype.itemsize * math.prod(array.shape[1:]), chunk_rows)
    running.add(array)
    return running.finish()


TORCH_SUM_BYTES = 64 * 1024  # pieces at least this large are summed by torch (below, its call costs more than it saves)


class RunningChecksums:
    """`chunk_checksums` of rows appended batch by batch (it is also how `chunk_checksums` computes them).

    The cache job's writer feeds it the bytes it stages, so a segment's checksums cost
    no second pass over the finished file. Pieces may end anywhere, inside a chunk, a
    row or an 8-byte word: the bytes of a word split between two pieces are carried over.
    """

    def __init__(self, row_bytes: int, chunk_rows: int = CHUNK_ROWS):
        self.row_bytes, self.chunk_rows = row_bytes, chunk_rows
        self.chunk_bytes = row_bytes * chunk_rows
        self.sums: list[int] = []
        self.total = 0  # running sum of the current chunk's whole words
        self.filled = 0  # bytes of the current chunk so far
        self.carry = b""  # the current chunk's trailing bytes that do not fill a word yet

    def add(self, array: np.ndarray) -> None:
        """Account for `array` [rows, ...] (in its stored form) appended after the previous ones."""
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        if len(raw) != len(array) * self.row_bytes:
            raise ValueError(f"rows of {len(raw) // max(1, len(array))} bytes, expected {self.row_bytes}")
        self.add_bytes(raw)

    def add_bytes(self, raw: np.ndarray) -> None:
        """Account for the raw bytes `raw` (uint8) appended after the previous ones."""
        while len(raw):
            take = min(len(raw), self.chunk_bytes - self.filled)
            self._add_bytes(raw[:take])
            self.filled += take
            raw = raw[take:]
            if self.filled == self.chunk_bytes:
                self._close_chunk()

    def finish(self) -> list[int]:
        """The checksum of every chunk, the last one partial."""
        if self.filled:
            self._close_chunk()
        return self.sums

    def _add_bytes(self, raw: np.ndarray) -> None:
        if self.carry:
            head = bytes(raw[:8 - len(self.carry)])
            self.carry += head
            raw = raw[len(head):]
            if len(self.carry) < 8:
                return
            self.total += int.from_bytes(self.carry, "little")
            self.carry = b""
        whole = len(raw) // 8 * 8
        if whole >= TORCH_SUM_BYTES and raw.flags.writeable:
            # torch's int64 sum wraps like the uint64 one and runs on every intra-op thread: 2.5x numpy's speed on
            # two cores, for the cache job's staged bytes (read-only maps, as when verifying, take numpy's)
            self.total += int(torch.from_numpy(raw[:whole]).view(torch.int64).sum()) % 2**64
        elif whole:
            self.total += int(raw[:whole].view("<u8").sum(dtype=np.uint64))
        self.carry = bytes(raw[whole:])

    def _close_chunk(self) -> None:
        if self.carry:
            self.total += int.from_bytes(self.carry + bytes(8 - len(self.carry)), "little")
        self.sums.append(self.total % 2**64)
        self.total, self.filled, self.carry = 0, 0, b""


@contextlib.contextmanager
def open_segment(segment: Segment) -> Iterator["duckdb.DuckDBPyConnection"]:
    """A read-only view of one published segment's `tokens` table, closed on exit; damage becomes one clear line.

    The file is attached read-only to a private in-memory database (not opened with
    `duckdb.connect(path)`), so a connection the caller's process already holds on
    the same file, whatever its settings, neither blocks nor is disturbed by it.
    """
    import duckdb

    path = segment.path / "tokens.duckdb"
    con = duckdb.connect(":memory:", config=READ_CONFIG)
    try:
        con.execute(f"ATTACH '{sql_path(path)}' AS seg (READ_ONLY)")
        con.execute("USE seg")
        yield con
    except duckdb.Error as e:
        raise unreadable(segment, e, path) from e
    finally:
        con.close()


def unreadable(segment: Segment, error: Exception, path: Path) -> WorkbenchError:
    """The error for a segment file that could not be read: the segment was deleted meanwhile, or it is damaged."""
    return vanished(segment) if not segment.path.exists() else damaged(segment, error, path)


def vanished(segment: Segment) -> WorkbenchError:
    return WorkbenchError(f"segment {segment.path} disappeared while being read (was it deleted?); list the store again")


def damaged(segment: Segment, error: Exception, path: Path | None = None) -> WorkbenchError:
    what = f"segment {segment.path}" + (f" (file {path.name})" if path is not None else "")
    return WorkbenchError(
        f"{what} is damaged ({_one_line(error)}); the other segments are intact: delete the directory "
        f"{segment.path.name} and re-run the same cache command to recompute sequences {segment.first}-{segment.end - 1}"
    )


# ====================================================================== reading
def _selected_rows(run: Run, start_row: int, max_rows: int | None) -> int:
    if start_row < 0 or (max_rows is not None and max_rows < 0):
        raise WorkbenchError(f"start_row and max_rows must be non-negative, got {start_row} and {max_rows}")
    available = max(0, run.rows - start_row)
    return available if max_rows is None else min(available, max_rows)


def _check_selection(run: Run, start_row: int, max_rows: int | None) -> None:
    if _selected_rows(run, start_row, max_rows) == 0:
        raise WorkbenchError(f"no rows selected from run {run.name!r} ({run.rows} rows; start_row={start_row}, max_rows={max_rows})")


def _delivery(dtype: torch.dtype | str, device) -> tuple[torch.dtype, torch.device]:
    """The dtype and device batches are delivered in, checked before anything is read: a floating-point dtype (a
    torch dtype or its name), and a device this process has."""
    from workbench.model import resolve_dtype

    dtype = resolve_dtype(dtype)
    if not dtype.is_floating_point:
        raise WorkbenchError(f"dtype {dtype} is not a floating-point type: activations come as float16, bfloat16, float32 or float64")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise WorkbenchError(f"bad device {device!r}: {_one_line(e)} (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"device {str(device)!r} asked for, but torch sees no CUDA device here; use device='cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise WorkbenchError(f"device {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dtype, device


def _deliver(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`x` as `dtype` on `device` (no copy when it already is)."""
    return x.to(device=device, dtype=dtype, non_blocking=True)


def _segment_tokens(seg: Segment, ids: Tensor, context: int) -> Tensor:
    lo, hi = int(ids.min()), int(ids.max())
    with open_segment(seg) as con:
        table = con.sql(f"SELECT token FROM tokens WHERE seq_id >= {lo} AND seq_id <= {hi} ORDER BY seq_id, pos").to_arrow_table()
    block = torch.from_numpy(table.column(0).to_numpy().astype(np.int64)).view(-1, context)  # [hi - lo + 1, context]
    return block[ids - lo]


# ====================================================================== SQL views
_HALF_MACROS = """
CREATE OR REPLACE TEMP MACRO f16_bits(i) AS CAST(
    CASE WHEN (i >> 10) & 31 = 31 THEN (CASE WHEN i & 1023 = 0 THEN 'inf'::DOUBLE ELSE 'nan'::DOUBLE END)
         WHEN (i >> 10) & 31 = 0 THEN (i & 1023) * pow(2, -24)
         ELSE (1024 + (i & 1023)) * pow(2, ((i >> 10) & 31) - 25) END
    * (CASE WHEN i >> 15 = 1 THEN -1 ELSE 1 END) AS FLOAT);
CREATE OR REPLACE TEMP MACRO f16(b) AS f16_bits(b::INTEGER);
CREATE OR REPLACE TEMP MACRO bf16_bits(i) AS CAST(
    CASE WHEN (i >> 7) & 255 = 255 THEN (CASE WHEN i & 127 = 0 THEN 'inf'::DOUBLE ELSE 'nan'::DOUBLE END)
         WHEN (i >> 7) & 255 = 0 THEN (i & 127) * pow(2, -133)
         ELSE (128 + (i & 127)) * pow(2, ((i >> 7) & 255) - 134) END
    * (CASE WHEN i >> 15 = 1 THEN -1 ELSE 1 END) AS FLOAT);
CREATE OR REPLACE TEMP MACRO bf16(b) AS bf16_bits(b::INTEGER);
"""


def _attach_run(con, run: Run) -> None:
    """Create the view `activations` over every segment of `run`, reading nothing yet: each segment's token file is
    attached read-only and joined by position with its site values, Arrow arrays over the memory-mapped site files
    (registered with the connection, zero copy).

    A segment's `tokens` table is written in one statement from rows in (seq_id, pos) order, the order of its site
    files' rows, and a scan of one table returns rows in the order they were inserted (DuckDB's order preservation),
    so `POSITIONAL JOIN` pairs each token with its activations; the row counts are checked here. Nothing is
    materialised, so opening the view costs about a millisecond a segment and no memory per token (it used to copy
    and sort every token of the run: 0.6 s and 10 bytes a token for a 2M-token run, before any query ran), and a
    filter on seq_id skips the segments whose statistics rule them out."""
    import pyarrow as pa

    m = run.manifest
    storage = STORAGE[m.dtype]
    columns = ["t.seq_id", "t.pos", "t.token"]
    for site in m.sites:
        if m.dtype == "float32":
            columns.append(f"a.{_quote(site)}")
        else:
            decode = "f16" if m.dtype == "float16" else "bf16"
            columns.append(f"list_transform(a.{_quote(site)}, lambda b: {decode}(b))::FLOAT[{m.width(site)}] AS {_quote(site)}")
    if not run.segments:
        raise WorkbenchError(f"run {run.name!r} of {m.model!r} has no published segment yet")
    _allow_open_files(len(run.segments), run)
    parts = []
    for i, seg in enumerate(run.segments):
        info = read_segment_info(seg)
        alias = f"run_segment_{i}"
        rows = _attach_tokens(con, seg, alias)
        sites = {}
        for site in m.sites:
            array = site_array(seg, site, info, m.width(site), storage)
            if len(array) != rows:
                raise damaged(seg, ValueError(f"its token table holds {rows} rows and {site} {len(array)}"), seg.path / "tokens.duckdb")
            values = pa.Array.from_buffers(pa.from_numpy_dtype(array.dtype), array.size, [None, pa.py_buffer(array)])
            sites[site] = pa.FixedSizeListArray.from_arrays(values, m.width(site))
        con.register(f"{alias}_sites", pa.table(sites))
        parts.append(f"SELECT {', '.join(columns)} FROM {alias}.tokens AS t POSITIONAL JOIN {alias}_sites AS a")
    con.execute(f"CREATE OR REPLACE TEMP VIEW activations AS {' UNION ALL '.join(parts)}")


def _attach_tokens(con, seg: Segment, alias: str) -> int:
    """Attach `seg`'s token file read-only to `con` as `alias`; its row count (from the table's metadata)."""
    import duckdb

    path = seg.path / "tokens.duckdb"
    try:
        con.execute(f"ATTACH '{sql_path(path)}' AS {alias} (READ_ONLY)")
        return con.execute(f"SELECT count(*) FROM {alias}.tokens").fetchall()[0][0]
    except duckdb.Error as e:
        raise unreadable(seg, e, path) from e


def _allow_open_files(files: int, run: Run) -> None:
    """Each attached segment holds a file open until the connection closes: raise this process's soft limit on open
    files towards its hard limit when the run needs more than the soft limit leaves free (1024 is a common default,
    about 270M tokens of segments), and say so in one line when even the hard limit is too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = files + 256  # the process's own files, the workspace's attached tables
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return
    if hard != resource.RLIM_INFINITY and wanted > hard:
        raise WorkbenchError(f"run {run.name!r} has {files} segments, and SQL over it keeps each segment's token file open; "
                             f"this process may open {hard} files (raise the hard limit, `ulimit -Hn`, to at least {wanted})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# ====================================================================== small helpers
def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _contiguous(segments: Sequence[Segment]) -> bool:
    return all(a.end == b.first for a, b in itertools.pairwise(segments)) and (not segments or segments[0].first == 0)


def _describe_runs(runs: list[Run], name: str) -> str:
    if not runs:
        return f"nothing is cached for {name!r}"
    return "cached: " + "; ".join(f"run {r.name} ({', '.join(r.manifest.sites)}; {r.rows} rows)" for r in runs)


def _check_positive(value: int, what: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise WorkbenchError(f"{what} must be a positive integer, got {value!r}")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


