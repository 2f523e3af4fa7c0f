"""Byte-level BPE through tiktoken, giving exactly the ids of the Hugging Face tokenizer it is built from.

tiktoken's encoder keeps ids only (no offsets, no token strings, no per-token allocations) and tokenizes the
reference corpus 2.5-3 times as fast as the `tokenizers` backend on the same two cores (`benchmarks/tokenize_bench.py`:
1.0 s against 3.1 s for its 3.3M tokens, medians of 5 alternating rounds). The cache job tokenizes between forward
passes, so this time is part of what caching costs.

`fast_encoder(tokenizer)` returns an encoder only when its ids are provably those of `tokenizer(text,
add_special_tokens=False)`, and None (with `why_not` saying why) otherwise; callers then use the tokenizer itself.

Why the ids are the same. The two BPE loops differ in one way: tiktoken merges any adjacent pair whose
concatenation is a token, with the token's rank as priority, where Hugging Face merges only the pairs listed in
`merges`, with the list's order as priority; both take the leftmost pair among equals. So:
1. The listed merges must come in the order of the ids of the tokens they make (then the priorities agree), each
   token made by one merge at most.
2. Every token given to tiktoken must come out of Hugging Face's BPE of its own text as that one token. A token for
   which that fails is never produced by Hugging Face at all (if its merge's two parts were ever adjacent inside a
   word, they would be adjacent in the word made of the token's text alone, and the merge would follow), so it is
   left out of tiktoken's table rather than refused.
   Given 2, an unlisted pair (x, y) with x + y = t is never adjacent in any state Hugging Face's loop reaches: the
   boundaries around x and y have been there since the word started, so the merges between them were those of the
   word t alone, which would then end as [x, y], not [t]. So the two loops see the same pairs at every step, and
   tiktoken's shortcut (a whole word that is a token is that token) is Hugging Face's answer too, by 2.
3. The split of text into words must be the same. Supported: the GPT-2 byte-level split (GPT-2, GPT-Neo, Pythia,
   OPT, ...), and that split after isolating digit pairs (`" ?\\d\\d"`, the reference tokenizer, data/tokenizer.py),
   written as one regex in `_DIGIT_PAIRS_THEN_GPT2` (see the comment there for why it is the same split). Oniguruma
   (Hugging Face) and fancy-regex (tiktoken) agree on `\\s`, `\\S`, `\\d`, `\\p{L}` and `\\p{N}` at every code point
   (tests/test_fast_bpe.py checks all of them).
4. Added tokens written in the text are matched first by both. They must not be able to overlap one another (then
   every way of scanning for them finds the same matches) and must have no strip or single-word rules.

Anything else (a normalizer, other splits, SentencePiece-style models, byte fallback, dropout, `ignore_merges`)
returns None. Text with lone surrogates, which the tokenizer refuses, is encoded with them replaced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from data.tokenizer import DIGIT_PAIRS

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Split(" ?\d\d", isolated) and then the GPT-2 split on each part, as one regex. The digit pairs are found by a scan
# from the left, so no position between two of them starts one. The GPT-2 alternatives then must not run into the next
# pair, and must treat its start as the end of their text: only the number run and the whitespace runs could reach it
# (a pair starts with a space or a digit, which no other alternative takes after its first character), so they stop
# before a position where a pair starts, and the whitespace lookahead `(?!\S)` also holds there.
_DIGIT_PAIRS_THEN_GPT2 = (DIGIT_PAIRS + r"""|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?(?:(?!\d\d)\p{N})+| ?[^\s\p{L}\p{N}]+"""
                          r"""|(?:(?! \d\d)\s)+(?:(?!\S)|(?=\d\d))|(?:(?! \d\d)\s)+""")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte, mapped to that byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


class FastEncoder:
    """Encodes documents with a tiktoken encoding; `encode_batch` spreads a list over a few threads (tiktoken drops
    the GIL while it works)."""

    def __init__(self, encoding, threads: int):
        self.encoding = encoding
        self.threads = max(1, threads)
        self.allowed = encoding.special_tokens_set
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process the pool's threads live in: a forked child has none of them
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special=self.allowed)

    def _encode_all(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of each text; the texts are dealt to the threads in contiguous runs of about equal characters."""
        total = sum(map(len, texts))
        if self.threads == 1 or len(texts) < 2 or total < 16384:
            return self._encode_all(texts)
        cuts, size, share = [0], 0, total / self.threads
        for i, t in enumerate(texts):
            size += len(t)
            if size >= share * len(cuts) and len(cuts) < self.threads:
                cuts.append(i + 1)
        cuts.append(len(texts))
        parts = self._workers().map(self._encode_all, [texts[a:b] for a, b in zip(cuts, cuts[1:]) if b > a])
        return [ids for part in parts for ids in part]

    def _workers(self) -> ThreadPoolExecutor:
        """The thread pool, made again in a process forked after it was made (the child inherits the pool object but
        not its threads, and work handed to it would wait forever)."""
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool, self._pool_pid = ThreadPoolExecutor(self.threads, thread_name_prefix="bpe"), os.getpid()
            return self._pool


