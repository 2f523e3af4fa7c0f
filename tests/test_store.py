"""The activation store against its oracle: a fresh forward pass over the same token rows.

One tiny GPT-2 run (five sites, several segments) is cached once per module;
each test reads it back a different way. Float32 rows must equal
`run_with_cache` bitwise; 16-bit rows must equal the same forward pass cast.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import numpy as np
import pytest
import torch

from data.corpus import documents, token_chunks
from workbench.errors import WorkbenchError
from workbench.store import ActivationStore
from workbench.workspace import Workspace

CTX, BATCH, SEGMENT_SEQS, SEQS = 32, 8, 16, 44
SITES = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.ln2.hook_normalized", "blocks.0.mlp.hook_post",
         "blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]
WORDS = ("the", "store", "Mary", "John", "went", "gave", "a", "drink", "to", "def", "return", "class", "import",
         "when", "afterwards", "year", "17", "self", "value", "(", ")", ":", ",", ".")


def write_corpus(path, n_docs: int = 60, seed: int = 0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def expected_tokens(model, corpus, n: int, context: int = CTX) -> torch.Tensor:
    rows = []
    for row in token_chunks(model.tokenizer, documents(str(corpus)), context):
        rows.append(row)
        if len(rows) == n:
            break
    return torch.tensor(rows)


def fresh_forward(model, tokens: torch.Tensor, sites, run) -> dict[str, torch.Tensor]:
    """The oracle: run_with_cache over the same token rows, batched as the cache job batches them
    (batches start at segment starts), flattened to [rows, width]."""
    out = {s: [] for s in sites}
    with torch.no_grad():
        for seg in run.segments:
            for start in range(seg.first, seg.end, BATCH):
                batch = tokens[start:min(start + BATCH, seg.end)]
                _, cache = model.run_with_cache(batch, names_filter=lambda name: name in sites)
                for s in sites:
                    out[s].append(cache[s].reshape(batch.numel(), -1))
    return {s: torch.cat(v) for s, v in out.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "words.txt")


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_model, corpus):
    store = ActivationStore(tmp_path_factory.mktemp("store") / "ws")
    result = store.cache(tiny_model, SITES, SEQS * CTX - 5, corpus=str(corpus), context=CTX, batch_size=BATCH,
                         segment_tokens=SEGMENT_SEQS * CTX, progress=False)
    run = store.run(tiny_model, SITES)
    tokens = expected_tokens(tiny_model, corpus, SEQS)
    return store, result, run, tokens, fresh_forward(tiny_model, tokens, SITES, run)


def scan_all(store, model, site, rows=100, **kw):
    parts = list(store.scan(model, site, rows, **kw))
    return tuple(torch.cat(p) for p in zip(*parts))


def test_round_trip_equals_fresh_forward_bitwise(cached, tiny_model):
    store, result, run, tokens, oracle = cached
    assert result.rows == SEQS * CTX and result.sequences == SEQS and result.complete and not result.short
    assert [(s.first, s.end) for s in run.segments] == [(0, 16), (16, 32), (32, 44)]
    assert torch.equal(store.tokens(tiny_model, torch.arange(SEQS)), tokens)
    for site in SITES:
        seq, pos, acts = scan_all(store, tiny_model, site)
        assert torch.equal(seq, torch.arange(SEQS).repeat_interleave(CTX)) and torch.equal(pos, torch.arange(CTX).repeat(SEQS))
        assert acts.dtype == torch.float32 and torch.equal(acts, oracle[site]), site


def test_per_head_site_keeps_its_shape(cached, tiny_model):
    store, _, _, _, oracle = cached
    catalog = store.catalog().set_index("site")
    z = catalog.loc["blocks.0.attn.hook_z"]
    n_heads, d_head = tiny_model.cfg.n_heads, tiny_model.cfg.d_head
    assert list(z["shape"]) == [n_heads, d_head] and z["width"] == n_heads * d_head
    _, _, acts = scan_all(store, tiny_model, "blocks.0.attn.hook_z")
    head = 2  # row-major flattening: head h is columns [h * d_head, (h + 1) * d_head)
    torch.testing.assert_close(acts.view(-1, n_heads, d_head)[:, head], oracle["blocks.0.attn.hook_z"].view(-1, n_heads, d_head)[:, head], rtol=0, atol=0)


class RowIndex:
    """Oracle rows by value; rows that repeat (position 0 holds the same BOS activation in every sequence) get
    their indices handed out one by one, so an epoch that covers every row exactly once empties the index."""

    def __init__(self, rows: torch.Tensor):
        self.free: dict[bytes, list[int]] = {}
        for i, row in enumerate(rows):
            self.free.setdefault(row.numpy().tobytes(), []).append(i)
        self.free_all = {k: list(v) for k, v in self.free.items()}

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.free[row.numpy().tobytes()].pop(0) for row in batch])

    def empty(self) -> bool:
        return not any(self.free.values())


def test_sites_share_keys_and_pairs_line_up(cached, tiny_model):
    """Transcoder pairs: every (x_in, x_out) in a shuffled epoch is the same token row of both sites."""
    store, _, _, _, oracle = cached
    mlp_in, mlp_out = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    keys = [scan_all(store, tiny_model, s)[:2] for s in SITES]
    assert all(torch.equal(k[0], keys[0][0]) and torch.equal(k[1], keys[0][1]) for k in keys)
    for target in (mlp_out, "blocks.0.mlp.hook_post"):  # same width, and 4x wider
        index = RowIndex(oracle[mlp_in])
        for x_in, x_out in store.pairs(tiny_model, mlp_in, target, 50, buffer_rows=300, seed=3):
            assert x_out.shape[1] == oracle[target].shape[1]
            assert torch.equal(x_out, oracle[target][index.take(x_in)])
        assert index.empty()
    # the residual stream leaving block 0 is the one entering block 1: same rows, same values, same shuffle
    post = store.batches(tiny_model, "blocks.0.hook_resid_post", 64, seed=5)
    pre = store.batches(tiny_model, "blocks.1.hook_resid_pre", 64, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(post, pre, strict=True))


def test_shuffled_epoch_covers_every_row_exactly_once(cached, tiny_model):
    store, _, _, _, oracle = cached
    site = "blocks.0.hook_resid_post"
    n = SEQS * CTX

    def epoch(**kw):
        index = RowIndex(oracle[site])
        batches = list(store.batches(tiny_model, site, 64, **kw))
        rows = torch.cat([index.take(b) for b in batches])
        return batches, rows, index

    batches, rows, index = epoch(buffer_rows=200, seed=1)
    assert index.empty() and torch.equal(rows.sort().values, torch.arange(n))
    assert [len(b) for b in batches] == [64] * (n // 64) + ([n % 64] if n % 64 else [])
    assert not torch.equal(rows, torch.arange(n))
    again = torch.cat(list(store.batches(tiny_model, site, 64, buffer_rows=200, seed=1)))
    assert torch.equal(again, torch.cat(batches))  # seeded: the same epoch again
    assert not torch.equal(torch.cat(list(store.batches(tiny_model, site, 64, buffer_rows=200, seed=2))), again)
    # a buffer of 200 rows bounds the mixing: a block is 8 pieces of 25 consecutive rows of a segment taken from
    # random places, so a batch draws from at most 2 blocks (16 pieces), and from several places at once
    seg_rows = SEGMENT_SEQS * CTX
    piece = (rows // seg_rows) * 1000 + (rows % seg_rows) // 25
    unique = torch.tensor([len(index.free_all[oracle[site][r].numpy().tobytes()]) == 1 for r in rows])  # repeated rows are ambiguous
    spread = [len(set(piece[i:i + 64][unique[i:i + 64]].tolist())) for i in range(0, n, 64)]
    assert max(spread) <= 16 and min(spread[:-1]) >= 3, spread
    # the default buffer holds this whole run: one full permutation
    assert epoch()[2].empty()
    # row selection and drop_last
    _, part, index = epoch(start_row=100, max_rows=500, buffer_rows=128, seed=4)
    once = {i for i in range(n) if len(index.free_all[oracle[site][i].numpy().tobytes()]) == 1}
    assert len(part) == 500 and set(part.tolist()) & once == set(range(100, 600)) & once
    full, kept, _ = epoch(drop_last=True, buffer_rows=200)
    assert all(len(b) == 64 for b in full) and len(kept) == n // 64 * 64
    # in order: exactly the store order
    ordered = torch.cat(list(store.batches(tiny_model, site, 100, shuffle=False)))
    assert torch.equal(ordered, oracle[site])


@pytest.mark.parametrize("threads", [1, 3])
def test_shuffled_batches_do_not_depend_on_the_reader_threads(cached, tiny_model, monkeypatch, threads):
    """Workers gather whole batches at once and map the next block while this one is gathered: the batches must
    be exactly those the reading thread makes alone (`READ_THREADS` 1), in the same order, for one site and for
    aligned pairs, whatever the workers' number and the read-ahead."""
    import workbench.streaming as streaming

    store = cached[0]
    a, b = "blocks.0.hook_resid_post", "blocks.0.attn.hook_z"  # widths 32 and 4 x 8: the pair's copies differ in size

    def epoch():
        return (list(store.batches(tiny_model, a, 48, buffer_rows=300, seed=3)),
                list(store.pairs(tiny_model, a, b, 48, buffer_rows=300, seed=3)))

    monkeypatch.setattr(streaming, "READ_THREADS", 1)
    alone = epoch()
    monkeypatch.setattr(streaming, "READ_THREADS", threads)
    for in_flight in (1, 4, 50):
        monkeypatch.setattr(streaming, "IN_FLIGHT", in_flight)
        shared = epoch()
        assert len(alone[0]) == len(shared[0]) and all(torch.equal(x, y) for x, y in zip(alone[0], shared[0]))
        assert len(alone[1]) == len(shared[1]) and all(torch.equal(x, y) for p, q in zip(alone[1], shared[1]) for x, y in zip(p, q))


