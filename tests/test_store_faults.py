"""The store under real faults and real concurrency: killed processes, a reader during a write, a full disk, a corrupt file.

Every check ends with the oracle: the run's rows equal a fresh forward pass over
the same token rows, every sequence present exactly once.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from tests.test_store import expected_tokens, scan_all, write_corpus
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.store import ActivationStore, list_segments
from workbench.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
CTX, BATCH = 32, 4
SITES = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "words.txt", n_docs=120)


def argv(ws: Path, model_dir, corpus, sequences: int, segment_sequences: int) -> list[str]:
    return ["cache", "--workspace", str(ws), "--model", str(model_dir), "--sites", ",".join(SITES),
            "--tokens", str(sequences * CTX), "--corpus", str(corpus), "--context", str(CTX),
            "--batch-size", str(BATCH), "--segment-tokens", str(segment_sequences * CTX), "--json"]


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "workbench", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_in_process(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


def run_dir(ws: Path) -> Path:
    (directory,) = (ws / "store").glob("*/words-ctx32")
    return directory


def wait_for_segments(proc: subprocess.Popen, ws: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the cache job ended (status {proc.returncode}) before {n} segments: {proc.stderr.read()[-1500:]}")
        dirs = list((ws / "store").glob("*/words-ctx32"))
        if dirs and len(list_segments(dirs[0])) >= n:
            return
        time.sleep(0.005)
    raise AssertionError("timed out waiting for segments")


def assert_matches_fresh_forward(model, corpus, ws: Path, sequences: int) -> None:
    """Every sequence 0..n-1 exactly once, tokens as the corpus gives them, values bitwise a fresh forward pass."""
    store = ActivationStore(ws)
    run = store.run(model, SITES)
    assert run.sequences == sequences and run.complete
    assert [s.first for s in run.segments[1:]] == [s.end for s in run.segments[:-1]] and run.segments[0].first == 0
    assert not list(run.directory.glob(".seg-*")), "temporary files left behind"
    tokens = expected_tokens(model, corpus, sequences)
    assert torch.equal(store.tokens(model, torch.arange(sequences)), tokens)
    for site in SITES:
        seq, pos, acts = scan_all(store, model, site, rows=500)
        assert torch.equal(seq, torch.arange(sequences).repeat_interleave(CTX)) and torch.equal(pos, torch.arange(CTX).repeat(sequences))
        expected = []
        with torch.no_grad():
            for seg in run.segments:
                for a in range(seg.first, seg.end, BATCH):
                    _, cache = model.run_with_cache(tokens[a:min(a + BATCH, seg.end)], names_filter=[site])
                    expected.append(cache[site].flatten(0, 1).flatten(1))
        assert torch.equal(acts, torch.cat(expected)), site
    mirrored = Workspace(ws).sql("SELECT count(*) AS n, count(DISTINCT (seq_id, pos)) AS k FROM activation_tokens")
    assert mirrored.iloc[0].tolist() == [sequences * CTX] * 2


def test_resume_after_ctrl_c_and_after_sigkill(tmp_path, model_dirs, tiny_model, corpus):
    """Ctrl-C, then SIGKILL of the resumed job, then the same command once more: every row exactly once."""
    ws, sequences = tmp_path / "ws", 28
    args = argv(ws, model_dirs["gpt2"], corpus, sequences, segment_sequences=2)
    proc = start(args)
    wait_for_segments(proc, ws, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # Ctrl-C: the job stops cleanly, deletes its unfinished segment and says how to resume
    assert proc.returncode == 130 and "interrupted" in err and "re-run" in err, f"status {proc.returncode}: {err[-2000:]}"
    assert not list(run_dir(ws).glob(".seg-*"))
    first = {s.path.name: s.path.stat().st_mtime_ns for s in list_segments(run_dir(ws))}
    assert 2 <= len(first) < sequences // 2, "the interrupt must land mid-run"
    proc = start(args)  # the same command resumes ... and is killed outright
    wait_for_segments(proc, ws, len(first) + 2)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    second = {s.path.name: s.path.stat().st_mtime_ns for s in list_segments(run_dir(ws))}
    assert len(first) + 2 <= len(second) < sequences // 2, "the kill must land mid-run"
    code, err = run_in_process(args)  # and once more, to the end
    assert code == 0, err
    assert_matches_fresh_forward(tiny_model, corpus, ws, sequences)
    after = {s.path.name: s.path.stat().st_mtime_ns for s in list_segments(run_dir(ws))}
    assert all(after[name] == mtime for name, mtime in second.items()), "finished segments must not be rewritten"


def test_reader_open_during_a_write(tmp_path, model_dirs, tiny_model, corpus):
    """A reader (this process) holds a DuckDB connection open and reads continuously while the job writes:
    neither fails, and every read is whole segments that equal the final result."""
    ws, sequences = tmp_path / "ws", 24
    proc = start(argv(ws, model_dirs["gpt2"], corpus, sequences, segment_sequences=2))
    wait_for_segments(proc, ws, 1)
    first = list_segments(run_dir(ws))[0].path
    held = duckdb.connect(str(first / "tokens.duckdb"), read_only=True)  # like an app that never lets go
    store, seen = ActivationStore(ws), []
    try:
        while proc.poll() is None:
            run = store.run(tiny_model, SITES)
            seq, _, acts = scan_all(store, tiny_model, SITES[0], rows=256, run=run.name)
            # the scan lists the segments when it starts: those `run` listed, and any the job published since
            scanned = len(seq) // CTX
            assert len(seq) >= run.rows and run.sequences % 2 == 0 and scanned % 2 == 0  # whole segments only
            assert torch.equal(seq, torch.arange(scanned).repeat_interleave(CTX))
            catalog = Workspace(ws).sql("SELECT DISTINCT rows FROM activation_catalog")
            assert len(catalog) == 1
            seen.append((scanned, acts))
            held.execute("SELECT count(*) FROM tokens").fetchall()
    finally:
        held.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert len({n for n, _ in seen}) >= 3, "the reader should have seen the run grow"
    assert_matches_fresh_forward(tiny_model, corpus, ws, sequences)
    _, _, final = scan_all(store, tiny_model, SITES[0])
    assert all(torch.equal(acts, final[:len(acts)]) for _, acts in seen)


@pytest.mark.parametrize("full_at", ["site file", "token table"])
def test_disk_full_keeps_earlier_data_and_resumes(tmp_path, model_dirs, tiny_model, corpus, full_at):
    """A real file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) on this process,
    reached while a new segment's site files are written, or after them, while its DuckDB token table is."""
    ws = tmp_path / "ws"
    code, err = run_in_process(argv(ws, model_dirs["gpt2"], corpus, 8, segment_sequences=2))
    assert code == 0, err
    store = ActivationStore(ws)
    before = scan_all(store, tiny_model, SITES[1])
    files = {p: p.read_bytes() for p in run_dir(ws).rglob("*") if p.is_file()}
    # extend the run with the limit above every file the job writes before a segment's (the catalog and token
    # mirrors, the progress file) and below one site file, or above the site files and below a token table: the
    # first new segment cannot be written
    mirrors = max(p.stat().st_size for p in ws.rglob("*") if p.is_file() and run_dir(ws) not in p.parents)
    npy = [p.stat().st_size for p in run_dir(ws).rglob("*.npy")]
    duck = min(p.stat().st_size for p in run_dir(ws).rglob("tokens.duckdb"))
    limit = (mirrors + min(npy)) // 2 if full_at == "site file" else (max(npy) + duck) // 2
    assert mirrors < limit < (min(npy) if full_at == "site file" else duck), (mirrors, npy, duck)
    with file_size_limit(limit):
        code, err = run_in_process(argv(ws, model_dirs["gpt2"], corpus, 24, segment_sequences=2))
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("error: disk full") and "re-run" in last, err[-2000:]
    # the new segment's files, not a mirror: while it is written (a full staging buffer), or as it is published
    assert re.search(r"while writing (segment seg-000000008-000000010|the segment from sequence 8 \(\.seg-)", last), last
    assert last.count("disk full") == 1 and last.count("re-run") == 1, last  # said once, not wrapped twice
    assert all(p.read_bytes() == data for p, data in files.items() if p.name != "run.json")
    assert not list(run_dir(ws).glob(".seg-*"))
    after = scan_all(store, tiny_model, SITES[1])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    code, err = run_in_process(argv(ws, model_dirs["gpt2"], corpus, 24, segment_sequences=2))
    assert code == 0, err
    assert_matches_fresh_forward(tiny_model, corpus, ws, 24)


