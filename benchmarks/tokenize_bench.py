"""Tokenizing a corpus through tiktoken (`data.fast_bpe`) against the tokenizer's own Rust backend, side by side.

Both run `data.corpus.encoded_documents` over the same documents (read into memory first), in alternating rounds
(backend, tiktoken, backend, ...), with the documents in groups as the cache job sends them. The tiktoken rounds'
ids are compared with the backend's, so a speed-up with different ids cannot be printed.

    python benchmarks/tokenize_bench.py [--rounds 5] [--tokenizer ref-gpt2|PATH] [--corpus reference|PATH]
                                        [--tiktoken-ranks FILE]

`--tiktoken-ranks` builds the tokenizer from a `.tiktoken` ranks file with GPT-2's split instead: its merges are
recovered from the ranks (each token's pair is where BPE over its own bytes, with only lower ranks, ends) and it
becomes a Hugging Face byte-level BPE tokenizer. GPT-2's own vocabulary ships that way in the `openai-whisper`
package, which works offline once downloaded (`pip download openai-whisper --no-deps`, then
`whisper/assets/gpt2.tiktoken` in the archive), so GPT-2's 50,256 merges can be checked without the hub.
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
    ap.add_argument("--tiktoken-ranks", type=Path, help="a .tiktoken ranks file (GPT-2's split) to build the tokenizer from")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import data.fast_bpe as fast_bpe
    from data import bundled_model_dir
    from data.corpus import documents, encoded_documents

    if args.tiktoken_ranks:
        tokenizer = from_tiktoken_ranks(args.tiktoken_ranks)
    else:
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


def from_tiktoken_ranks(path: Path):
    """A Hugging Face byte-level BPE tokenizer (GPT-2's split, `<|endoftext|>` after the last rank) from a `.tiktoken`
    file of `base64-token rank` lines. Not transformers' `TikTokenConverter`: it lists every split of a token as a
    merge, where GPT-2's own tokenizer lists one, the one recovered here."""
    import base64

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data.fast_bpe import _byte_decoder

    ranks = {}
    for line in path.read_text().split("\n"):
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    char = {b: c for c, b in _byte_decoder().items()}

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    def pair(token: bytes, below: int) -> list[bytes]:  # BPE over the token's bytes with the ranks below its own
        parts = [bytes([b]) for b in token]
        while True:
            found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if ranks.get(a + b, below) < below]
            if not found:
                return parts
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = pair(token, rank)
            if len(parts) != 2:
                sys.exit(f"error: token {token!r} is not one merge of two lower-ranked tokens")
            merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    special = "<|endoftext|>"
    vocab[special] = max(ranks.values()) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([special])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special)


if __name__ == "__main__":
    main()
