"""Text corpora and the token chunks cut from them.

Sources, all yielding plain-text documents in a fixed order, streamed (memory
does not grow with the size of the corpus):
- the reference corpus (default): the running interpreter's standard-library
  sources and its bundled documentation text (`pydoc_data.topics`), which every
  Python install has, so the workbench works offline;
- a local file: `.txt` (one document per blank-line-separated block), `.jsonl`
  (a `text` field per line), `.parquet` (a `text` column);
- a Hugging Face dataset name (`name` or `name:config`): streamed from the hub
  when the machine can reach it; when it cannot, a copy already in the local
  datasets cache (`load_dataset` run once on a machine online) is used; with
  neither, the call fails at once with one line saying what to do instead.

`token_chunks` concatenates documents, each followed by the EOS token, and cuts
the stream into rows of `context` tokens, each starting with BOS. The order is
deterministic, so a resumed job can skip the chunks it already has.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from data import hub_reachable
from data.tasks import DataError

REFERENCE = "reference"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "lib2to3"}


def documents(source: str = REFERENCE, split: str = "all") -> Iterator[str]:
    """Documents of a corpus source: `reference`, a local file path, or a Hugging Face dataset name.

    `split` ("all", "train", "heldout") is applied to the reference corpus by a
    stable hash of each document's name, 1 in 20 held out. A hub dataset reads
    the split of that name ("all" and "train" both mean its `train` split); a
    local file has no splits and ignores it.
    """
    kind = source_kind(source)
    if kind == "reference":
        yield from reference_documents(split)
    elif kind == "file":
        yield from file_documents(Path(source).expanduser())
    else:
        name, _, config = source.partition(":")
        yield from hub_documents(name, split="train" if split in ("all", "train") else split, config=config or None)


def source_kind(source: str) -> str:
    """'reference', 'file' or 'hub': how `documents` will read `source`."""
    if source == REFERENCE:
        return "reference"
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES:
        return "file"
    return "hub"


def reference_documents(split: str = "all") -> Iterator[str]:
    """The standard-library sources (sorted by path) then the bundled documentation topics."""
    if split not in ("all", "train", "heldout"):
        raise DataError(f"unknown split {split!r}; choose all, train or heldout")
    for name, text in _reference_named():
        if split == "all" or (_heldout(name) == (split == "heldout")):
            yield text


def file_documents(path: Path) -> Iterator[str]:
    """Documents of a local `.txt`, `.jsonl` or `.parquet` file, read as a stream."""
    if path.is_dir():
        raise DataError(f"corpus {path} is a directory: give one .txt, .jsonl or .parquet file")
    if not path.is_file():
        raise DataError(f"corpus file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif suffix == ".parquet":
        yield from _parquet_documents(path)
    else:
        yield from _text_blocks(path)


def hub_documents(name: str, split: str = "train", text_field: str = "text", config: str | None = None) -> Iterator[str]:
    """Stream a Hugging Face dataset split: from the hub when reachable, else from the local datasets cache.

    Refuses at once (no retry loop) when the hub is unreachable and the dataset
    was never loaded on this machine.
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets comes with transformer-lens
        raise DataError("reading a hub dataset needs the `datasets` package") from e
    label = f"{name}:{config}" if config else name
    online = hub_reachable()
    try:
        with _offline(datasets, not online):
            # offline: the cached copy is memory-mapped Arrow, iterated without touching the network
            ds = datasets.load_dataset(name, config, split=split, streaming=online)
            rows = iter(ds)
            first = next(rows, None)
    except Exception as e:
        where = "could not be opened from the hub" if online else (
            "is not in the local Hugging Face datasets cache, and the hub cannot be reached from this machine")
        raise DataError(
            f"corpus {label!r} is not a local file and the dataset {where} ({' '.join(str(e).split())[:200]}); "
            "pass a local .txt/.jsonl/.parquet file with --corpus"
        ) from e
    if first is not None and text_field not in first:
        raise DataError(f"dataset {label!r} has no {text_field!r} field (fields: {', '.join(first)})")
    for row in ([first] if first is not None else []):
        yield row[text_field]
    for row in rows:
        yield row[text_field]