def test_batch_memory_is_used_again_only_once_nothing_holds_the_batch(cached, tiny_model, monkeypatch):
    """A consumer that keeps some batches, views of others and numpy arrays over others while dropping the rest:
    what it kept still equals an epoch whose batches were all kept (so none was written over), and the blocks of
    dropped batches were handed out again (else this test would show nothing). Blocks of 300 rows do not hold a
    whole number of 16-row batches, so every block boundary asks for two short parts: an epoch that keeps nothing
    makes about as many blocks as the reader keeps, however many shapes it asks for and however long it is."""
    import workbench.streaming as streaming

    store = cached[0]
    site = "blocks.0.hook_resid_post"
    reference = list(store.batches(tiny_model, site, 16, buffer_rows=300, seed=7))
    made = []  # every block the readers make, held here so that their ids stay distinct
    empty = np.empty

    def counted(shape, dtype=float):
        made.append(empty(shape, dtype))
        return made[-1]

    monkeypatch.setattr(streaming.np, "empty", counted)
    for x in store.batches(tiny_model, site, 16, buffer_rows=300, seed=7):
        pass  # an epoch that keeps nothing: each batch is dropped as the next one arrives
    del x
    dropping = len(made)
    kept = {}
    for i, x in enumerate(store.batches(tiny_model, site, 16, buffer_rows=300, seed=7)):
        if i % 8 == 0:
            kept[i] = x
        elif i % 8 == 1:
            kept[i] = x[3:9]  # a view: keeps the whole batch's memory
        elif i % 8 == 2:
            kept[i] = x.numpy()[5:]  # numpy over the tensor
        del x
    monkeypatch.undo()
    assert len(kept) == sum(1 for i in range(len(reference)) if i % 8 < 3)
    for i, value in kept.items():
        want = reference[i][3:9] if i % 8 == 1 else reference[i][5:] if i % 8 == 2 else reference[i]
        assert torch.equal(torch.as_tensor(value), want), i
    keep = streaming.BatchBuffers().keep
    assert dropping <= keep + 1 < len(reference) // 4, (dropping, len(reference))  # + 1: the one that evicts
    assert len(made) - dropping < len(kept) + keep < len(reference), (len(made) - dropping, len(kept), len(reference))