@contextlib.contextmanager
def file_size_limit(limit: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_corrupt_segment_gives_a_clear_error_and_the_rest_stays_readable(tmp_path, model_dirs, tiny_model, corpus):
    ws = tmp_path / "ws"
    args = argv(ws, model_dirs["gpt2"], corpus, 12, segment_sequences=4)
    assert run_in_process(args)[0] == 0
    store = ActivationStore(ws)
    good = scan_all(store, tiny_model, SITES[0])
    segments = list_segments(run_dir(ws))
    bad = segments[1].path
    site_data = bad / f"{SITES[0]}.npy"
    data_offset = np.load(site_data, mmap_mode="r").offset
    with open(site_data, "r+b") as f:  # damage the data (past the header): a few bytes flipped
        f.seek(data_offset + 1000)
        f.write(b"\x12\x34\x56\x78\x9a\xbc\xde\xf0")
    with pytest.raises(WorkbenchError) as e:
        list(store.batches(tiny_model, SITES[0], 64))
    message = str(e.value)
    assert bad.name in message and site_data.name in message and "checksum" in message and "re-run" in message
    assert "\n" not in message
    with pytest.raises(WorkbenchError, match="checksum"):  # in-order reads check too
        scan_all(store, tiny_model, SITES[0])
    rows = segments[0].rows(CTX)  # the segment before it reads back unchanged
    head = scan_all(store, tiny_model, SITES[0], max_rows=rows)
    assert torch.equal(head[2], good[2][:rows])
    tail = scan_all(store, tiny_model, SITES[0], start_row=2 * rows)
    assert torch.equal(tail[2], good[2][2 * rows:])
    assert len(Workspace(ws).sql("SELECT * FROM activation_catalog")) == len(SITES)
    # a damaged header, or a damaged token table, is caught when the job checks its segments
    for damaged_file in (site_data, bad / "tokens.duckdb"):
        original = damaged_file.read_bytes()
        with open(damaged_file, "r+b") as f:
            f.write(b"\0" * 64)
        code, err = run_in_process(args)
        last = err.strip().splitlines()[-1]
        assert code == 1 and bad.name in last and damaged_file.name in last and "delete" in last, err[-2000:]
        damaged_file.write_bytes(original)
    # doing what the message says recomputes exactly the missing sequences
    shutil.rmtree(bad)
    assert run_in_process(args)[0] == 0
    assert_matches_fresh_forward(tiny_model, corpus, ws, 12)


def test_a_write_failing_after_the_segment_finished_leaves_no_temporary_directory(tmp_path, tiny_model, corpus, monkeypatch):
    """A staging buffer's write that fails once its segment has been handed to publishing (the writer thread was
    behind) skips the publishing; the job must still delete that segment's temporary directory, and resume after.

    Oracle: the run directory's listing, and a fresh forward pass after the re-run. Staging buffers are made small
    so a segment's values need several writes, and every write waits until the segment has finished."""
    import errno
    import threading

    import workbench.caching as caching

    store = ActivationStore(tmp_path / "ws")
    kwargs = dict(corpus=str(corpus), context=CTX, batch_size=BATCH, segment_tokens=4 * CTX, progress=False)
    store.cache(tiny_model, SITES, 4 * CTX, **kwargs)
    finished = threading.Event()
    real_finish = caching.SegmentWriter.finish

    def finish(self, *args):
        real_finish(self, *args)
        finished.set()

    def full_disk(self, stage, length, offset):
        try:
            assert finished.wait(30), "the segment never finished"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        finally:
            self.pool.give(stage)

    monkeypatch.setattr(caching, "STAGE_BYTES", 2 * caching.SiteFile.ALIGN)  # 4 sequences: 4 pages a site
    monkeypatch.setattr(caching.SegmentWriter, "finish", finish)
    monkeypatch.setattr(caching.SiteFile, "write", full_disk)
    with pytest.raises(WorkbenchError, match="disk full") as e:
        store.cache(tiny_model, SITES, 12 * CTX, **kwargs)
    assert "re-run" in str(e.value)
    segments = store.run(tiny_model, SITES).segments
    assert [(s.first, s.end) for s in segments] == [(0, 4)]
    assert not list(segments[0].path.parent.glob(".seg-*"))
    monkeypatch.undo()
    store.cache(tiny_model, SITES, 12 * CTX, **kwargs)
    assert_matches_fresh_forward(tiny_model, corpus, tmp_path / "ws", 12)


def test_a_wait_interrupted_by_ctrl_c_still_waits_for_the_writer(tmp_path, monkeypatch):
    """Ctrl-C inside `SegmentWriter.wait` must not mark the writer finished while its thread still works.

    Oracle: the thread's own record of finishing. With `Thread.join` (Python 3.11's interrupted-join handler marks a
    running thread stopped), the second wait returned at once and the CLI exited mid-publish with SIGABRT."""
    import threading

    from workbench.caching import SegmentWriter
    from workbench.store import RunManifest

    manifest = RunManifest("m", "r", ("x",), {"x": (4,)}, "float32", 8, "random", "all", "-", 2, 2)
    release, finished = threading.Event(), []

    def slow_publish(*args):
        release.wait()
        finished.append(True)

    writer = SegmentWriter(tmp_path, 0, manifest)
    monkeypatch.setattr(writer, "_publish", slow_publish)
    writer.append(0, torch.zeros((1, 8), dtype=torch.long), {"x": torch.zeros((1, 8, 4))})
    writer.finish(tmp_path / "seg-000000000-000000001", 0, 1, after=lambda table: None)
    main = threading.main_thread().ident  # a real SIGINT, so the blocked wait wakes as under a real Ctrl-C
    threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        writer.wait()
    assert not finished
    threading.Timer(0.3, release.set).start()
    writer.wait()
    assert finished == [True] and writer.done.is_set()
    writer.abort()  # the temporary directory goes
    assert not list(tmp_path.glob(".seg-*"))