def token_chunks(tokenizer, docs: Iterable[str], context: int, bos_id: int | None = None, eos_id: int | None = None,
                 limit: int | None = None) -> Iterator[list[int]]:
    """Rows of exactly `context` token ids: BOS followed by `context - 1` tokens of the document stream.

    A tokenizer with no BOS token gets rows of `context` stream tokens with no prefix. With `limit`, at most that
    many rows (the same first rows), and the tokenizer is not run far past the last of them (see `encoded_documents`).
    """
    if context < 2:
        raise DataError(f"context must be at least 2 tokens, got {context}")
    bos = tokenizer.bos_token_id if bos_id is None else bos_id
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    prefix = [] if bos is None else [bos]
    body = context - len(prefix)
    if limit is not None and limit <= 0:
        return
    buffer: list[int] = []
    rows = 0
    for ids in encoded_documents(tokenizer, docs, None if limit is None else limit * body):
        buffer.extend(ids)
        if eos is not None:
            buffer.append(eos)
        start = 0
        while len(buffer) - start >= body:
            yield prefix + buffer[start:start + body]
            start += body
            rows += 1
            if rows == limit:
                return
        del buffer[:start]


GROUP_CHARS = 256 * 1024  # characters of documents encoded in one call of a fast tokenizer's backend


def encoded_documents(tokenizer, docs: Iterable[str], tokens: int | None = None) -> Iterator[list[int]]:
    """The token ids of each document, no special tokens added: `tokenizer(doc, add_special_tokens=False)["input_ids"]`.

    A fast (Rust) tokenizer gets documents in groups of about `GROUP_CHARS` characters, encoded together (see
    `_group_encoder`): by tiktoken when `data.fast_bpe` can prove its ids are the tokenizer's (byte-level BPE: the
    reference tokenizer, GPT-2 and its kin), else by one call of the backend's `encode_batch_fast`. Either spreads a
    group over the cores, and the cache job tokenizes between forward passes, when torch's threads are idle. A slow
    tokenizer, or a backend that would still truncate or pad, is called per document.

    `tokens`, when given, is about how many tokens the caller will take (a hint; the ids never depend on it): a
    group is then cut short once its characters, at the characters per token seen so far (2 before any), hold what
    is still wanted, so the last group does not tokenize far past the end (a whole group of 256k characters is
    about 70k tokens of the reference corpus, more than a small job wants in all).
    """
    encode = _group_encoder(tokenizer)
    if encode is None:
        for doc in docs:
            yield tokenizer(doc, add_special_tokens=False)["input_ids"]
        return
    group: list[str] = []
    size = 0
    chars = produced = 0  # characters encoded so far, and the tokens they gave
    # with a budget, the first group assumes 2 characters per token (few tokenizers have fewer): a tiny job's is small
    target = GROUP_CHARS if tokens is None else max(MIN_GROUP_CHARS, min(GROUP_CHARS, 2 * tokens))
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= target:
            encoded = encode(group)
            chars, produced = chars + size, produced + sum(map(len, encoded))
            yield from encoded
            group, size = [], 0
            target = _group_target(tokens, chars, produced)
    if group:
        yield from encode(group)


MIN_GROUP_CHARS = 16 * 1024  # with a token budget: the smallest group


def _group_target(tokens: int | None, chars: int, produced: int) -> int:
    """Characters for the next group: `GROUP_CHARS`, or fewer when about `tokens` are wanted in all and `produced`
    tokens (from `chars` characters) are out already (with a tenth more, so the end is rarely one group short)."""
    if tokens is None or produced == 0:
        return GROUP_CHARS
    wanted = max(0, tokens - produced)
    return max(MIN_GROUP_CHARS, min(GROUP_CHARS, int(wanted * chars / produced * 1.1)))