def test_requested_dtype_and_device(cached, tiny_model):
    store, _, _, _, oracle = cached
    site = "blocks.0.hook_mlp_out"
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        batch = next(store.batches(tiny_model, site, 32, dtype=dtype, device="cpu", shuffle=False))
        assert batch.dtype == dtype and batch.device.type == "cpu"
        assert torch.equal(batch, oracle[site][:32].to(dtype))
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        batch = next(store.batches(tiny_model, site, 32, device="cuda", shuffle=False))
        assert batch.is_cuda and torch.equal(batch.cpu(), oracle[site][:32])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_storage_equals_the_forward_pass_cast(tmp_path, tiny_model, corpus, dtype):
    store = ActivationStore(tmp_path / "ws")
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    result = store.cache(tiny_model, sites, 10 * CTX, corpus=str(corpus), context=CTX, dtype=dtype, batch_size=BATCH, progress=False)
    assert result.run == f"words-ctx{CTX}-{dtype}" and result.dtype == dtype
    run = store.run(tiny_model, sites)
    oracle = fresh_forward(tiny_model, expected_tokens(tiny_model, corpus, 10), sites, run)
    torch_dtype = getattr(torch, dtype)
    for site in sites:
        _, _, stored = scan_all(store, tiny_model, site, dtype=torch_dtype)
        assert torch.equal(stored, oracle[site].to(torch_dtype))
    # on disk: the raw 16-bit words (2 bytes each), not floats, in a plain .npy that numpy opens by itself
    on_disk = np.load(run.segments[0].path / "blocks.1.hook_mlp_out.npy")
    assert on_disk.dtype == np.uint16 and on_disk.shape == (run.segments[0].rows(CTX), 32)
    assert torch.equal(torch.from_numpy(on_disk.view(np.int16)).view(torch_dtype),
                       oracle["blocks.1.hook_mlp_out"].to(torch_dtype)[:len(on_disk)])
    # SQL users get floats back: the view decodes the raw 16-bit values
    frame = store.sql('SELECT seq_id, pos, "blocks.1.hook_mlp_out" AS x FROM activations ORDER BY seq_id, pos', model=tiny_model)
    decoded = torch.tensor(np.stack(frame["x"].to_numpy()))
    assert torch.equal(decoded, oracle["blocks.1.hook_mlp_out"].to(torch_dtype).float())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sixteen_bit_batches_the_consumer_keeps_stay_intact(tmp_path, tiny_model, corpus, dtype):
    """Every shuffled batch of a 16-bit run kept at once (a list): as stored, as float32, and aligned pairs, each
    epoch holds every row once, equal to the forward pass cast. Oracle: the fresh forward pass. The reader's batch
    memory is handed out again once a batch is gone, so a batch whose memory it thought free was written over."""
    store = ActivationStore(tmp_path / "ws")
    sites = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"]
    store.cache(tiny_model, sites, 10 * CTX, corpus=str(corpus), context=CTX, dtype=dtype, batch_size=BATCH, progress=False)
    run = store.run(tiny_model, sites)
    oracle = fresh_forward(tiny_model, expected_tokens(tiny_model, corpus, 10), sites, run)
    torch_dtype = getattr(torch, dtype)

    def rows(x: torch.Tensor) -> list[bytes]:  # the epoch's rows as a multiset
        return sorted(r.tobytes() for r in x.float().numpy())

    want = {s: rows(oracle[s].to(torch_dtype)) for s in sites}
    # blocks of 60 rows do not hold a whole number of batches: batches at block boundaries are joined (`_cat`)
    for out in (torch_dtype, torch.float32):
        batches = list(store.batches(tiny_model, sites[1], 8, dtype=out, buffer_rows=60, seed=1))
        assert len(batches) == 10 * CTX // 8 and all(b.dtype == out for b in batches)  # more than the 16 blocks kept
        assert rows(torch.cat(batches)) == want[sites[1]]
    pairs = list(store.pairs(tiny_model, sites[0], sites[1], 8, dtype=torch_dtype, buffer_rows=60, seed=2))
    joined = torch.cat([torch.cat([a, b], dim=1) for a, b in pairs])
    assert rows(joined) == rows(torch.cat([oracle[s].to(torch_dtype) for s in sites], dim=1))


