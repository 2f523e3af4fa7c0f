"""The tiktoken encoder of data/fast_bpe.py against the Hugging Face tokenizer it is built from (the oracle).

Its ids must be the tokenizer's own: on the whole reference corpus, on random strings of the characters where the
splits into words are delicate, and on vocabularies built to trip the two BPE loops apart.
"""

from __future__ import annotations

import random

import pytest

from data.corpus import documents
from data.fast_bpe import _byte_decoder, fast_encoder, why_not

# Characters around which the splits are delicate: spaces and other whitespace before digits, digits that are \p{N}
# but not \d (superscripts, fractions, roman numerals), digits of other scripts, one added in Unicode 16 (U+10D40,
# which Python's own `re` does not call a digit), contractions, the special token written out, ASCII separators.
TRICKY = [" ", " ", "  ", "\t", "\n", "\r", "\x0b", "\x1c", "\u00a0", "\u3000", "\u2028", "1", "2", "9", "0", "²", "½",
          "ⅷ", "١", "\U00010D40", "a", "Z", "é", "中", "😀", "'", "'s", "'ll", "'re", "s", "t", ".", ",", "-", "_", "(",
          "<|endoftext|>", "<|endof"]


def _hf_ids(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.fixture(scope="module")
def ref_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from data import bundled_model_dir

    path = bundled_model_dir("ref-gpt2") / "tokenizer.json"  # tracked in git: every checkout has it
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def gpt2_style_tokenizer():
    """A tokenizer of GPT-2's own shape (byte-level split only, no digit pairs), trained on part of the corpus."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(itertools.islice(documents("reference", "train"), 60), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_reference_tokenizer_gets_the_same_ids_on_the_whole_corpus_and_on_random_strings(ref_tokenizer):
    fast = fast_encoder(ref_tokenizer)
    assert fast is not None, why_not(ref_tokenizer)
    docs = list(documents("reference", "all"))
    assert fast.encode_batch(docs) == [e.ids for e in ref_tokenizer.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
    texts = _random_texts(20000)
    assert fast.encode_batch(texts) == _hf_ids(ref_tokenizer, texts)
    # digit pairs next to everything that could hide or shift them (the splits' one regex is written for these)
    for text in ["²12", "1²23", "a\n\n12 b", "\t 12", "x  12", "x   12", " 1234", "12345", "١٢ 34", "\U00010D40\U00010D4112",
                 "  \t12", "\n 12", "1 2 34", "'s12", "<|endoftext|>12"]:
        assert fast.encode(text) == _hf_ids(ref_tokenizer, [text])[0], text


def test_gpt2_shaped_tokenizer_gets_the_same_ids(gpt2_style_tokenizer):
    fast = fast_encoder(gpt2_style_tokenizer)
    assert fast is not None, why_not(gpt2_style_tokenizer)
    docs = list(documents("reference", "heldout"))
    texts = _random_texts(20000, seed=1)
    assert fast.encode_batch(docs + texts) == _hf_ids(gpt2_style_tokenizer, docs + texts)


def test_a_token_the_merges_never_make_is_left_out_and_the_ids_stay_the_same():
    """A vocabulary where the token "abc" is listed as the merge ("a", "bc") made after "ab": Hugging Face's BPE of
    "abc" merges a+b first and stops at [ab, c], so it never makes "abc". tiktoken, given "abc", would return it for
    the word "abc" (and merge "ab"+"c", an unlisted pair); the encoder leaves it out, and agrees with the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_of = _byte_decoder()
    alphabet = sorted(byte_of, key=byte_of.get)
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    merges = [("a", "b"), ("b", "c"), ("a", "bc"), ("Ġ", "a")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    assert hf("abc", add_special_tokens=False)["input_ids"] == [vocab["ab"], vocab["c"]]

    fast = fast_encoder(hf)
    assert fast is not None, why_not(hf)
    assert b"abc" not in fast.encoding._mergeable_ranks and b"ab" in fast.encoding._mergeable_ranks
    texts = ["abc", "abcabc", " abc", "xabcbc", "bcabc", "aabbcc abc<|endoftext|>abc"] + [
        "".join(random.Random(i).choice("abc ") for _ in range(12)) for i in range(300)]
    assert fast.encode_batch(texts) == _hf_ids(hf, texts)

    import tiktoken  # the oracle can fail: with "abc" kept, tiktoken's ids differ from the tokenizer's

    kept = {**fast.encoding._mergeable_ranks, b"abc": vocab["abc"]}
    naive = tiktoken.Encoding("naive", pat_str=fast.encoding._pat_str, mergeable_ranks=kept, special_tokens={"<|endoftext|>": 0})
    assert naive.encode("abc") == [vocab["abc"]] != hf("abc", add_special_tokens=False)["input_ids"]


def test_a_process_forked_after_the_thread_pool_was_made_still_encodes(ref_tokenizer):
    """A forked child inherits the encoder (it is cached per tokenizer) but not its pool's threads: it must make its
    own pool rather than hand work to threads that do not exist there (which would wait forever). Two threads
    whatever the machine's cores, so the pool is made and used on a one-core machine too."""
    import multiprocessing

    from data.fast_bpe import FastEncoder

    fast = FastEncoder(fast_encoder(ref_tokenizer).encoding, threads=2)
    texts = _random_texts(3000, seed=5) * 3  # past the size encoded inline: the pool is used
    expected = fast.encode_batch(texts)
    assert fast._pool is not None

    def child(queue):
        queue.put(fast.encode_batch(texts) == expected)

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    proc.join(60)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive, "the forked child hung encoding"
    assert queue.get(timeout=5) is True


@pytest.mark.parametrize("change, reason", [
    (lambda t: setattr(t, "normalizer", __import__("tokenizers").normalizers.NFKC()), "normalizes"),
    (lambda t: setattr(t, "pre_tokenizer", __import__("tokenizers").pre_tokenizers.Whitespace()), "pre-tokenizer"),
    (lambda t: setattr(t, "pre_tokenizer", __import__("tokenizers").pre_tokenizers.ByteLevel(add_prefix_space=True)),
     "pre-tokenizer"),
    (lambda t: setattr(t.model, "ignore_merges", True), "whole words"),
    (lambda t: setattr(t.model, "dropout", 0.1), "dropout"),
    (lambda t: t.add_tokens(["<|end", "end|>"]), "overlap"),
    (lambda t: t.add_tokens([__import__("tokenizers").AddedToken("<pad>", lstrip=True)]), "strips"),
])
def test_tokenizers_it_cannot_match_get_no_encoder(gpt2_style_tokenizer, change, reason):
    """Each of these would change the ids in a way the encoder does not copy: they get None and a reason, and the
    callers fall back to the tokenizer itself."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(gpt2_style_tokenizer.backend_tokenizer.to_str())
    change(tok)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert fast_encoder(hf) is None
    assert reason in why_not(hf)


def test_merges_out_of_id_order_are_refused(gpt2_style_tokenizer):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(gpt2_style_tokenizer.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert fast_encoder(hf) is None and "order" in why_not(hf)


def test_regex_engines_agree_on_every_code_point():
    """The split's character classes, at every code point, in Oniguruma (the tokenizers backend's regex engine: a
    Split that removes the class's matches) and fancy-regex (tiktoken's: an encoding that drops what its pattern
    does not match). Python's `re` would not do: it misses the digits Unicode 16 added."""
    import tiktoken
    from tokenizers import Regex, pre_tokenizers

    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    text = "".join(chars)
    bytes_only = {bytes([b]): b for b in range(256)}
    for cls in (r"\s", r"\d", r"\p{L}", r"\p{N}"):
        kept = pre_tokenizers.Split(Regex(cls), behavior="removed").pre_tokenize_str(text)
        onig = set(chars) - set("".join(piece for piece, _ in kept))
        encoding = tiktoken.Encoding("class", pat_str=cls, mergeable_ranks=bytes_only, special_tokens={})
        fancy = set(encoding.decode(encoding.encode_ordinary(text)))
        assert onig == fancy, (cls, sorted(hex(ord(c)) for c in onig ^ fancy)[:10])
        assert len(onig) > 20
