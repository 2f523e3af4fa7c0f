"""Corpus sources and token chunks: local files streamed, the reference corpus split, hub datasets from the local cache offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.corpus import documents, reference_documents, source_kind, token_chunks
from data.tasks import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_text_file_blocks(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first block\nstill first\n\n\n  \nsecond block\n\nthird, no newline at the end")
    assert list(documents(str(path))) == ["first block\nstill first", "second block", "third, no newline at the end"]
    assert source_kind(str(path)) == "file" and source_kind("reference") == "reference" and source_kind("user/data") == "hub"


def test_jsonl_and_parquet_files(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"doc {i}", "id": i}) for i in range(3)) + "\n\n")
    assert list(documents(str(good))) == ["doc 0", "doc 1", "doc 2"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2"):
        list(documents(str(bad)))
    field = tmp_path / "field.jsonl"
    field.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match="'text'"):
        list(documents(str(field)))
    table = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a b", None, "c d"], "n": [1, 2, 3]}), table)
    assert list(documents(str(table))) == ["a b", "c d"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        list(documents(str(tmp_path / "other.parquet")))
    with pytest.raises(DataError, match="does not exist"):
        list(documents(str(tmp_path / "missing.txt")))


def test_token_chunks_against_a_plain_concatenation(tokenizer):
    docs = ["When Mary and John went to the store", "def f(x):\n    return x", "The war lasted from 1732 to 1756"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    rows = list(token_chunks(tokenizer, docs, 5))
    assert rows == [[bos] + stream[i:i + 4] for i in range(0, len(stream) - 3, 4)]
    assert all(len(r) == 5 for r in rows)
    assert rows == list(token_chunks(tokenizer, iter(docs), 5))  # deterministic, and a stream is enough
    with pytest.raises(DataError, match="at least 2"):
        list(token_chunks(tokenizer, docs, 1))


@pytest.mark.parametrize("tiktoken_path", [True, False])
def test_grouped_fast_encoding_gives_the_ids_of_one_call_per_document(tokenizer, monkeypatch, tiktoken_path):
    """`encoded_documents` (groups of documents through tiktoken, `data.fast_bpe`, or with that path off through the
    Rust backend's `encode_batch_fast`) against the plain `tokenizer(doc, add_special_tokens=False)` per document, on
    the reference corpus and on awkward text (special tokens written out, empty documents, unicode, runs of spaces
    and digits), with groups split mid-stream."""
    import itertools

    import data.corpus as corpus
    import data.fast_bpe as fast_bpe
    from data.corpus import encoded_documents

    assert fast_bpe.fast_encoder(tokenizer) is not None, fast_bpe.why_not(tokenizer)
    if not tiktoken_path:
        monkeypatch.setattr(fast_bpe, "fast_encoder", lambda tok: None)
    assert corpus._fast_backend(tokenizer) is not None, "the test tokenizer is a fast one: the grouped path is tested"
    monkeypatch.setattr(corpus, "GROUP_CHARS", 5000)
    awkward = ["", "<|endoftext|> after the end", "ünïcode 中文 \u2028 tabs\t\tand  spaces   ", "1732 to 1756, 0.5e-3",
               "   ", "\n\n\n", "x" * 20000]
    docs = awkward + list(itertools.islice(documents("reference", "train"), 40))
    expected = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert list(encoded_documents(tokenizer, docs)) == expected
    tokenizer.backend_tokenizer.enable_truncation(8)  # a backend left truncating is set back, as `tokenizer(...)` does
    try:
        assert list(encoded_documents(tokenizer, awkward)) == expected[:len(awkward)]
    finally:
        tokenizer.backend_tokenizer.no_truncation()


def test_token_chunks_with_a_limit_give_the_same_rows_and_tokenize_little_past_them(tokenizer, monkeypatch):
    """`limit` keeps the first rows exactly (the ids never depend on how documents are grouped) and stops the
    tokenizer soon after the last of them: the characters sent to the backend, counted at the backend, are those
    the rows needed plus at most a tenth and one document, where without the limit a whole group goes past them."""
    import itertools

    import data.corpus as corpus

    docs = list(itertools.islice(documents("reference", "train"), 400))
    everything = list(token_chunks(tokenizer, docs, 64))
    assert len(everything) > 2000

    sent = []
    encode = corpus._group_encoder(tokenizer)

    def counting(group):  # the real group encoder, counting the characters of every group it encodes
        sent.append(sum(map(len, group)))
        return encode(group)

    monkeypatch.setattr(corpus, "_group_encoder", lambda tok: counting)
    for limit in (0, 1, 7, 300, 2000, len(everything), len(everything) + 50):
        sent.clear()
        rows = list(token_chunks(tokenizer, docs, 64, limit=limit))
        assert rows == everything[:limit], limit
        # characters of the documents the rows reach into (each row holds 63 stream tokens, EOS included)
        needed, tokens, used = 0, 0, limit * 63
        for d in docs:
            if tokens >= used:
                break
            tokens += len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1
            needed += len(d)
        assert sum(sent) <= max(corpus.MIN_GROUP_CHARS, needed * 1.1) + max(map(len, docs)), (limit, sum(sent), needed)
    sent.clear()
    list(itertools.islice(token_chunks(tokenizer, docs, 64), 7))
    assert sum(sent) >= corpus.GROUP_CHARS  # without a limit, a whole group

def test_token_chunks_without_a_bos_token(tokenizer):
    class NoBos:  # a tokenizer that has no BOS token (some hub models): rows are plain stream windows
        bos_token_id = None
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=False):
            return tokenizer(text, add_special_tokens=add_special_tokens)

    stream = tokenizer("Mary and John", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(token_chunks(NoBos(), ["Mary and John"], 2)) == [stream[i:i + 2] for i in range(0, len(stream) - 1, 2)]


def test_reference_corpus_splits_partition_it():
    start = time.monotonic()
    train, heldout = list(reference_documents("train")), list(reference_documents("heldout"))
    assert time.monotonic() - start < 30
    assert len(heldout) > 10 and len(train) > 10 * len(heldout)
    assert sorted(train + heldout) == sorted(reference_documents("all"))
    with pytest.raises(DataError, match="unknown split"):
        list(reference_documents("validation"))


_HUB_CHILD = textwrap.dedent("""
    import glob, json, os, shutil, sys, time
    import datasets, pyarrow as pa, pyarrow.parquet as pq
    from data.corpus import documents
    from data.tasks import DataError
    # What `load_dataset("testuser/tinytext")` leaves in the cache on a machine online, made here from a local file.
    texts = ["hello world %d" % i for i in range(50)]
    pq.write_table(pa.table({"text": texts}), "corpus.parquet")
    datasets.load_dataset("parquet", data_files={"train": "corpus.parquet"})
    built = glob.glob(os.path.join(os.environ["HF_HOME"], "datasets", "parquet", "*", "*", "*", ""))[0]
    target = os.path.join(os.environ["HF_HOME"], "datasets", "testuser___tinytext", "default", "0.0.0", "0123abcd")
    os.makedirs(target)
    shutil.copy(built + "parquet-train.arrow", os.path.join(target, "tinytext-train.arrow"))
    info = json.load(open(built + "dataset_info.json"))
    info.update(config_name="default", dataset_name="tinytext")
    json.dump(info, open(os.path.join(target, "dataset_info.json"), "w"))
    start = time.monotonic()
    got = list(documents("testuser/tinytext"))
    assert got == texts, got[:3]
    try:
        list(documents("testuser/never-downloaded"))
        raise SystemExit("a dataset that is not cached must be refused")
    except DataError as e:
        assert "local" in str(e) and "\\n" not in str(e), e
    print(json.dumps({"seconds": time.monotonic() - start}))
""")


def test_hub_dataset_from_the_local_cache_offline(tmp_path):
    """Unreachable hub (closed endpoint): a dataset in the local cache is read; one that is not fails at once."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", _HUB_CHILD], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["seconds"] < 20