def test_catalog_tokens_and_sql(cached, tiny_model):
    store, _, run, tokens, oracle = cached
    catalog = store.catalog()
    assert sorted(catalog["site"]) == sorted(SITES)
    row = catalog.set_index("site").loc["blocks.0.hook_mlp_out"]
    assert (row["width"], row["dtype"], row["rows"], row["context"], row["complete"]) == (32, "float32", SEQS * CTX, CTX, True)
    assert row["corpus"].endswith("words.txt") and row["model"] == run.manifest.model
    # the app's view: catalog and tokens through Workspace.sql, no store code involved
    ws = Workspace(store.workspace.root)
    mirrored = ws.sql("SELECT site, width, rows FROM activation_catalog ORDER BY site")
    assert mirrored["rows"].tolist() == [SEQS * CTX] * len(SITES)
    window = ws.sql("SELECT token FROM activation_tokens WHERE run = ? AND seq_id = 7 ORDER BY pos", [run.name])
    assert window["token"].tolist() == tokens[7].tolist()
    assert ws.sql("SELECT count(*) AS n, count(DISTINCT (seq_id, pos)) AS k FROM activation_tokens").iloc[0].tolist() == [SEQS * CTX] * 2
    every = ws.sql("SELECT model, run, token FROM activation_tokens ORDER BY seq_id, pos")  # all three segments' shards
    assert every["token"].tolist() == tokens.reshape(-1).tolist()
    assert set(every["model"]) == {run.manifest.model} and set(every["run"]) == {run.name}
    # ad-hoc SQL over activations: the top rows of one unit, checked against the oracle
    top = store.sql('SELECT seq_id, pos, token, "blocks.0.hook_mlp_out"[3] AS a FROM activations ORDER BY a DESC LIMIT 5', model=tiny_model)
    values = oracle["blocks.0.hook_mlp_out"][:, 2]  # SQL arrays are 1-based
    assert np.allclose(top["a"].to_numpy(), values.topk(5).values.numpy(), rtol=0, atol=0)
    rows = top["seq_id"].to_numpy() * CTX + top["pos"].to_numpy()
    assert top["token"].tolist() == tokens.reshape(-1)[rows].tolist()
    # the view pairs each segment's token table with its site files by position: every row, and rows picked by
    # filters DuckDB may push towards the scans (seq_id, pos, token, a value), against the oracle
    unit = oracle["blocks.0.hook_mlp_out"]
    query = 'SELECT seq_id, pos, token, "blocks.0.hook_mlp_out" AS x FROM activations {} ORDER BY seq_id, pos'
    common = int(np.bincount(tokens.reshape(-1).numpy()).argmax())
    high = float(unit[:, 2].quantile(0.9))
    for where in ("", "WHERE seq_id = 7", "WHERE seq_id BETWEEN 12 AND 20 AND pos = 5", f"WHERE token = {common}",
                  f'WHERE "blocks.0.hook_mlp_out"[3] > {high}'):
        picked = store.sql(query.format(where), model=tiny_model)
        rows = picked["seq_id"].to_numpy() * CTX + picked["pos"].to_numpy()
        assert len(picked) > 0 and len(set(rows // (SEGMENT_SEQS * CTX))) >= (1 if "=" in where[:20] else 2), where
        assert picked["token"].tolist() == tokens.reshape(-1)[rows].tolist(), where
        assert torch.equal(torch.tensor(np.stack(picked["x"].to_numpy())), unit[rows]), where
    assert len(store.sql(query.format(""), model=tiny_model)) == SEQS * CTX


def test_progress_record(cached, tiny_model):
    store, _, run, _, _ = cached
    record = store.progress(tiny_model, run.name)
    assert record["status"] == "done" and record["rows_published"] == SEQS * CTX and record["segments"] == 3
    assert record["alive"] is False and record["sites"] == SITES


def test_stopping_early_stops_the_read_ahead_thread(cached, tiny_model):
    import threading

    store = cached[0]
    before = {t.ident for t in threading.enumerate()}
    for shuffle in (True, False):
        batches = store.batches(tiny_model, "blocks.0.hook_mlp_out", 16, shuffle=shuffle, buffer_rows=64)
        next(batches)
        batches.close()
    assert {t.ident for t in threading.enumerate()} == before


def naive_checksums(array: np.ndarray, chunk_rows: int) -> list[int]:
    """The documented checksum, computed plainly: each chunk's bytes, zero-padded to whole 8-byte words, summed mod 2**64."""
    sums = []
    for a in range(0, len(array), chunk_rows):
        raw = array[a:a + chunk_rows].tobytes()
        raw += bytes(-len(raw) % 8)
        sums.append(sum(int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)) % 2**64)
    return sums


def test_running_checksums_of_large_pieces_at_odd_offsets():
    """Pieces large enough to be summed by torch (at any byte offset, so their words are misaligned in memory and
    split between pieces) give the documented sums, as the same bytes read-only (summed by numpy) do."""
    from workbench.store import TORCH_SUM_BYTES, RunningChecksums

    rng = np.random.default_rng(7)
    array = rng.integers(0, 2**32, size=(700, 301), dtype=np.uint32)  # rows of 1204 bytes: not whole words
    raw = array.reshape(-1).view(np.uint8)
    frozen = raw.copy()
    frozen.flags.writeable = False
    for source in (raw, frozen):
        sums, start = RunningChecksums(array.strides[0], 97), 0
        while start < len(source):
            step = int(rng.integers(TORCH_SUM_BYTES, 3 * TORCH_SUM_BYTES)) + int(rng.integers(0, 8))
            sums.add_bytes(source[start:start + step])
            start += step
        assert sums.finish() == naive_checksums(array, 97)


@pytest.mark.parametrize("dtype,width", [(np.float32, 7), (np.float32, 128), (np.uint16, 3), (np.uint16, 1)])
def test_running_checksums_equal_a_pass_over_the_whole_file(dtype, width):
    """The writer's checksums, fed batch by batch (batches ending inside chunks and inside 8-byte words) or in byte
    pieces ending inside rows, equal `chunk_checksums` over the finished array (what the readers check against) and a
    plain per-chunk sum."""
    from workbench.store import RunningChecksums, chunk_checksums

    rng = np.random.default_rng(width)
    for _ in range(10):
        n = int(rng.integers(1, 2500))
        array = rng.integers(0, 2**16, size=(n, width)).astype(dtype) if dtype == np.uint16 else rng.standard_normal((n, width)).astype(dtype)
        chunk = int(rng.integers(1, 600))
        running = RunningChecksums(array.strides[0], chunk)
        start = 0
        while start < n:
            step = int(rng.integers(0, 300))
            running.add(array[start:start + step])
            start += step
        raw = array.reshape(-1).view(np.uint8)
        by_bytes, start = RunningChecksums(array.strides[0], chunk), 0  # pieces ending inside rows (the writer's stages)
        while start < len(raw):
            step = int(rng.integers(0, 5000))
            by_bytes.add_bytes(raw[start:start + step])
            start += step
        assert running.finish() == by_bytes.finish() == chunk_checksums(array, chunk) == naive_checksums(array, chunk)


@pytest.mark.parametrize("where", ["tmp_path", "shm", "refused"])
def test_segment_writer_writes_exactly_the_rows_it_is_given(tmp_path, monkeypatch, where):
    """A segment written batch by batch through small staging buffers (batches ending anywhere: inside pages, rows
    and 8-byte words, across buffers) holds, per site, the `.npy` file `np.save` writes for the concatenated rows
    converted to the storage dtype, and checksums equal to a pass over that file: with O_DIRECT (ext4 here), on
    tmpfs, and when the filesystem refuses the direct writes midway (the rest goes through the page cache)."""
    import errno
    import os
    from pathlib import Path

    from workbench import caching
    from workbench.caching import SegmentWriter, StagePool
    from workbench.store import STORAGE, RunManifest, chunk_checksums, list_segments, read_segment_info, segment_path

    directory = tmp_path
    if where == "shm":
        if not Path("/dev/shm").is_dir():
            pytest.skip("no /dev/shm")
        directory = Path(tempfile.mkdtemp(dir="/dev/shm"))
    refused = []
    if where == "refused":
        real = os.pwrite

        def pwrite(fd, data, offset):
            if not refused and offset > 0:
                refused.append(offset)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)

        monkeypatch.setattr(caching.os, "pwrite", pwrite)
    rng = torch.Generator().manual_seed(3)
    try:
        for dtype in ("float32", "float16", "bfloat16"):
            context, shapes = 8, {"a": (5,), "b": (3, 7)}  # rows of 10/20 and 42/84 bytes
            manifest = RunManifest("m", dtype, tuple(shapes), shapes, dtype, context, "random", "all", "-", 40, 40)
            run = directory / dtype
            run.mkdir()
            pool = StagePool(8, 3 * caching.SiteFile.ALIGN)  # small: buffers fill and wrap many times
            writer = SegmentWriter(run, 0, manifest, pool=pool)
            direct = {site: f.direct for site, f in writer.files.items()}
            batches, first = [], 0
            while first < 40:
                n = min(40 - first, int(torch.randint(1, 6, (), generator=rng)))
                acts = {site: torch.randn((n, context, *shape), generator=rng) for site, shape in shapes.items()}
                writer.append(first, torch.zeros((n, context), dtype=torch.long), acts)
                batches.append(acts)
                first += n
            files = dict(writer.files)
            writer.finish(segment_path(run, 0, 40), 0, 40, after=lambda table: None)
            writer.wait()
            (segment,) = list_segments(run)
            info = read_segment_info(segment)
            storage = STORAGE[dtype]
            for site, shape in shapes.items():
                rows = torch.cat([b[site] for b in batches]).to(storage.torch_dtype).reshape(40 * context, -1)
                expected = rows.numpy() if dtype == "float32" else rows.view(torch.int16).numpy().view(np.uint16)
                path = segment.path / f"{site}.npy"
                assert np.array_equal(np.load(path), expected)
                assert path.stat().st_size == caching.NPY_HEADER_BYTES + expected.nbytes
                assert info["sites"][site]["checksums"] == chunk_checksums(expected)
                if where == "tmp_path" and hasattr(os, "O_DIRECT"):
                    assert direct[site] and files[site].direct, "ext4 takes O_DIRECT: the writes should bypass the page cache"
            assert pool.free.qsize() == 8  # every buffer came back
        if where == "refused":
            assert len(refused) == 1
    finally:
        if where == "shm":
            shutil.rmtree(directory, ignore_errors=True)