def _fast_backend(tokenizer):
    """The Rust tokenizer behind a Hugging Face fast tokenizer, set up as `tokenizer(text, add_special_tokens=False)`
    sets it up; None when there is none or when it would not give the same ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast") or not getattr(tokenizer, "is_fast", False):
        return None
    tokenizer("", add_special_tokens=False)  # the same call's set-up: truncation and padding off, special tokens
    if backend.truncation is not None or backend.padding is not None:
        return None
    return backend


def _group_encoder(tokenizer):
    """A function from a list of documents to their ids, or None when `tokenizer` must be called per document.

    tiktoken (`data.fast_bpe`) when it gives the tokenizer's ids: it tokenizes the reference corpus 2.5-3 times as
    fast as the backend on two cores (`benchmarks/tokenize_bench.py`), keeping ids only. Else the backend's
    `encode_batch_fast`, which skips the offsets `tokenizer(...)` would compute (about 1.8 times as fast as one call
    per document on two cores).
    """
    from data.fast_bpe import fast_encoder

    fast = fast_encoder(tokenizer)
    if fast is not None:
        return fast.encode_batch
    backend = _fast_backend(tokenizer)
    if backend is None:
        return None
    return lambda group: [e.ids for e in backend.encode_batch_fast(group, add_special_tokens=False)]


def _reference_named() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for name in _reference_files(str(root)):
        try:
            yield name, (root / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for key in sorted(topics):
        yield f"pydoc:{key}", topics[key]


@functools.lru_cache(maxsize=4)
def _reference_files(root: str) -> tuple[str, ...]:
    """Relative paths of the standard library's .py files in path order, skipping tests and third-party trees.

    The walk prunes the skipped directories instead of listing them (site-packages can be large).
    """
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]
        rel = os.path.relpath(directory, root)
        found += [f if rel == "." else os.path.join(rel, f) for f in files if f.endswith(".py")]
    return tuple(sorted(found, key=lambda name: name.split(os.sep)))


def _heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20 == 0


def _text_blocks(path: Path) -> Iterator[str]:
    """Blank-line-separated blocks of a text file, one line in memory at a time (plus the current block)."""
    block: list[str] = []
    for line in _utf8_lines(path):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def _utf8_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (universal newlines); a file that is not UTF-8 is refused where it stops being
    UTF-8, by byte offset and line, rather than cached as replacement characters."""
    with path.open(encoding="utf-8") as f:
        try:
            yield from f
        except UnicodeDecodeError:
            raise DataError(not_utf8(path)) from None


def read_utf8(path: Path, what: str = "file") -> str:
    """The whole text of a small UTF-8 file (task and prompt files); one clear line if it is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(not_utf8(path, what)) from None


def not_utf8(path: Path, what: str = "corpus file") -> str:
    """Where `path` first stops being UTF-8, as one line saying what to do."""
    import codecs

    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with path.open("rb") as f:
        utf16 = f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
        f.seek(0)
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                offset += e.start  # the decoder holds back at most 3 bytes of an unfinished character
                lines += chunk[:e.start].count(b"\n")
                break
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    encoding = "utf-16" if utf16 else "<its encoding, e.g. latin1>"
    return (f"{what} {path} is not UTF-8 text (byte {offset:,}, line {lines:,}"
            f"{': it starts with a UTF-16 byte-order mark' if utf16 else ''}): convert it first, "
            f"`iconv -f {encoding} -t utf-8` (`-c` drops bytes that do not decode)")


def _jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path.name} line {lineno}: expected an object with a string field 'text'")
        yield obj["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:200]})") from e
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column 'text' holds {kind}, not strings")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


@contextlib.contextmanager
def _offline(datasets_module, offline: bool):
    """Put `datasets` in offline mode for one call, so it reads its cache instead of retrying the network."""
    if not offline:
        yield
        return
    config = datasets_module.config
    before = config.HF_HUB_OFFLINE
    config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = before