def fast_encoder(tokenizer) -> FastEncoder | None:
    """A tiktoken encoder giving the ids of `tokenizer(text, add_special_tokens=False)`, or None (see `why_not`)."""
    built = _build(tokenizer)
    return built if isinstance(built, FastEncoder) else None


def why_not(tokenizer) -> str | None:
    """Why `tokenizer` gets no fast encoder (None when it gets one)."""
    built = _build(tokenizer)
    return None if isinstance(built, FastEncoder) else built


def _build(tokenizer) -> "FastEncoder | str":
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        return "not a fast (Rust-backed) tokenizer"
    if getattr(tokenizer, "split_special_tokens", False):
        return "the tokenizer splits special tokens written in the text"
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return "tiktoken is not installed"
    return _from_spec(backend.to_str())


@functools.lru_cache(maxsize=8)
def _from_spec(spec: str) -> "FastEncoder | str":
    import tiktoken
    from tokenizers import Tokenizer

    j = json.loads(spec)
    if j.get("normalizer") is not None:
        return "the tokenizer normalizes text first"
    split = _split_pattern(j.get("pre_tokenizer"))
    if split is None:
        return f"its pre-tokenizer is not a supported byte-level split: {json.dumps(j.get('pre_tokenizer'))[:200]}"
    model = j.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "its BPE has dropout, subword affixes or byte fallback"
    if model.get("ignore_merges"):  # a word in the vocabulary skips the merges: check 2 below would not hold
        return "its BPE takes whole words from the vocabulary before merging"
    added = j.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
        return "an added token strips spaces or matches single words only"
    texts = [a["content"] for a in added]
    if any(not t for t in texts) or _overlapping(texts):
        return "two added tokens can overlap in a text"
    vocab: dict[str, int] = model["vocab"]
    decode = _byte_decoder()
    if any(ch not in vocab for ch in decode):
        return "some byte has no token"
    specials = set(texts)
    made_at: list[int] = []
    for m in model["merges"]:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a not in vocab or b not in vocab or a + b not in vocab:
            return f"merge {a!r} {b!r} names a token not in the vocabulary"
        made_at.append(vocab[a + b])
    if any(y <= x for x, y in zip(made_at, made_at[1:])):
        return "its merges do not come in the order of the ids of the tokens they make"
    bpe = Tokenizer.from_str(spec).model
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token in specials:
            continue
        if any(ch not in decode for ch in token):
            return f"token {token!r} is not byte-level text"
        if len(token) > 1 and [t.value for t in bpe.tokenize(token)] != [token]:
            continue  # never produced by the tokenizer (see the module's docstring, 2)
        ranks[bytes(decode[ch] for ch in token)] = i
    if len(set(ranks.values())) != len(ranks):
        return "two tokens share an id"
    special_ids = {a["content"]: a["id"] for a in added}
    name = "workbench-" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    encoding = tiktoken.Encoding(name, pat_str=split, mergeable_ranks=ranks, special_tokens=special_ids)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return FastEncoder(encoding, threads=min(8, cores))


def _split_pattern(pre: dict | None) -> str | None:
    """The one regex splitting text into words as `pre` does, for the supported pre-tokenizers."""
    def gpt2_byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)

    if pre is None:
        return None
    if gpt2_byte_level(pre):
        return GPT2_SPLIT
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 1 and gpt2_byte_level(steps[0]):
        return GPT2_SPLIT
    if steps and len(steps) == 2 and gpt2_byte_level(steps[1]):
        first = steps[0]
        if first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert") \
                and (first.get("pattern") or {}).get("Regex") == DIGIT_PAIRS:
            return _DIGIT_PAIRS_THEN_GPT2
    return None


def _overlapping(texts: list[str]) -> bool:
    """Whether some text is inside another, or one's end is another's start (so matches could overlap)."""
    for a in texts:
        for b in texts:
            if a is b:
                continue
            if a in b or any(a.endswith(b[:k]) for k in range(1, min(len(a), len(b)))):
                return True
    return False