def test_capture_ends_the_forward_pass_at_the_last_site(tiny_model):
    """With a site in the last block `stop_at_layer` cannot stop early, so the capture hooks end the pass: the
    unembedding never runs, and the values equal `run_with_cache`'s (the oracle), with and without a sink."""
    from workbench.caching import capture
    from workbench.model import stop_layer

    sites = ["blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"]
    tokens = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    calls = []
    handle = tiny_model.unembed.register_forward_hook(lambda *args: calls.append(1))
    try:
        stop = stop_layer(tiny_model, sites)
        assert stop is None  # the last block: nothing for stop_at_layer to cut
        got = capture(tiny_model, tokens, sites, torch.float32, stop)
        sunk = {}
        capture(tiny_model, tokens, sites, torch.float32, stop, sink=lambda site, x: sunk.__setitem__(site, x.clone()))
        assert not calls
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda name: name in sites)
        assert calls  # the oracle's full pass does reach it
    finally:
        handle.remove()
    for site in sites:
        assert torch.equal(got[site], cache[site]) and torch.equal(sunk[site], cache[site]), site


def test_staging_memory_is_bounded_whatever_the_number_of_sites():
    """A job's staging buffers: whole pages, at most 4 MiB each and 64 MiB in all, three or four per site."""
    from workbench.caching import STAGE_BUDGET, STAGE_BYTES, SiteFile, stage_pool

    for sites in (1, 3, 7, 48, 200):
        for extra in (0, 1):
            pool = stage_pool(sites, extra)
            count = pool.free.qsize()
            assert count == (3 + extra) * sites
            assert pool.size % SiteFile.ALIGN == 0 and 16 * SiteFile.ALIGN <= pool.size <= STAGE_BYTES
            assert count * pool.size <= STAGE_BUDGET or pool.size == 16 * SiteFile.ALIGN
    # a small job's buffers hold what its largest site file will (whole pages, at least two: the header's and one)
    page = SiteFile.ALIGN
    for most, size in ((1, 2 * page), (page + 1, 2 * page), (5 * page, 5 * page), (5 * page + 3, 6 * page), (10**9, STAGE_BYTES)):
        assert stage_pool(3, 1, most).size == size, most


