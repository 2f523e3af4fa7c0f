"""Tokenizing a corpus through tiktoken (`data.fast_bpe`) against the tokenizer's own Rust backend, side by side.

Both run `data.corpus.encoded_documents` over the same documents (read into memory first), in alternating rounds
(backend, tiktoken, backend, ...), with the documents in groups as the cache job sends them. The tiktoken rounds'
ids are compared with the backend's, so a speed-up with different ids cannot be printed.

    python benchmarks/tokenize_bench.py [--rounds 5] [--tokenizer ref-gpt2|PATH] [--corpus reference|PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokenizer", default="ref-gpt2", help="a bundled model's name or a directory with tokenizer.json")
    ap.add_argument("--corpus", default="reference")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import data.fast_bpe as fast_bpe
    from data import bundled_model_dir
    from data.corpus import documents, encoded_documents

    where = Path(args.tokenizer) if Path(args.tokenizer).is_dir() else bundled_model_dir(args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if fast_bpe.fast_encoder(tokenizer) is None:
        sys.exit(f"error: no tiktoken encoder for {args.tokenizer}: {fast_bpe.why_not(tokenizer)}")
    docs = list(documents(args.corpus, "all"))
    real = fast_bpe.fast_encoder

    def run(fast: bool) -> tuple[float, list[list[int]]]:
        fast_bpe.fast_encoder = real if fast else (lambda tok: None)
        try:
            start = time.perf_counter()
            ids = list(encoded_documents(tokenizer, docs))
            return time.perf_counter() - start, ids
        finally:
            fast_bpe.fast_encoder = real

    times: dict[bool, list[float]] = {False: [], True: []}
    expected = None
    for _ in range(args.rounds):
        for fast in (False, True):
            seconds, ids = run(fast)
            times[fast].append(seconds)
            if expected is None:
                expected = ids
            elif ids != expected:
                sys.exit("error: tiktoken's ids differ from the tokenizer's")
    tokens = sum(map(len, expected))
    print(f"machine: {os.cpu_count()} cores; {len(docs)} documents, {sum(map(len, docs)):,} characters, {tokens:,} tokens")
    for fast, label in ((False, "tokenizers backend"), (True, "tiktoken")):
        med = statistics.median(times[fast])
        print(f"  {label:<19} best {min(times[fast]):.2f}  median {med:.2f} s  ({tokens / med / 1e6:.2f}M tokens/s)")
    print(f"tiktoken / backend time = {statistics.median(times[True]) / statistics.median(times[False]):.2f} "
          f"(best rounds {min(times[True]) / min(times[False]):.2f}); ids equal in every round")


if __name__ == "__main__":
    main()
