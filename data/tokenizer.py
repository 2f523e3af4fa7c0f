"""The reference tokenizer: byte-level BPE in which task words are single tokens.

Pre-tokenization first isolates digit pairs (with an optional leading space),
so " 1732" becomes " 17" + "32" as in GPT-2, then applies GPT-2's byte-level
split. BPE is trained on the given texts; `required` words (names with a leading
space, the two-digit numbers 00-99, docstring argument names) must come out as
single tokens, and training fails loudly if one does not, rather than shipping a
tokenizer the tasks cannot use.
"""

from __future__ import annotations

from typing import Iterable

from data.tasks import DataError

SPECIAL = "<|endoftext|>"
DIGIT_PAIRS = r" ?\d\d"  # isolated before GPT-2's split: " 1732" is " 17" + "32"


def train_tokenizer(texts: Iterable[str], vocab_size: int, required: Iterable[str] = ()):
    """A `PreTrainedTokenizerFast` trained on `texts`, with every string in `required` a single token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(DIGIT_PAIRS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL)
    missing = [w for w in required if len(fast(w, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise DataError(f"{len(missing)} required words are not single tokens (e.g. {missing[:5]}); raise their frequency or the vocab size")
    return fast