def test_segments_hold_at_most_segment_max_tokens(tmp_path, tiny_model, corpus, monkeypatch):
    """A segment's size is SEGMENT_BYTES of activations or SEGMENT_MAX_TOKENS tokens, whichever is fewer (the tiny
    model's 64 values a token would fill 256 MiB only after a million tokens, and publishing takes memory in
    proportion to a segment's tokens); every row still lands exactly once."""
    import workbench.caching as caching

    monkeypatch.setattr(caching, "SEGMENT_MAX_TOKENS", 4 * CTX)
    store = ActivationStore(tmp_path / "ws")
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    store.cache(tiny_model, sites, 10 * CTX, corpus=str(corpus), context=CTX, batch_size=BATCH, progress=False)
    run = store.run(tiny_model, sites)
    assert caching.SEGMENT_BYTES // (64 * 4) > 4 * CTX  # the byte rule alone would give one segment
    assert run.manifest.segment_sequences == 4
    assert [(s.first, s.end) for s in run.segments] == [(0, 4), (4, 8), (8, 10)]
    oracle = fresh_forward(tiny_model, expected_tokens(tiny_model, corpus, 10), sites, run)
    for site in sites:
        _, _, stored = scan_all(store, tiny_model, site)
        assert torch.equal(stored, oracle[site])


