"""Text corpora and the token chunks cut from them.

Sources, all yielding plain-text documents in a fixed order:
- the reference corpus (default): the running interpreter's standard-library
  sources and its bundled documentation text (`pydoc_data.topics`), which every
  Python install has, so the workbench works offline;
- a local file: `.txt` (one document per blank-line-separated block), `.jsonl`
  (a `text` field per line), `.parquet` (a `text` column);
- a Hugging Face dataset name, when the machine can reach the hub or has it cached.

`token_chunks` concatenates documents, each followed by the EOS token, and cuts
the stream into rows of `context` tokens, each starting with BOS. The order is
deterministic, so a resumed job can skip the chunks it already has.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from data import hub_reachable
from data.tasks import DataError

REFERENCE = "reference"
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "lib2to3"}


def documents(source: str = REFERENCE, split: str = "all") -> Iterator[str]:
    """Documents of a corpus source: `reference`, a local file path, or a Hugging Face dataset name.

    `split` ("all", "train", "heldout") is applied to the reference corpus by a
    stable hash of each document's name, 1 in 20 held out.
    """
    if source == REFERENCE:
        yield from reference_documents(split)
        return
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl", ".parquet"):
        yield from file_documents(path)
        return
    yield from hub_documents(source)


def reference_documents(split: str = "all") -> Iterator[str]:
    """The standard-library sources (sorted by path) then the bundled documentation topics."""
    if split not in ("all", "train", "heldout"):
        raise DataError(f"unknown split {split!r}; choose all, train or heldout")
    for name, text in _reference_named():
        if split == "all" or (_heldout(name) == (split == "heldout")):
            yield text


def file_documents(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"corpus file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path)
    elif suffix == ".parquet":
        yield from _parquet_documents(path)
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in text.split("\n\n"):
            if block.strip():
                yield block


def hub_documents(name: str, text_field: str = "text") -> Iterator[str]:
    """Stream a Hugging Face dataset's train split; refuse at once when offline and not cached."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets comes with transformer-lens
        raise DataError("reading a hub dataset needs the `datasets` package") from e
    if not hub_reachable():
        raise DataError(
            f"corpus {name!r} is not a local file, and the Hugging Face hub cannot be reached from this machine; "
            "pass a local .txt/.jsonl/.parquet file with --corpus"
        )
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as e:
        raise DataError(
            f"corpus {name!r} is not a local file and the dataset could not be opened from the hub "
            f"({' '.join(str(e).split())[:200]}); pass a local .txt/.jsonl/.parquet file with --corpus"
        ) from e
    for row in ds:
        yield row[text_field]


def token_chunks(tokenizer, docs: Iterable[str], context: int, bos_id: int | None = None, eos_id: int | None = None) -> Iterator[list[int]]:
    """Rows of exactly `context` token ids: BOS followed by `context - 1` tokens of the document stream."""
    if context < 2:
        raise DataError(f"context must be at least 2 tokens, got {context}")
    bos = tokenizer.bos_token_id if bos_id is None else bos_id
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    body = context - 1
    buffer: list[int] = []
    for doc in docs:
        buffer.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= body:
            yield [bos] + buffer[:body]
            del buffer[:body]


def _reference_named() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts)))
    for p in files:
        try:
            yield str(p.relative_to(root)), p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for key in sorted(topics):
        yield f"pydoc:{key}", topics[key]


def _heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20 == 0


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
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
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path} is not a readable Parquet file ({' '.join(str(e).split())[:200]})") from e
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text
