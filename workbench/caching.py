"""Caching activations into the store, and the `cache` command.

    python -m workbench cache --model M --sites blocks.0.hook_resid_post,blocks.0.attn.hook_z --tokens 1M

What one cache job does (the layout and the reading side are in `workbench.store`):

1. Check the request: known per-token sites (`check_sites` lists the valid ones),
   a positive token count, a context the model accepts, a storage dtype. The run
   name defaults to one derived from the corpus, split, context and dtype.
2. Take the job lock of (model, run), so two jobs never write one run.
3. Reconcile with the run's manifest: a new run writes one; an existing run must
   hold the same sites with the same shapes (a width that changed means a
   different model under the same name: refused), dtype, context, corpus and
   tokenizer; a larger token count extends it.
4. Tidy what a killed job left: temporary segment directories are deleted (they
   were never visible); every published segment's description, token table and
   site-file headers are checked against what its name promises;
   the workspace mirrors (catalog and token shards) are rewritten to match.
5. Stream token rows from the corpus in their fixed order, skip the sequences
   already published (checking that the last of them still tokenizes the same),
   and fill each missing range segment by segment: a forward pass per batch of
   sequences with one capture hook per site and `stop_at_layer` past the deepest
   site. Each hook copies its activation, converted to the storage dtype, into the
   job's page-aligned staging buffers while it is still in the CPU's caches,
   refuses non-finite values (naming the site and rows) and sums the chunk
   checksums on the way (no second pass); a writer thread writes each full buffer
   to the segment's raw site files in a private temporary directory with O_DIRECT
   (no page-cache copy), overlapping the forward pass.
   A full segment gets its headers, checksums, token table and
   description, is fsynced and renamed into place (while the next segment is being
   computed); then its token shard, the catalog shard and the progress JSON follow.
6. A corpus shorter than asked for is said so on stderr; what it had is cached.

Interrupting (Ctrl-C, SIGKILL, a full disk) loses at most the segment in flight:
re-running the same command resumes there, with no row duplicated or missing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import itertools
import json
import math
import mmap
import os
import queue
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.errors import one_line as _one_line
from workbench.store import (
    CATALOG_TABLE,
    STORAGE,
    TOKENS_TABLE,
    Storage,
    ActivationStore,
    RunManifest,
    CHUNK_ROWS,
    RunningChecksums,
    Segment,
    catalog_rows,
    job_name,
    list_segments,
    model_name,
    open_segment,
    read_manifest,
    run_directory,
    read_segment_info,
    run_key,
    segment_path,
    site_array,
    site_file,
    storage_name,
)
from workbench.workspace import atomic_write_text, check_name, sql_path

if TYPE_CHECKING:
    import pyarrow as pa
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_CONTEXT = 128
DEFAULT_BATCH = 32  # sequences per forward pass
SEGMENT_BYTES = 256 * 2**20  # activation bytes per segment file (the unit of resume)
# and at most this many tokens per segment: its token ids are held until it is published, and publishing (the Arrow
# rows, the DuckDB token table, the Parquet shard) takes memory in proportion (about 27 MiB at a million tokens, the
# size SEGMENT_BYTES alone gave a model caching 64 values a token), so narrow sites no longer make a job's memory
# grow with the tokens cached up to that size
SEGMENT_MAX_TOKENS = 2**18
PROGRESS_EVERY = 1.0  # seconds between progress-file updates


@dataclass(frozen=True)
class CacheResult:
    """What a cache job did; `rows` and `sequences` count the whole run, `new_rows` this job's share."""

    model: str
    run: str
    sites: tuple[str, ...]
    rows: int
    sequences: int
    new_rows: int
    segments: int
    dtype: str
    context: int
    corpus: str
    split: str
    complete: bool
    short: bool  # the corpus ran out before the requested tokens
    seconds: float
    path: str
    message: str

    def summary(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def cache_activations(store: ActivationStore, model, sites: Sequence[str] | str, n_tokens: int, *,
                      corpus: str = "reference", context: int = DEFAULT_CONTEXT, dtype: str | torch.dtype = "float32",
                      run: str | None = None, batch_size: int = DEFAULT_BATCH, split: str | None = None,
                      segment_tokens: int | None = None, progress: bool = True, device=None) -> CacheResult:
    """Cache `n_tokens` (rounded up to whole sequences of `context`) of `corpus` through `model` at `sites`."""
    from data.corpus import source_kind
    from workbench.model import load_model, site_info

    sites = _parse_sites(sites)
    _check_count(n_tokens, "the number of tokens to cache (--tokens)")
    _check_count(batch_size, "batch_size")
    if segment_tokens is not None:
        _check_count(segment_tokens, "segment_tokens (--segment-tokens)")
    storage = storage_name(dtype)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(str(model), device=device)
    _check_context(model, context)
    infos = site_info(model, sites)
    corpus = _canonical_corpus(corpus)
    if split is not None and split != default_split(corpus) and source_kind(corpus) == "file":
        raise WorkbenchError(f"a local corpus file is read whole and has no splits (got split {split!r}); "
                             "hold out a part with a file of its own, or with start_row when reading")
    split = split or default_split(corpus)
    run = run or default_run_name(corpus, context, storage, split)
    if len(check_name(run, "run name")) > 50:
        raise WorkbenchError(f"run name {run!r} is longer than 50 characters")
    name = model_name(model)
    shapes = {s: tuple(infos[s].shape) for s in sites}
    row_bytes = sum(infos[s].width for s in sites) * STORAGE[storage].itemsize
    per_segment = max(1, (segment_tokens or min(SEGMENT_BYTES // row_bytes, SEGMENT_MAX_TOKENS)) // context)
    wanted = RunManifest(name, run, tuple(sites), shapes, storage, context, corpus, split, tokenizer_fingerprint(model.tokenizer),
                         per_segment, math.ceil(n_tokens / context))
    try:
        with store.workspace.job_lock(job_name(name, run)):
            job = _CacheJob(store, model, wanted, batch_size, progress, segment_tokens_given=segment_tokens is not None)
            return job.execute()
    except Exception as e:
        if _is_interrupt(e):  # Ctrl-C that landed inside a DuckDB call comes back as DuckDB's own error
            raise KeyboardInterrupt from e
        raise


def _canonical_corpus(corpus: str) -> str:
    """A local corpus file as an absolute path (so `notes.txt` and `./notes.txt` name one run); others unchanged."""
    from data.corpus import source_kind

    if not isinstance(corpus, str) or not corpus:
        raise WorkbenchError(f"corpus must be 'reference', a file path or a dataset name, got {corpus!r}")
    return str(Path(corpus).expanduser().resolve()) if source_kind(corpus) == "file" else corpus


def default_split(corpus: str) -> str:
    from data.corpus import source_kind

    return "all" if source_kind(corpus) == "file" else "train"


def default_run_name(corpus: str, context: int, dtype: str, split: str) -> str:
    """`reference`, `<file stem>` or `<dataset>`, with the split, context and dtype appended when not the defaults."""
    from data.corpus import source_kind

    kind = source_kind(corpus)
    base = {"reference": "reference", "file": Path(corpus).stem}.get(kind) or corpus.split("/")[-1]
    parts = [re.sub(r"[^A-Za-z0-9_.\-]+", "-", base).strip("._-")[:40] or "corpus"]
    if split != default_split(corpus):
        parts.append(split)
    if context != DEFAULT_CONTEXT:
        parts.append(f"ctx{context}")
    if dtype != "float32":
        parts.append(dtype)
    return "-".join(parts)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what the tokenizer does to a probe text, so a resume cannot splice two token streams."""
    probe = "def f(x):\n    return x + 1  # Mary and John went to the store in 1987; ünïcode, 中文."
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    blob = json.dumps([type(tokenizer).__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, ids])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ====================================================================== one job
class _CacheJob:
    """One cache job on one run, run under the run's job lock."""

    def __init__(self, store: ActivationStore, model: "TransformerBridge", wanted: RunManifest, batch_size: int, progress: bool,
                 segment_tokens_given: bool = False):
        from workbench.model import stop_layer

        self.store, self.model, self.batch_size, self.show_progress = store, model, batch_size, progress
        self.segment_tokens_given = segment_tokens_given  # asked for a segment size (a stored run keeps its own)
        self.workspace = store.workspace
        self.directory = run_directory(self.workspace, wanted.model, wanted.run)
        self.manifest = self._reconcile(wanted)
        self.stop = stop_layer(model, list(self.manifest.sites))
        self.started = time.time()
        self.new_rows = 0
        self.bar = None
        self.last_report = 0.0
        self.writers: list[SegmentWriter] = []  # every live writer, registered before its thread starts (see `_compute`)

    def execute(self) -> CacheResult:
        m = self.manifest
        self._tidy()
        segments = self._verify_published()
        self._refresh_mirrors(segments)
        pieces = _missing_pieces(segments, _wanted_sequences(m), m.segment_sequences)
        if not pieces:
            short = m.exhausted_at is not None and m.exhausted_at < m.target_sequences
            return self._result(segments, short=short, message="already cached; nothing to do" + (
                f" (corpus {m.corpus!r} holds only {m.exhausted_at * m.context:,} tokens)" if short else ""))
        before = [s for s in segments if s.end <= pieces[0][0]]
        check = before[-1] if before else None
        self._report("running", segments)
        try:
            exhausted_at = self._compute(pieces, check)
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) or _is_interrupt(e) else "failed"
            self._report(status, list_segments(self.directory), message=_one_line(e))
            if self.created and not list_segments(self.directory):
                self._discard_new_run()
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
        segments = list_segments(self.directory)
        message, short = "", False
        if exhausted_at is not None:
            self.manifest = replace(self.manifest, exhausted_at=exhausted_at)
            _write_manifest(self.directory, self.manifest)
            self._write_catalog(segments)
            if exhausted_at < m.target_sequences:
                short = True
                message = (f"corpus {m.corpus!r} ({m.split}) holds only {exhausted_at * m.context:,} tokens "
                           f"({exhausted_at:,} sequences of {m.context}), fewer than the {m.target_sequences * m.context:,} "
                           "requested; cached what there is")
                print(f"warning: {message}", file=sys.stderr)
        self._report("done", segments, message=message)
        return self._result(segments, short, message)

    # ------------------------------------------------------------------ manifest
    def _reconcile(self, wanted: RunManifest) -> RunManifest:
        """The manifest this job works to: the wanted one for a new run, the stored one (maybe extended) otherwise."""
        self._check_widths(wanted)
        path = self.directory / "run.json"
        self.created = not path.exists()
        if self.created:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_manifest(self.directory, wanted)
            return wanted
        stored = read_manifest(path)
        for field_name, label in (("sites", "sites"), ("dtype", "dtype"), ("context", "context"), ("corpus", "corpus"),
                                  ("split", "split"), ("tokenizer", "tokenizer")):
            old, new = getattr(stored, field_name), getattr(wanted, field_name)
            if (sorted(old) != sorted(new)) if field_name == "sites" else (old != new):  # sites in any order
                raise WorkbenchError(
                    f"run {stored.run!r} of {stored.model!r} was cached with {label} {_show(old)}, not {_show(new)}; "
                    f"repeat its settings to resume or extend it, or pass --run NAME to start another run"
                )
        if self.segment_tokens_given and wanted.segment_sequences != stored.segment_sequences:
            print(f"warning: run {stored.run!r} keeps its segments of {stored.segment_sequences * stored.context:,} tokens "
                  f"(--segment-tokens applies to a new run)", file=sys.stderr)
        published = sum(s.end - s.first for s in list_segments(self.directory))
        target = max(wanted.target_sequences, published)
        if target != stored.target_sequences:
            stored = replace(stored, target_sequences=target)
            _write_manifest(self.directory, stored)
        return stored

    def _check_widths(self, wanted: RunManifest) -> None:
        """Refuse a site whose per-token shape differs from any table already cached for this model."""
        for other in self.store.runs(wanted.model):
            for site, shape in wanted.shapes.items():
                old = other.manifest.shapes.get(site)
                if old is not None and tuple(old) != tuple(shape):
                    raise WorkbenchError(
                        f"site {site} of model {wanted.model!r} is already cached with width {int(np.prod(old))} "
                        f"(shape {list(old)}, run {other.name!r}) but this model gives width {int(np.prod(shape))} "
                        f"(shape {list(shape)}): is it a different model under the same name? remove {other.directory} "
                        "or load the model under another name"
                    )

    def _discard_new_run(self) -> None:
        """Remove a run this job created and could not fill (no segment): it never held data."""
        shard = self.workspace.tables_dir / CATALOG_TABLE / f"{run_key(self.manifest.model, self.manifest.run)}.parquet"
        shard.unlink(missing_ok=True)
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # the model directory, when this was its only run
            self.directory.parent.rmdir()
            self.workspace.store_dir.rmdir()

    # ------------------------------------------------------------------ tidying and checking
    def _tidy(self) -> None:
        """Delete the temporary files a killed job left (never visible to readers)."""
        for leftover in self.directory.glob(".seg-*"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        key = re.escape(run_key(self.manifest.model, self.manifest.run))
        for table in (TOKENS_TABLE, CATALOG_TABLE):
            folder = self.workspace.tables_dir / table
            if folder.is_dir():
                for leftover in folder.glob(".*.tmp"):
                    if re.match(rf"^\.{key}\.", leftover.name):
                        leftover.unlink(missing_ok=True)

    def _verify_published(self) -> list[Segment]:
        """Check every published segment holds the rows and sites its name promises (headers only: the data's
        checksums are checked by every reader, chunk by chunk, as it reads)."""
        segments = list_segments(self.directory)
        m = self.manifest
        for a, b in itertools.pairwise(segments):
            if b.first < a.end:
                raise WorkbenchError(f"segments {a.path.name} and {b.path.name} overlap; remove the one you did not expect")
        for seg in segments:
            info = read_segment_info(seg)
            with open_segment(seg) as con:
                (count,) = con.execute("SELECT count(*) FROM tokens").fetchone()
            if count != seg.rows(m.context) or list(info["sites"]) != list(m.sites):
                raise WorkbenchError(
                    f"segment {seg.path} holds {count} rows of {list(info['sites'])}, expected {seg.rows(m.context)} of "
                    f"{list(m.sites)}; delete it and re-run the same command to recompute it"
                )
            for site in m.sites:
                site_array(seg, site, info, m.width(site), STORAGE[m.dtype])
        return segments

    def _refresh_mirrors(self, segments: list[Segment]) -> None:
        """Make the workspace's token shards and catalog shard match the published segments."""
        key = run_key(self.manifest.model, self.manifest.run)
        folder = self.workspace.tables_dir / TOKENS_TABLE
        expected = {f"{key}.{s.first:09d}-{s.end:09d}.parquet": s for s in segments}
        pattern = re.compile(rf"^{re.escape(key)}\.\d+-\d+\.parquet$")
        if folder.is_dir():
            for shard in folder.glob("*.parquet"):
                if pattern.match(shard.name) and shard.name not in expected:
                    shard.unlink(missing_ok=True)
        for shard_name, seg in expected.items():
            if not (folder / shard_name).exists():
                self._write_token_shard(seg)
        self._write_catalog(segments)

    # ------------------------------------------------------------------ computing
    def _compute(self, pieces: list[tuple[int, int]], check: Segment | None) -> int | None:
        """Fill `pieces` (sequence ranges) from the corpus; return where the corpus ran out, or None.

        A finished segment is published by its writer's thread while the next one is
        computed; at most one segment is publishing at a time.
        """
        self._open_bar(sum(b - a for a, b in pieces) * self.manifest.context)
        writer: SegmentWriter | None = None
        publishing: SegmentWriter | None = None
        batch: list[list[int]] = []
        # a segment filling and one publishing (which gives its buffers back as it writes them) share these
        m = self.manifest
        most = max(b - a for a, b in pieces) * m.context * max(m.width(s) for s in m.sites) * STORAGE[m.dtype].itemsize
        self.stages = stage_pool(len(m.sites), extra=1, most=most + NPY_HEADER_BYTES)
        TokenTables.shared()  # opened before the first forward pass: opening it trims the heap (see TokenTables)
        try:
            for piece, i, row in self._wanted_rows(pieces, check):
                writer = writer or SegmentWriter(self.directory, piece[0], self.manifest, self.writers, self.stages)
                batch.append(row)
                end_of_piece = i == piece[1] - 1
                if len(batch) == self.batch_size or end_of_piece:
                    self._forward_and_write(writer, i + 1 - len(batch), batch)
                    batch = []
                if end_of_piece:
                    publishing, writer = self._publish(writer, publishing, piece[0], piece[1]), None
            if writer is not None:  # the corpus ended inside a piece: publish what it had
                if batch:
                    self._forward_and_write(writer, i + 1 - len(batch), batch)
                publishing, writer = self._publish(writer, publishing, piece[0], i + 1), None
            if publishing is not None:
                publishing, last = None, publishing
                last.wait()
            return self.exhausted_at
        finally:
            # No writer thread may outlive the job, whatever line a Ctrl-C lands on (inside a writer's
            # constructor, between `_publish` and the assignment of its result, inside a wait): a writer still
            # running when the interpreter shut down took the process down with SIGABRT (see `SegmentWriter.wait`).
            for w in self.writers:
                if w.finishing:  # a complete segment: let it land (it is whole or not there at all)
                    try:
                        w.wait()
                    except Exception:  # a write queued before its publishing failed, so it never published:
                        w.abort()  # delete what it left (abort only removes files once the thread is through)
                else:
                    w.abort()

    def _wanted_rows(self, pieces: list[tuple[int, int]], check: Segment | None) -> Iterator[tuple[tuple[int, int], int, list[int]]]:
        """(piece, i, row) for each sequence i inside `pieces`, cut from the corpus in its fixed order.

        Sequences before a piece are skipped (they are published); those of `check`
        are compared with what it stores. Sets `exhausted_at` when the corpus ends first.
        """
        from data.corpus import documents, token_chunks

        m = self.manifest
        todo = iter(pieces)
        piece = next(todo)
        recheck: list[list[int]] | None = [] if check is not None else None
        self.exhausted_at = None
        # Tokenized inline, between forward passes (`encoded_documents` hands a fast tokenizer groups of documents,
        # which its own thread pool spreads over the cores while torch's threads wait). A thread of its own feeding
        # rows beside the forward pass is slower: on two cores its tokenizing competes with torch's two threads, and
        # every forward region waits for the slower of them (cache / bare forward 1.70 against 1.36 inline, A/B in
        # one process, 2026-11-24).
        rows = token_chunks(self.model.tokenizer, documents(m.corpus, m.split), m.context, limit=pieces[-1][1])
        yield from self._walk(rows, todo, piece, check, recheck)

    def _walk(self, rows, todo, piece, check, recheck):
        m = self.manifest
        seen = 0
        for i, row in enumerate(rows):
            seen = i + 1
            if recheck is not None and check.first <= i < check.end:
                recheck.append(row)
                if i == check.end - 1:
                    self._check_tokens(check, recheck)
                    recheck = None
            if i >= piece[0]:
                yield piece, i, row
                if i == piece[1] - 1 and (piece := next(todo, None)) is None:
                    return
        if recheck is not None:
            raise WorkbenchError(f"corpus {m.corpus!r} now yields {seen} sequences, fewer than run {m.run!r} already holds: "
                                 "it changed since the run started; pass --run NAME to cache it as a new run")
        if seen == 0:
            raise WorkbenchError(f"corpus {m.corpus!r} ({m.split}) yields no complete sequence of {m.context} tokens")
        self.exhausted_at = seen

    def _forward_and_write(self, writer: "SegmentWriter", first_seq: int, rows: list[list[int]]) -> None:
        m = self.manifest
        tokens = torch.tensor(rows, dtype=torch.long)  # [batch, pos]
        writer.begin(first_seq, tokens)
        capture(self.model, tokens, m.sites, STORAGE[m.dtype].torch_dtype, self.stop, sink=writer.put)
        writer.end()
        self.new_rows += tokens.numel()
        self.bar.update(tokens.numel())
        if time.monotonic() - self.last_report > PROGRESS_EVERY:
            self._report("running", None)

    def _check_tokens(self, seg: Segment, rows: list[list[int]]) -> None:
        with open_segment(seg) as con:
            stored = con.execute("SELECT token FROM tokens ORDER BY seq_id, pos").fetchnumpy()["token"]
        if not np.array_equal(np.asarray(stored, dtype=np.int64), np.asarray(rows, dtype=np.int64).reshape(-1)):
            raise WorkbenchError(
                f"corpus {self.manifest.corpus!r} no longer gives the tokens stored in {seg.path.name}: it changed since "
                "the run started; pass --run NAME to cache it as a new run"
            )

    def _publish(self, writer: "SegmentWriter", publishing: "SegmentWriter | None", first: int, end: int) -> "SegmentWriter":
        """Hand `writer` its publishing (in its own thread) once the previous segment has landed; return it."""
        if publishing is not None:
            publishing.wait()
            self.writers.remove(publishing)  # landed: the job need not hold it (nor its segment's tokens) any longer
        final = segment_path(self.directory, first, end)

        def after(table: "pa.Table") -> None:  # runs in the writer's thread, right after the rename
            segments = list_segments(self.directory)
            self._write_token_shard(next(s for s in segments if s.path == final), table)
            self._write_catalog(segments)
            self._report("running", segments)

        writer.finish(final, first, end, after)
        return writer

    # ------------------------------------------------------------------ mirrors and progress
    def _write_token_shard(self, seg: Segment, table: "pa.Table | None" = None) -> None:
        """Mirror a segment's tokens as a Parquet shard (from its `tokens_table`, else read back from the segment)."""
        m = self.manifest
        if table is None:
            with open_segment(seg) as con:
                table = con.sql("SELECT seq_id, pos, token FROM tokens ORDER BY seq_id, pos").to_arrow_table()
        # model and run are one value per shard: dictionary columns built from zeros (4 bytes a row), not a
        # Python list of a million references encoded afterwards (about 100 MB at a million rows, at the peak)
        table = table.add_column(0, "model", _constant_column(m.model, table.num_rows))
        table = table.add_column(1, "run", _constant_column(m.run, table.num_rows))
        shard = f"{run_key(m.model, m.run)}.{seg.first:09d}-{seg.end:09d}"
        _guard_disk(lambda: self.workspace.append_rows(TOKENS_TABLE, table, shard=shard), f"token shard {shard}")

    def _write_catalog(self, segments: list[Segment]) -> None:
        import pandas as pd

        from workbench.store import Run

        rows = catalog_rows(Run(self.manifest, self.directory, tuple(segments)))
        frame = pd.DataFrame(rows, columns=rows[0]._fields)
        key = run_key(self.manifest.model, self.manifest.run)
        _guard_disk(lambda: self.workspace.append_rows(CATALOG_TABLE, frame, shard=key), "the catalog")

    def _open_bar(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="tok", unit_scale=True, file=sys.stderr, disable=None if self.show_progress else True,
                        desc=f"cache {self.manifest.run}", dynamic_ncols=True)

    def _report(self, status: str, segments: list[Segment] | None, message: str = "") -> None:
        """Replace the job's progress file atomically (the app polls it)."""
        m = self.manifest
        if segments is None:
            segments = list_segments(self.directory)
        done = sum(s.end - s.first for s in segments) * m.context
        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.new_rows / elapsed
        target = _wanted_sequences(m) * m.context
        record = {
            "job": "cache", "model": m.model, "run": m.run, "sites": list(m.sites), "status": status,
            "pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "updated": time.time(),
            "rows_published": done, "rows_target": target, "rows_this_job": self.new_rows, "segments": len(segments),
            "tokens_per_second": rate, "eta_seconds": (target - done) / rate if rate > 0 and status == "running" else None,
            "message": message,
        }
        self.last_report = time.monotonic()
        path = f"jobs/{job_name(m.model, m.run)}.json"
        try:
            self.workspace.write_json(path, record)
        except OSError as e:  # progress is advisory: a full disk must not turn a finished job into a failure
            print(f"warning: could not update {path}: {_one_line(e)}", file=sys.stderr)

    def _result(self, segments: list[Segment], short: bool, message: str) -> CacheResult:
        from workbench.store import Run

        m = self.manifest
        found = Run(m, self.directory, tuple(segments))
        return CacheResult(m.model, m.run, m.sites, found.rows, found.sequences, self.new_rows, len(segments), m.dtype,
                           m.context, m.corpus, m.split, found.complete, short, round(time.time() - self.started, 3),
                           str(self.directory), message)


# ====================================================================== forward pass and rows
class _AllCaptured(Exception):
    """Raised by the last capture hook of a forward pass: nothing after it is needed."""


def capture(model: "TransformerBridge", tokens: Tensor, sites: Sequence[str], dtype: torch.dtype, stop: int | None,
            sink: "Callable[[str, Tensor], None] | None" = None) -> dict[str, Tensor]:
    """{site: [batch, pos, *shape] activations as `dtype`} from one forward pass that ends at the last site's hook.

    Each hook copies its activation (converted to `dtype`) and leaves the forward pass unchanged. With `sink`,
    each hook hands its activation to `sink(site, x)` instead (which must copy what it keeps) and nothing is returned:
    the cache job's writer copies it straight into its staging buffers while it is still in the CPU's caches.

    The pass ends as soon as every site has been captured (the last hook raises, as TransformerLens's own
    `stop_at_layer` does from a block): `stop_at_layer` cannot stop before the final layer norm and unembedding
    when a site is in the last block, and computing logits nobody reads cost a `[batch, pos, d_vocab]` tensor per
    batch (54 MB at batch 64 for a tiny model of 1647 tokens; far more for a real vocabulary). `stop` is still
    passed, for a model whose hooks would not fire in the order of the layers.
    """
    captured: dict[str, Tensor] = {}
    waiting = set(sites)

    def hook_for(site: str):
        def hook(x, hook):
            if sink is not None:
                sink(site, x.detach())
            else:
                captured[site] = x.detach().to(dtype, copy=True, memory_format=torch.contiguous_format)
            waiting.discard(site)
            if not waiting:
                raise _AllCaptured

        return hook

    with torch.no_grad():
        try:
            model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=[(s, hook_for(s)) for s in sites], stop_at_layer=stop)
        except _AllCaptured:
            pass
    return captured


def check_finite(site: str, values: Tensor, first_seq: int, context: int, dtype: str) -> None:
    """Refuse NaN/inf activations, naming the site and the first offending (seq_id, pos) rows.

    `values` is [rows, ...] in the storage dtype (float16 past ±65504 is already inf there).
    """
    bad = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    rows = torch.nonzero(bad).reshape(-1).tolist()
    if not rows:
        return
    where = ", ".join(f"(seq {first_seq + r // context}, pos {r % context})" for r in rows[:5])
    hint = " (float16 holds at most ±65504: use --dtype bfloat16 or float32)" if dtype == "float16" else ""
    last = first_seq + (len(values) - 1) // context
    raise WorkbenchError(f"refusing to cache NaN/inf activations at {site} in {len(rows)} row(s) of the batch of sequences "
                         f"{first_seq}-{last} (the job stops at the first such batch): {where}{' ...' if len(rows) > 5 else ''}{hint}")


def _constant_column(value: str, rows: int) -> "pa.DictionaryArray":
    import pyarrow as pa

    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([value], pa.string()))


def tokens_table(first_seq: int, tokens: np.ndarray) -> "pa.Table":
    """The Arrow token rows of int32 `tokens` [sequences, context]: seq_id, pos, token."""
    import pyarrow as pa

    batch, ctx = tokens.shape
    return pa.table({
        "seq_id": pa.array(np.repeat(np.arange(first_seq, first_seq + batch, dtype=np.int32), ctx)),
        "pos": pa.array(np.tile(np.arange(ctx, dtype=np.int16), batch)),
        "token": pa.array(tokens.reshape(-1)),
    })


class TokenTables:
    """Writes segments' token tables (`tokens.duckdb`), each through one in-memory DuckDB connection: the file is
    attached, filled from the Arrow rows, checkpointed and detached.

    A fresh `duckdb.connect` per segment cost 29 ms of CPU (14 ms of it creating and closing the database
    instance), taken from the forward pass's cores by the writer thread; attaching the file to a connection already
    open costs 12 ms for the same file. The files are ordinary DuckDB databases either way. Used by one writer
    thread at a time (a lock makes sure).

    Cache jobs share one instance per process (`shared`), opened before a job's first forward pass and kept open:
    DuckDB calls glibc's `malloc_trim(0)` when a database instance starts and when it closes, which hands back every
    free page of the process's heaps, so the forward pass's temporaries (kept for reuse, see
    `workbench/allocator.py`) were faulted in again after the first segment's publishing (about 40k faults) and
    after the job (in whatever ran next).
    """

    _shared: "TokenTables | None" = None
    _shared_lock = threading.Lock()

    def __init__(self):
        self.con = None
        self.pid = os.getpid()
        self.lock = threading.Lock()

    @classmethod
    def shared(cls) -> "TokenTables":
        """The process's token-table writer, its connection open (a forked child makes its own)."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared.pid != os.getpid():
                cls._shared = cls()
            tables = cls._shared
        tables.open()
        return tables

    def open(self) -> None:
        with self.lock:
            self._connect()

    def _connect(self) -> None:  # with the lock held
        import duckdb

        if self.con is None:
            self.con = duckdb.connect(":memory:", config={"threads": 1})

    def write(self, path: Path, table: "pa.Table") -> None:
        with self.lock:
            self._connect()
            try:
                self.con.execute(f"ATTACH '{sql_path(path)}' AS segment_tokens")
                self.con.from_arrow(table).create("segment_tokens.tokens")
                self.con.execute("CHECKPOINT segment_tokens")
                self.con.execute("DETACH segment_tokens")
            except BaseException:  # (disk full, ...) let go of the file whatever state it is in; the next write starts afresh
                con, self.con = self.con, None
                with contextlib.suppress(Exception):
                    con.close()
                raise


# ====================================================================== the segment writer
# Fixed, so the header can be written last, once the row count is known; one page, so the rows start page-aligned
# (direct writes need that; segments written before used 128 bytes, and every reader takes the size from the header).
NPY_HEADER_BYTES = 4096


def npy_header(dtype: np.dtype, rows: int, width: int) -> bytes:
    """A `.npy` (format 1.0) header for a C-order [rows, width] array, space-padded to NPY_HEADER_BYTES."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (rows, width)})
    body = text.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise WorkbenchError(f"a segment of {rows} rows is too large for its file header")
    body += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def anonymous_map(size: int, populate: bool = False) -> mmap.mmap:
    """`size` bytes of private anonymous memory, outside malloc's heaps: its pages are faulted in as they are first
    written (all of them at once with `populate`) and go back to the kernel when the map is closed or collected.
    (`mmap.mmap(-1, size)` alone maps shared memory, which the kernel keeps as shmem; for file descriptor -1 Python
    adds `MAP_ANONYMOUS` itself.)"""
    if hasattr(mmap, "MAP_PRIVATE"):
        populating = getattr(mmap, "MAP_POPULATE", 0) if populate else 0
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | populating)
    return mmap.mmap(-1, size)


class Stage:
    """A page-aligned staging buffer (an anonymous `mmap`, faulted in when made), with byte views for numpy and torch."""

    def __init__(self, size: int):
        self.size = size
        self.buffer = anonymous_map(size, populate=True)
        self.numpy = np.frombuffer(self.buffer, dtype=np.uint8)
        self.torch = torch.from_numpy(self.numpy)


class StagePool:
    """The staging buffers of one cache job, shared by its segments' site files and reused all job long (a buffer
    the process has touched once costs nothing more; fresh anonymous pages cost a fault each, and on this project's
    virtual machines the host's backing of them too). `take` waits for a buffer a writer thread gives back."""

    def __init__(self, count: int, size: int):
        self.size = size
        self.free: queue.Queue = queue.LifoQueue()  # the buffer given back last is the likeliest still in the caches
        for _ in range(count):
            self.free.put(Stage(size))

    def take(self, check: "Callable[[], None]") -> Stage:
        while True:
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                check()  # a writer thread that failed gives its buffers back, but say why at once

    def give(self, stage: Stage) -> None:
        self.free.put(stage)


STAGE_BYTES = 4 * 2**20  # the most a staging buffer holds
STAGE_BUDGET = 64 * 2**20  # all of a job's staging buffers together, however many sites it caches
STAGES_PER_SITE = 3  # one being filled, one being written, one spare


def stage_pool(sites: int, extra: int = 0, most: int | None = None) -> StagePool:
    """`STAGES_PER_SITE + extra` staging buffers per site, of at most `STAGE_BYTES` each and `STAGE_BUDGET` in all
    (whole pages; at least 16 of them), and none larger than `most` bytes (rounded up to whole pages, at least two)
    when given: the most one site file of the job will hold, its header included, so a small job's pool is small.

    Every buffer is faulted in when the pool is made. A buffer's pages used to be faulted in the first time it was
    taken, and with buffers handed out last-in first-out a job took more of them only when its writer fell behind
    (while a segment published, say), so the job's resident memory rose by up to the pool's size over its first few
    hundred thousand tokens (RssAnon +23 MiB between 100k and 1M tokens in a traced run of the bench's tiny model);
    the pool is now the job's from its first batch, and a job that stages all its buffers pays the same faults."""
    count = (STAGES_PER_SITE + extra) * sites
    size = min(STAGE_BYTES, max(16 * SiteFile.ALIGN, STAGE_BUDGET // count // SiteFile.ALIGN * SiteFile.ALIGN))
    if most is not None:
        size = min(size, max(2, -(-most // SiteFile.ALIGN)) * SiteFile.ALIGN)
    return StagePool(count, size)


class SiteFile:
    """One new site file: rows are copied into page-aligned staging buffers (in the thread that calls `put`), and
    each full buffer is written by the segment's writer thread with `O_DIRECT`, bypassing the page cache, where the
    filesystem allows.

    Why: on this project's virtual machines a buffered write to a page-cache page the guest has not touched before
    costs about 2.5 ms of kernel time per MB, and even reused pages cost a copy plus writeback, all on the cores the
    forward pass needs (measured: 786 MB written buffered took 1.97 s of system time the first time and 0.18 s plus a
    0.33 s fsync after; with `O_DIRECT`, 0.02 s of system time and nothing left to sync). Direct writes need a
    page-aligned buffer, file offset and length: buffers are whole pages and written whole, the file's first
    `NPY_HEADER_BYTES` (one page) are zeros until `finish` writes the header there, and the last partial page is
    padded and the file truncated back to its true length. Where `O_DIRECT` is refused (at open or at a write: some
    network filesystems) the same writes go through the page cache.

    `put` also sums the chunk checksums and tests finiteness on the staged bytes, while they are in the CPU's caches.
    """

    ALIGN = 4096  # a page: covers 512-byte and 4096-byte logical blocks

    def __init__(self, path: Path, pool: StagePool, storage: "Storage", checksums: RunningChecksums, submit):
        self.path, self.pool, self.storage, self.checksums, self.submit = path, pool, storage, checksums, submit
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self.fd = os.open(path, flags | direct)
            self.direct = bool(direct)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.open(path, flags), False
        self.stage: Stage | None = None
        self.fill = NPY_HEADER_BYTES  # bytes of the current stage in use (the header's placeholder first)
        self.offset = 0  # the file offset of the current stage's first byte (always page-aligned)

    def put(self, x: Tensor, check) -> bool:
        """Stage `x` (any shape, any device; converted to the storage dtype) after the rows before; False if a value
        is not finite (the caller finds which). `check()` raises a writer thread's error while waiting for a buffer."""
        flat = x.reshape(-1)
        item = self.storage.itemsize
        finite, done = True, 0
        while done < len(flat):
            if self.stage is None:
                self.stage = self.pool.take(check)
                if self.offset == 0:
                    self.stage.torch[:NPY_HEADER_BYTES] = 0
            n = min(len(flat) - done, (self.stage.size - self.fill) // item)
            staged = self.stage.torch[self.fill:self.fill + n * item].view(self.storage.torch_dtype)
            staged.copy_(flat[done:done + n])
            finite = finite and bool(torch.isfinite(staged.sum(dtype=torch.float32)))  # a NaN or inf makes it non-finite
            self.checksums.add_bytes(self.stage.numpy[self.fill:self.fill + n * item])
            self.fill += n * item
            done += n
            if self.fill == self.stage.size:
                self.submit(("write", self, self.stage, self.fill, self.offset))
                self.stage, self.offset, self.fill = None, self.offset + self.fill, 0
        return finite

    def write(self, stage: Stage, length: int, offset: int) -> None:
        """(writer thread) Write `length` bytes of `stage` at `offset`, then give the buffer back."""
        try:
            self._pwrite(memoryview(stage.buffer)[:length], offset)
        finally:
            self.pool.give(stage)

    def finish(self, header: bytes) -> None:
        """(writer thread, after every `write`) Write what is staged, truncate to the true length, write the header
        over the placeholder, fsync, close."""
        size = self.offset + self.fill
        staged, stage, self.stage = self.stage is not None, self.stage, None
        if stage is None:  # nothing staged past the last full buffer (or only the header's placeholder): one for the header
            stage = self.pool.take(lambda: None)
        try:
            if staged:
                pad = -self.fill % self.ALIGN
                stage.torch[self.fill:self.fill + pad] = 0
                self._pwrite(memoryview(stage.buffer)[:self.fill + pad], self.offset)
            os.ftruncate(self.fd, size)
            stage.torch[:NPY_HEADER_BYTES] = 0  # the header's page, written from the same buffer
            stage.numpy[:len(header)] = np.frombuffer(header, dtype=np.uint8)
            self._pwrite(memoryview(stage.buffer)[:NPY_HEADER_BYTES], 0)
            os.fsync(self.fd)
        finally:
            self.pool.give(stage)
        self.close()

    def close(self) -> None:
        if self.stage is not None:
            stage, self.stage = self.stage, None
            self.pool.give(stage)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        while len(data):
            try:
                n = os.pwrite(self.fd, data, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # the filesystem took O_DIRECT at open but refuses the writes
                continue
            if n == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            data, offset = data[n:], offset + n
            if len(data) and n % self.ALIGN:
                self._buffered()  # a short write left the offset unaligned: finish through the page cache

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False


class SegmentWriter:
    """Writes one segment: a batch's activations are staged as the forward pass produces them (`begin`, `put` from
    the capture hooks, `end`; or `append` with whole tensors), and a background thread writes the full staging
    buffers to the raw site files of a private temporary directory, then (on `finish`) writes the headers,
    checksums, token table and description, fsyncs and renames the directory into place.

    Staging is one copy per value, done where the value is hot in the CPU's caches, and tests finiteness and sums
    the checksums on the way; file writes release the GIL, so the thread's writing overlaps the forward pass, and
    publishing a segment overlaps computing the next one. Memory is bounded by the job's staging buffers. An
    interrupted segment leaves only a temporary directory, which the next job deletes.
    """

    def __init__(self, directory: Path, first: int, manifest: RunManifest, registry: list | None = None,
                 pool: StagePool | None = None):
        self.tmp = directory / f".seg-{first:09d}.{uuid.uuid4().hex[:8]}.tmp"
        self.label = f"the segment from sequence {first} ({self.tmp.name})"  # for errors before it is published
        self.finishing = False  # set once `finish` has queued the publishing and the end of the queue
        self.manifest = manifest
        self.storage = STORAGE[manifest.dtype]
        self.pool = pool or stage_pool(len(manifest.sites))
        # The segment's token ids, for its token table and shard: one buffer for the whole segment (its pages are
        # touched only as rows arrive), not a small tensor kept per batch. Those stayed alive for the whole segment
        # between the forward pass's large temporaries and fragmented the heap, so the job's memory crept up with
        # the tokens cached. The buffer is mapped outside malloc's heap too: with the workbench's malloc settings
        # (no block is mmapped) a block made and freed once a segment landed between the forward pass's
        # temporaries in the main heap.
        self.first = first
        ids = anonymous_map(manifest.segment_sequences * manifest.context * 4)
        self.token_ids = np.frombuffer(ids, dtype=np.int32).reshape(manifest.segment_sequences, manifest.context)
        self.rows = 0
        self.error: BaseException | None = None
        self.files: dict[str, SiteFile] = {}
        self.batch: tuple[int, Tensor] | None = None  # (first_seq, tokens) of the batch being staged
        self.staged: set[str] = set()  # sites of the current batch already put
        self.queue: queue.Queue = queue.Queue()
        itemsize = self.storage.itemsize
        self.checksums = {site: RunningChecksums(manifest.width(site) * itemsize) for site in manifest.sites}
        try:
            self.tmp.mkdir()
            for site in manifest.sites:
                self.files[site] = SiteFile(site_file(self.tmp, site), self.pool, self.storage, self.checksums[site],
                                            self.queue.put)
        except BaseException as e:
            self._remove_files()
            raise _disk_error(e, self.label) or e
        self.done = threading.Event()  # set by the thread on its way out (see `wait`)
        self.thread = threading.Thread(target=self._work, name="segment-writer", daemon=True)
        if registry is not None:
            registry.append(self)  # before the thread exists, so whoever registered it can always stop it
        self.thread.start()

    def append(self, first_seq: int, tokens: Tensor, acts: dict[str, Tensor]) -> None:
        """Stage one batch: `tokens` [batch, pos] and, per site, activations [batch, pos, ...] (any dtype, any device)."""
        self.begin(first_seq, tokens)
        for site in self.manifest.sites:
            self.put(site, acts[site])
        self.end()

    def begin(self, first_seq: int, tokens: Tensor) -> None:
        """Start a batch of sequences `first_seq ...` with token ids `tokens` [batch, pos]; `put` its sites, then `end`."""
        self._raise_error()
        at = first_seq - self.first
        if not 0 <= at <= len(self.token_ids) - len(tokens):
            raise WorkbenchError(f"sequences {first_seq}..{first_seq + len(tokens)} fall outside the segment starting at {self.first}")
        self.batch = (first_seq, tokens)
        self.staged = set()

    def put(self, site: str, x: Tensor) -> None:
        """Stage the activations [batch, pos, ...] of `site` for the current batch (the capture hooks call this)."""
        if self.batch is None or site in self.staged:
            raise WorkbenchError(f"{site}: activations arrived outside a batch, or twice in one")
        first_seq, tokens = self.batch
        if x.shape[:2] != tokens.shape:
            raise WorkbenchError(f"{site}: activations of shape {list(x.shape)} for {list(tokens.shape)} tokens")
        self.staged.add(site)
        if not self.files[site].put(x, self._raise_error):  # the sum says some value is not finite (or it overflowed)
            check_finite(site, x.to(self.storage.torch_dtype).flatten(0, 1), first_seq, self.manifest.context,
                         self.manifest.dtype)

    def end(self) -> None:
        """Finish the current batch: every site must have been put."""
        first_seq, tokens = self.batch
        missing = [s for s in self.manifest.sites if s not in self.staged]
        if missing:
            raise WorkbenchError(f"no activations arrived for {', '.join(missing)} (is the site after stop_at_layer?)")
        at = first_seq - self.first
        self.token_ids[at:at + len(tokens)] = tokens.numpy()
        self.rows += tokens.numel()
        self.batch = None

    def finish(self, final: Path, first: int, end: int, after) -> None:
        """Queue the publishing of this segment as `final`, then `after(table)` (its `tokens_table`); returns at once (see `wait`)."""
        self._raise_error()
        self.queue.put(("publish", final, first, end, after))
        self.queue.put(None)
        self.finishing = True  # only now: a writer interrupted before this is aborted, which also ends its thread

    def wait(self) -> None:
        """Block until the writer's thread is done; raise what went wrong there, if anything.

        Waits on `done`, not `Thread.join`: a Ctrl-C that interrupts `join` on Python 3.11 marks the thread
        stopped while it still runs (threading's bpo-45274 handler releases the lock the running thread holds),
        so every later `join` returned at once and the process could exit with the writer in the middle of
        publishing; it then died of SIGABRT ("terminate called without an active exception"), not status 130.
        """
        self.done.wait()
        self._raise_error()

    def abort(self) -> None:
        """Stop, close and delete the temporary directory; the published segments are untouched."""
        self.error = self.error or _Aborted()
        if self.thread.ident is not None and not self.done.is_set():  # started and not yet through
            self.queue.put(None)
            self.done.wait()
        self._remove_files()

    def _work(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                if self.error is not None:
                    if item[0] == "write":
                        self.pool.give(item[2])  # drain, giving the buffers back: the main thread will see the error
                    continue
                try:
                    if item[0] == "write":
                        item[1].write(*item[2:])
                    else:
                        self._publish(*item[1:])
                except BaseException as e:  # handed to the main thread at its next put, finish or wait
                    self.error = e
        finally:
            self.done.set()

    def _publish(self, final: Path, first: int, end: int, after) -> None:
        m = self.manifest
        try:
            sites = {}
            for site, f in self.files.items():
                f.finish(npy_header(np.dtype(self.storage.numpy_dtype), self.rows, m.width(site)))
                sites[site] = {"shape": list(m.shapes[site]), "width": m.width(site), "checksums": self.checksums[site].finish()}
            table = tokens_table(first, self.token_ids[:end - first])
            TokenTables.shared().write(self.tmp / "tokens.duckdb", table)
            info = {"format": 2, "model": m.model, "run": m.run, "first": first, "end": end, "context": m.context,
                    "dtype": m.dtype, "chunk_rows": CHUNK_ROWS, "rows": self.rows, "sites": sites, "created": time.time()}
            with open(self.tmp / "segment.json", "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            for leftover in self.tmp.glob("tokens.duckdb.wal"):
                leftover.unlink()
            _fsync_dir(self.tmp)
        except BaseException as e:
            self._remove_files()
            raise _disk_error(e, f"segment {final.name}") or e
        os.replace(self.tmp, final)
        _fsync_dir(final.parent)
        after(table)

    def _remove_files(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(Exception):
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _raise_error(self) -> None:
        if self.error is not None and not isinstance(self.error, _Aborted):
            raise _disk_error(self.error, self.label) or self.error


class _Aborted(Exception):
    """Marks a writer stopped on purpose (its thread then only drains the queue)."""


# ====================================================================== planning
def _wanted_sequences(m: RunManifest) -> int:
    return m.target_sequences if m.exhausted_at is None else min(m.target_sequences, m.exhausted_at)


def _missing_pieces(segments: list[Segment], target: int, per_segment: int) -> list[tuple[int, int]]:
    """Sequence ranges below `target` that no published segment covers, cut into pieces of at most `per_segment`."""
    gaps, cursor = [], 0
    for seg in segments:
        if seg.first > cursor:
            gaps.append((cursor, min(seg.first, target)))
        cursor = max(cursor, seg.end)
    gaps.append((cursor, target))
    pieces = []
    for a, b in gaps:
        pieces += [(s, min(s + per_segment, b)) for s in range(a, b, per_segment)]
    return pieces


# ====================================================================== checks and helpers
def _parse_sites(sites: Sequence[str] | str) -> list[str]:
    listed = [s.strip() for s in (sites.split(",") if isinstance(sites, str) else sites)]
    listed = [s for s in listed if s]
    if not listed:
        raise WorkbenchError("no sites given; pass hook names such as blocks.0.hook_resid_post (comma-separated)")
    odd = [s for s in listed if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", s)]
    if odd:
        raise WorkbenchError(f"site name(s) {', '.join(map(repr, odd))} are not hook names (letters, digits, '_', '.' and '-' only)")
    repeated = sorted({s for s in listed if listed.count(s) > 1})
    if repeated:
        raise WorkbenchError(f"site(s) listed twice: {', '.join(repeated)}")
    return listed


def _check_count(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise WorkbenchError(f"{what} must be a positive whole number, got {value!r}")


def _check_context(model, context: int) -> None:
    _check_count(context, "context")
    if context < 2:
        raise WorkbenchError(f"context must be at least 2 tokens (BOS plus one), got {context}")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and context > n_ctx:
        raise WorkbenchError(f"context {context} is longer than the {n_ctx} positions {model.cfg.model_name} accepts; pass --context {n_ctx} or less")


def _write_manifest(directory: Path, manifest: RunManifest) -> None:
    _guard_disk(lambda: atomic_write_text(directory / "run.json", manifest.to_json()), f"{directory / 'run.json'}")


def _is_interrupt(e: BaseException) -> bool:
    """DuckDB turns a Ctrl-C that arrives during a query into its own exception instead of KeyboardInterrupt."""
    import duckdb

    return isinstance(e, duckdb.InterruptException) or (isinstance(e, RuntimeError) and "Query interrupted" in str(e))


def _disk_error(e: BaseException, what: str) -> WorkbenchError | None:
    """A one-line WorkbenchError when `e` is the disk filling up (or a file-size limit), else None (also when `e` is
    one already: a writer thread's error is worded there and raised again in the main thread)."""
    if isinstance(e, WorkbenchError):
        return None
    text = str(e)
    codes = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if (isinstance(e, OSError) and e.errno in codes) or any(s in text for s in ("No space left", "File too large", "Disk quota")):
        return WorkbenchError(
            f"disk full (or file-size limit reached) while writing {what}: {_one_line(e)}; the segments published "
            "before are intact and readable: free space and re-run the same command to resume"
        )
    return None


def _guard_disk(write, what: str):
    try:
        return write()
    except Exception as e:
        raise _disk_error(e, what) or e


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _show(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else repr(value)


# ====================================================================== the command
def configure_cache(parser: argparse.ArgumentParser) -> None:
    from workbench.model import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or local HF directory (default {DEFAULT_MODEL})")
    parser.add_argument("--sites", required=True, help="comma-separated hook names, e.g. blocks.0.hook_resid_post,blocks.0.attn.hook_z")
    parser.add_argument("--tokens", required=True, type=token_count, help="tokens to cache, e.g. 100000, 100k, 2M (rounded up to whole sequences)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--corpus", default=None, help="'reference' (default: Python's own sources and docs) or a local .txt/.jsonl/.parquet file")
    source.add_argument("--dataset", default=None, help="a Hugging Face dataset NAME[:CONFIG] (hub, or the local datasets cache offline)")
    parser.add_argument("--split", default=None, help="corpus split (reference: train, heldout or all; hub: a split name)")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help=f"tokens per sequence, BOS first (default {DEFAULT_CONTEXT})")
    parser.add_argument("--dtype", default="float32", choices=list(STORAGE), help="storage dtype (default float32)")
    parser.add_argument("--run", default=None, help="run name (default: derived from corpus, split, context and dtype)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"sequences per forward pass (default {DEFAULT_BATCH})")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    parser.add_argument("--model-dtype", default=None, choices=list(STORAGE), help="dtype the model runs in (default float32)")
    parser.add_argument("--segment-tokens", type=token_count, default=None, help="tokens per segment file, the unit of resume (default: about 256 MiB of activations)")


def run_cache(args: argparse.Namespace) -> dict:
    from data.corpus import source_kind
    from workbench.model import load_model

    if args.dataset is not None and source_kind(args.dataset) != "hub":
        raise WorkbenchError(f"--dataset takes a Hugging Face dataset name; for the local file {args.dataset!r} use --corpus")
    corpus = args.dataset or args.corpus or "reference"
    model = load_model(args.model, device=args.device, dtype=args.model_dtype)
    store = ActivationStore(args.workspace)
    result = store.cache(model, args.sites, args.tokens, corpus=corpus, context=args.context, dtype=args.dtype, run=args.run,
                         batch_size=args.batch_size, split=args.split, segment_tokens=args.segment_tokens)
    return result.summary()


def token_count(text: str) -> int:
    """'100000', '100k', '2.5M', '1G' -> an integer count (argparse type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 100000, 100k or 2M)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match[2].lower()]
    count = round(float(match[1]) * scale)
    if count <= 0:
        raise argparse.ArgumentTypeError(f"not a positive token count: {text!r} (use e.g. 100000, 100k or 2M)")
    return count