def test_chunks_are_checked_once_per_process_and_file_version(tmp_path, tiny_model, corpus, monkeypatch):
    """The first epoch checks every chunk's checksum; later epochs in the process trust what was checked (same rows,
    no checksum pass); a file written since (here: damaged in place) is a new version and is checked again."""
    import workbench.streaming as streaming

    sums = []
    real = streaming.chunk_checksums
    monkeypatch.setattr(streaming, "chunk_checksums", lambda rows, chunk: sums.append(len(rows)) or real(rows, chunk))
    store = ActivationStore(tmp_path / "ws")
    site = "blocks.0.hook_resid_post"
    store.cache(tiny_model, [site], 12 * CTX, corpus=str(corpus), context=CTX, batch_size=BATCH, segment_tokens=4 * CTX,
                progress=False)
    rows = 12 * CTX
    first = torch.cat(list(store.batches(tiny_model, site, 50, seed=3)))
    assert sum(sums) == rows  # every row's chunk checked once
    again = torch.cat(list(store.batches(tiny_model, site, 50, seed=3)))
    _, _, in_order = scan_all(store, tiny_model, site)
    assert sum(sums) == rows and torch.equal(first, again)  # no second pass, same batches
    assert torch.equal(torch.sort(first.sum(1)).values, torch.sort(in_order.sum(1)).values)
    run = store.run(tiny_model, [site])
    path = run.segments[1].path / f"{site}.npy"
    offset = np.load(path, mmap_mode="r").offset
    with open(path, "r+b") as f:
        f.seek(offset + 64)
        f.write(b"\x12\x34\x56\x78")
    with pytest.raises(WorkbenchError, match="checksum"):
        list(store.batches(tiny_model, site, 50, seed=3))
    versions = [key for key in streaming.VERIFIED if key[0] == os.fspath(path)]
    assert len(versions) == 1 and versions[0][-2] == os.stat(path).st_mtime_ns  # the damaged version replaced the old
