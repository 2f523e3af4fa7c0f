"""Build the bundled reference model `ref-gpt2`: tokenizer, data mixture, training, checkpoint.

`python -m workbench zoo build` calls `build(config, directory)`; this module is
a leaf (torch, tokenizers, transformers, data.*), so it also runs on its own.

The recipe, step by step:

1. Tokenizer. Byte-level BPE (`data.tokenizer.train_tokenizer`) on the train
   split of the reference corpus (the interpreter's standard-library sources and
   `pydoc_data` topics) plus a *primer*: every required word (the 192 names and
   the docstring argument words with a leading space, the numbers 00-99) in
   shuffled lists, so BPE merges each into one token. The primer trains the
   tokenizer only; the model never sees it.
2. Data. A deterministic stream; every step takes `batch_size` text rows of
   `context` tokens and `short_rows` short rows of `short_context` tokens, each
   row starting with BOS, each token carrying a loss weight:
   - text rows: the reference corpus's train split cut into chunks, shuffled
     per epoch by the seed (weight 1 everywhere);
   - task rows (short): one IOI, greater-than or docstring example from
     `data.tasks.examples(task, n, "train", seed)` with the answer appended,
     right after BOS exactly as an evaluation prompt, then padding of weight 0.
     Prompt tokens weigh `prompt_weight`, the answer token `answer_weight`
     (plain next-token loss leaves IOI at chance: the unpredictable name
     positions swamp the one informative token).
     A share of IOI and docstring examples (`generic_share`) fill the name /
     argument slots with other single-token words of the vocabulary, so the
     algorithm is learned over token identity, not a fixed list of names;
     held-out words are excluded from those fillers, so held-out names,
     arguments, templates and years never occur in task data
     (`task_examples` is the one source; the tests check it);
   - induction rows (short, `induction_share` of them): BOS, a segment of
     random tokens drawn from the whole vocabulary, the segment again, padding;
     the first copy is unpredictable and weighs 0, the repeat weighs 1.
   One example per short row keeps attention, early in training, on that
   example alone; packed 128-token rows left in-context copying on its loss
   plateau for thousands of steps (see `ZooConfig.short_rows`).
3. Model. GPT-2 (learned positions, pre-LayerNorm, GELU MLPs, tied embeddings),
   no dropout.
4. Training. AdamW (betas 0.9/0.95, weight decay on the blocks' matrices only), linear
   warmup, a stable stretch, cosine decay to `min_lr_ratio`, gradient clipping;
   the loss is the sum over the three streams of their weighted mean per-token
   cross entropy (`stream_weights`). Seeds, data order and thread count are
   fixed and `torch.use_deterministic_algorithms(True)` is on, so the same
   config on the same machine type, Python and torch gives the same weights.
   Held-out behaviour (`measure`) is logged every `eval_every` steps.
5. Save. HuggingFace format (config.json, model.safetensors, tokenizer.json,
   tokenizer_config.json) plus `model_card.json` (the recipe, seed, timings,
   versions, data counts, training curve) into a staging directory; the caller
   measures the behaviour through `workbench.load_model` and swaps the
   directory into place with `publish` only when everything is complete.

Behaviour (`measure`), on held-out prompts (`split="heldout"`: names,
templates, years and argument words never used in task training data):
- induction: per-token loss on `induction_sequences` (BOS, 20 random tokens,
  the same 20 again); first-half loss = tokens 2..20 of the first copy,
  second-half loss = tokens 2..20 of the repeat (the first token of each copy
  is unpredictable in both and left out); threshold: ratio <= 0.35;
- ioi: pairwise accuracy logit(IO) > logit(S) and mean logit(IO) - logit(S);
  threshold on the pairwise accuracy (>= 0.85) and the mean (>= 1.5); top-1
  accuracy (IO is the argmax of the whole vocabulary) is reported beside it;
- greater_than: mean P(YY' > YY) - P(YY' <= YY) >= 0.4;
- docstring: top-1 accuracy (the right argument is the argmax of the whole
  vocabulary) >= 0.5.
Each task also reports its metric on the corrupt prompts and the clean - corrupt gap.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import string
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from data.corpus import documents, token_chunks
from data.tasks import HELDOUT_TEMPLATES, DataError, Example, examples, induction_sequences, make_task, ordinary_token_ids
from data.words import DOC_ARGS, IOI_OBJECTS, IOI_PLACES, NAMES, split_pool

CARD = "model_card.json"
TASK_KINDS = ("ioi", "greater_than", "docstring")


@dataclass(frozen=True)
class ZooConfig:
    """The recipe of a reference model; saved in its model card."""

    seed: int = 0
    """Seeds the model initialisation, the data order and the synthetic examples."""
    vocab_size: int = 4096
    """BPE vocabulary size (special token included)."""
    d_model: int = 128
    n_layers: int = 3
    """Three. With two, attribution patching was already within 0.01 of exact patching on IOI's MLP outputs (no
    nonlinearity downstream of them for RelP's rules to fix); with a third block RelP beat it there on all four
    held-out IOI sentences before `slot_noise`, and still beats it on the main IOI set after (docs/circuits.md). Before `slot_noise`, the third block cost held-out IOI accuracy
    (0.73 against 0.77, mean of five samples of 1024 prompts) and gained text loss (4.09 against 4.44) and docstring (0.95 against 0.88)."""
    n_heads: int = 4
    context: int = 128
    """Tokens per training row (and the model's n_positions)."""
    batch_size: int = 4
    """Text rows (of `context` tokens) per step."""
    short_context: int = 64
    """Tokens per short row: one task example or one repeated random segment each, padded after it."""
    short_rows: int = 32
    """Short rows per step (see `induction_share`). Each holds one example, so attention at the start of training
    is spread over that example only, not over the whole packed row: in-context copying (induction, IOI's name
    movers, docstring's argument copying) then leaves its loss plateau within a few hundred steps, where packed
    128-token rows stayed on it for 3000 steps (measured: induction loss ratio 0.94 -> 0.52 in 1500 steps of a
    2-layer model on 48-token rows, none in 3000 on packed rows)."""
    steps: int = 8500
    """Optimizer steps (the schedule's length): 1684 s of training at 2 threads on an idle 2-core machine."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup: int = 200
    """Linear warmup steps; then `lr` held until the last `decay_fraction` of steps, which decay (cosine) to lr * min_lr_ratio."""
    decay_fraction: float = 0.25
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    induction_share: float = 0.5
    """Share of the short rows that are repeated random tokens; the rest are task examples."""
    stream_weights: tuple[float, float, float] = (1.0, 1.5, 2.0)
    """The loss is `sum(w * weighted mean loss of the stream)` over the text, induction and task streams. Pooling
    every token into one mean instead gave the ~130 repeat tokens of a step a tenth of the gradient, and induction
    stayed on its plateau (loss ratio 0.86 after 1750 steps); per-stream means give each stream its own share."""
    task_mix: tuple[float, float, float] = (0.6, 0.15, 0.25)
    """Relative frequency of ioi, greater_than, docstring examples in task rows."""
    answer_weight: float = 15.0
    """Loss weight of a task example's answer token."""
    prompt_weight: float = 1.0
    """Loss weight of a task example's prompt tokens."""
    generic_share: float = 0.6
    """Share of IOI and docstring examples whose names/arguments are other vocabulary words."""
    reworded_share: float = 0.0
    """Share of IOI examples whose sentence is reworded with random words (`reword_template`). Off: at 0.5 the
    held-out IOI accuracy after 4000 steps was lower (0.55 vs 0.64) and induction slower (0.60 vs 0.47)."""
    grammar_share: float = 0.5
    """Share of IOI examples whose sentence comes from `ioi_grammar` (opener x shared activity x transfer verb, a
    few thousand real sentences) instead of the twelve training templates. None of the held-out templates' own
    words (handed, threw, reached, ...) is in the grammar, so held-out sentences stay unseen."""
    slot_noise: tuple[float, float] = (0.5, 0.3)
    """Shares of grammar IOI sentences whose transfer phrase ("handed a {object} to") and whose activity phrase
    ("walked to the {place}") get random words in place of their own (`SlotNoise`), once training has reached
    `slot_noise_from`. Without it the model keyed "a name comes next" on the ~40 transfer verbs it had seen: on
    held-out sentences its top-1 token was a name 21% of the time and the pairwise accuracy was 0.73; held-out
    sentences with their verb swapped for "gave" scored 0.87. 600 extra steps with this noise from the
    finished model gave 0.91 (top-1 0.74); with the verb noise alone, 0.76-0.79 (top-1 0.51-0.62). Built with it
    from the start of the recipe (on from step 5950 of 8500), ref-gpt2 reads 0.955 (top-1 0.87)."""
    slot_noise_pieces: float = 0.5
    """Share of the random words that get one or two sub-word pieces glued on ("pattern" -> "patternedw"), as
    an unseen English word falls apart into several tokens of this Python-trained vocabulary (" threw" is
    " th" + "re" + "w")."""
    slot_noise_from: float = 0.7
    """The noise starts at this fraction of the steps; before it the data stream is exactly the recipe without
    noise. A model first learns the task on ordinary sentences; earlier trials that put random words into the
    sentences from step 0 learned IOI more slowly (0.55 against 0.64 held-out accuracy at step 4000)."""
    gt_answer_window: int = 10
    """Greater-than training answers: 0 draws any later two-digit year; k draws one of the next k years (as a
    war lasts a few years). A uniform draw over all later years is also what a model ignoring the start year
    gets right on average: trained on it, ref-gpt2 scored the same on clean and corrupt prompts (gap 0.002)."""
    sinusoidal_positions: bool = True
    """Initialise the (learned) position embeddings with sinusoids; see `sinusoids`."""
    induction_lengths: tuple[int, int] = (4, 30)
    """Range of random-segment lengths in induction rows."""
    max_documents: int = 0
    """Use only the first N corpus documents (0 = all); for quick smoke builds."""
    primer_repeats: int = 150
    """How many shuffled copies of the required-word list the tokenizer trains on."""
    threads: int = 2
    """torch threads (fixed: the weights depend on the count). Two, for a 2-core machine: a 3-layer step took
    0.187 s at two threads and 0.335 s at one. On a machine where another process keeps a core busy, OpenMP's
    spin-waiting threads are slower than one (0.785 s a step): build with `--threads 1` there (other weights)."""
    eval_every: int = 1000
    """Measure held-out behaviour every N steps (0 = only at the end)."""
    eval_prompts: int = 64
    """Prompts per task for the periodic measurement."""

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


PRESETS = {
    "ref": ZooConfig(),
    # A smoke-test recipe: seconds, not minutes; no behaviour to speak of.
    "tiny": ZooConfig(vocab_size=2000, d_model=32, n_layers=2, n_heads=2, context=64, batch_size=2, short_rows=6, steps=4, warmup=2,
                      max_documents=10, primer_repeats=60, eval_every=0, eval_prompts=16, threads=1),
}

THRESHOLDS = {"induction": 0.35, "ioi_accuracy": 0.85, "ioi_logit_diff": 1.5, "greater_than": 0.4, "docstring": 0.5}
MEASURE_PROMPTS = 1024
"""Held-out prompts per task for the behaviour figures (`zoo build`, `models`, `demo`). On 256, IOI accuracy moved
with the held-out names a sample drew: the 2-layer ref-gpt2 read 0.80 there and 0.75-0.79 on five samples of 1024."""


# ---------------------------------------------------------------------------- build
class BuildResult(NamedTuple):
    directory: Path
    card: dict


def build(config: ZooConfig, directory: str | os.PathLike, log: Callable[[str], None] | None = None,
          minutes: float | None = None) -> BuildResult:
    """Train a reference model with `config` and save it (HF format + model card) into `directory`.

    `directory` is written as it is: callers build into a staging directory and
    `publish` it. With `minutes`, the step count is set after timing the first
    steps so training fits the budget (the result then depends on machine speed;
    the card records the steps actually run).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    wall0, cpu0 = time.time(), time.process_time()
    _make_deterministic(config)
    tokenizer = build_tokenizer(config)
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - wall0:.0f}s)")
    stream = DataStream(config, tokenizer)
    log(f"data: {stream.text_tokens:,} corpus tokens in {len(stream.text_chunks):,} chunks of {config.context}")
    model = new_model(config, tokenizer)
    history, steps = train(model, stream, tokenizer, config, log, minutes)
    model.eval()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    card = _card(config, stream, steps, history, time.time() - wall0, time.process_time() - cpu0)
    write_card(directory, card)
    return BuildResult(directory, card)


def build_tokenizer(config: ZooConfig):
    """BPE trained on the corpus train split plus the required-word primer (see the module docstring)."""
    from data.tokenizer import train_tokenizer

    rng = random.Random(f"primer:{config.seed}")
    required = required_words()
    # Two-digit numbers follow another digit pair, as in years (" 1732" -> " 17" + "32"), so they merge without a space.
    words = [w if not w.isdigit() else f" {rng.randint(10, 20)}{w}" for w in required]
    primer = [" ".join(rng.sample(words, len(words))) for _ in range(config.primer_repeats)]
    return train_tokenizer(_corpus(config, "train") + primer, config.vocab_size, required)


def required_words() -> list[str]:
    """Strings the tokenizer must keep whole: names and docstring arguments with a leading space, 00-99."""
    return [" " + n for n in NAMES] + [f"{i:02d}" for i in range(100)] + [" " + a for a in DOC_ARGS]


def new_model(config: ZooConfig, tokenizer):
    """A freshly initialised GPT-2 (seeded) sized by `config`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.context, n_embd=config.d_model, n_layer=config.n_layers,
        n_head=config.n_heads, n_inner=4 * config.d_model, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    torch.manual_seed(config.seed)
    model = GPT2LMHeadModel(hf_config)
    if config.sinusoidal_positions:
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoids(config.context, config.d_model, model.transformer.wte.weight.std().item()))
    return model


def sinusoids(n_positions: int, d_model: int, scale: float) -> Tensor:
    """[n_positions, d_model] sine/cosine position codes (Vaswani et al.), each coordinate of RMS `scale`.

    The reference model's learned position embeddings start here instead of at
    random: "attend to the previous token" is then one linear map (a rotation)
    for every position, so previous-token and induction heads form in hundreds
    of steps rather than thousands. The embeddings stay ordinary trained GPT-2 parameters.
    """
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(-math.log(10_000.0) * torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    codes = torch.zeros(n_positions, d_model)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)
    return codes * scale * math.sqrt(2.0)


def publish(staging: Path, target: Path) -> None:
    """Swap a complete staging directory into `target`.

    The old `target` is renamed aside first and removed only after the new one
    is in place; if the second rename fails the old one is put back. A `target`
    that exists but is not a model directory is never touched.
    """
    staging, target = Path(staging), Path(target)
    if target.exists() and not (target / "config.json").is_file() and any(target.iterdir()):
        raise DataError(f"{target} exists and is not a model directory; refusing to replace it (pass an empty or new --out)")
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        if aside.exists():
            os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def read_card(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / CARD
    return json.loads(path.read_text()) if path.is_file() else None


def write_card(directory: str | os.PathLike, card: dict) -> None:
    path = Path(directory) / CARD
    tmp = path.with_name(f".{CARD}.tmp")
    tmp.write_text(json.dumps(card, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def config_from_dict(values: dict) -> ZooConfig:
    """A ZooConfig from a card's `recipe` (lists back to tuples)."""
    known = {f.name for f in fields(ZooConfig)}
    cleaned = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return replace(ZooConfig(), **cleaned)


# ---------------------------------------------------------------------------- data
class Row(NamedTuple):
    tokens: list[int]  # [context], starting with BOS
    weights: list[float]  # [context]; weights[j] is the loss weight of predicting tokens[j] (weights[0] = 0)


class DataStream:
    """The deterministic training stream: `batch()` -> two (tokens, weights) pairs, text rows [batch_size, context]
    and short rows [short_rows, short_context] (see `Row` for the weights)."""

    def __init__(self, config: ZooConfig, tokenizer):
        if 2 * config.induction_lengths[1] + 1 > config.short_context:
            raise DataError(f"induction segments of up to {config.induction_lengths[1]} tokens do not fit "
                            f"twice in short rows of {config.short_context}")
        self.config, self.tokenizer = config, tokenizer
        self.bos = tokenizer.bos_token_id
        self.vocab = ordinary_token_ids(tokenizer)
        self.text_chunks = list(token_chunks(tokenizer, _corpus(config, "train"), config.context))
        if not self.text_chunks:
            raise DataError("the reference corpus gave no text chunks; is the standard library present?")
        self.text_tokens = len(self.text_chunks) * (config.context - 1)
        self.rng = random.Random(f"stream:{config.seed}")
        self.text_order: list[int] = []
        self.noisy = False  # `ZooConfig.slot_noise` on yet? (set by `train`)
        self.examples = task_examples(config, tokenizer, noisy=lambda: self.noisy)
        n_ind = round(config.short_rows * config.induction_share)
        self.short_kinds = ["induction"] * n_ind + ["task"] * (config.short_rows - n_ind)
        self.counts = {"text": 0, "induction": 0, "task_examples": 0, "too_long_examples_skipped": 0}

    def batch(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
        text = [self._text_row() for _ in range(self.config.batch_size)]
        short = [self._induction_row() if kind == "induction" else self._task_row() for kind in self.short_kinds]
        self.counts["text"] += len(text)
        self.counts["induction"] += self.short_kinds.count("induction")
        induction = torch.tensor([kind == "induction" for kind in self.short_kinds])
        return ((torch.tensor([r.tokens for r in text]), torch.tensor([r.weights for r in text])),
                (torch.tensor([r.tokens for r in short]), torch.tensor([r.weights for r in short]), induction))

    def _text_row(self) -> Row:
        if not self.text_order:  # a new epoch: a fresh seeded permutation
            self.text_order = list(range(len(self.text_chunks)))
            self.rng.shuffle(self.text_order)
        chunk = self.text_chunks[self.text_order.pop()]
        return Row(chunk, [0.0] + [1.0] * (len(chunk) - 1))

    def _padded(self, tokens: list[int], weights: list[float]) -> Row:
        pad = self.config.short_context - len(tokens)
        return Row(tokens + [self.bos] * pad, weights + [0.0] * pad)

    def _induction_row(self) -> Row:
        """BOS, a segment `s` of random tokens, `s` again; padding (weight 0) after it."""
        lo, hi = self.config.induction_lengths
        seg = self.rng.sample(self.vocab, self.rng.randint(lo, hi))
        return self._padded([self.bos] + seg + seg, [0.0] + [0.0] * len(seg) + [1.0] * len(seg))

    def _task_row(self) -> Row:
        """BOS, one task example (prompt + answer) exactly as an evaluation prompt follows BOS; padding after it."""
        while True:
            ids, ws = next(self.examples)
            if len(ids) < self.config.short_context:
                break
            self.counts["too_long_examples_skipped"] += 1
        self.counts["task_examples"] += 1
        return self._padded([self.bos] + ids, [0.0] + ws)


def _train_templates(task: str) -> list[str]:
    from data.tasks import TEMPLATES

    return TEMPLATES[task][: -HELDOUT_TEMPLATES[task]]


class TrainingExample(NamedTuple):
    task: str
    generic: bool
    example: Example
    answer: str  # the answer appended to the prompt in training
    template: str | None = None  # the reworded template of a reworded IOI example (see `reword_template`)


def task_examples(config: ZooConfig, tokenizer, noisy: Callable[[], bool] = lambda: True) -> Iterator[tuple[list[int], list[float]]]:
    """Endless tokenized task examples (prompt + answer) with their loss weights, in a fixed order."""
    for ex in training_examples(config, tokenizer, noisy=noisy):
        prompt = tokenizer(ex.example.clean, add_special_tokens=False)["input_ids"]
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        weights = [config.prompt_weight] * len(prompt) + [config.answer_weight] * len(answer)
        yield prompt + answer, weights


def training_examples(config: ZooConfig, tokenizer, chunk: int = 512,
                      noisy: Callable[[], bool] = lambda: True) -> Iterator[TrainingExample]:
    """The text-level task examples the model trains on, in order (the one source of task data).

    Only `split="train"` pools and templates are used; generic fillers exclude
    every held-out name and argument word. `noisy()` says, as each example is drawn,
    whether `config.slot_noise` applies yet (the build turns it on at `slot_noise_from`);
    while it is off no random draw is spent on it.
    """
    rng = random.Random(f"tasks:{config.seed}")
    generic = generic_pools(tokenizer)
    reword_pool = reword_words(tokenizer) if config.reworded_share > 0 else []
    noise = SlotNoise(tokenizer, config.slot_noise, config.slot_noise_pieces) if any(config.slot_noise) else None
    tasks = list(TASK_KINDS)
    for c in itertools.count():
        batches = {t: iter(examples(t, chunk, "train", seed=config.seed * 100_003 + c)) for t in tasks}
        generic_batches = {t: iter(examples(t, chunk, "train", seed=config.seed * 100_003 + c, pools=generic[t]))
                           for t in ("ioi", "docstring") if generic.get(t)}
        for _ in range(chunk):
            task = rng.choices(tasks, weights=config.task_mix)[0]
            use_generic = task in generic_batches and rng.random() < config.generic_share
            ex = next(generic_batches[task] if use_generic else batches[task])
            if task == "greater_than":  # answers are the later years in ascending order
                answer = rng.choice(ex.answers[: config.gt_answer_window] if config.gt_answer_window else ex.answers)
            else:
                answer = ex.answers[0]
            rewrite = None
            if task == "ioi" and config.grammar_share > 0 and rng.random() < config.grammar_share:
                rewrite = functools.partial(ioi_grammar_template, noise=noise if noisy() else None)
            elif task == "ioi" and config.reworded_share > 0 and rng.random() < config.reworded_share:
                rewrite = functools.partial(reword_template, IOI_TRAIN_TEMPLATES[ex.template], reword_pool)
            if rewrite is not None:
                while True:  # a filler word equal to one of the names would break "the name seen once"
                    template = rewrite(rng=rng)
                    new = _reworded_ioi(ex, template, generic.get("ioi", {}).get("names") if use_generic else None, rng)
                    words = re.findall(r"\w+", new.clean)
                    if words.count(new.answers[0].strip()) == 1 and words.count(new.wrongs[0].strip()) == 2:
                        break
                yield TrainingExample(task, use_generic, new, new.answers[0], template)
                continue
            yield TrainingExample(task, use_generic, ex, answer)


IOI_TRAIN_TEMPLATES = _train_templates("ioi")
KEPT_WORDS = {"and", "to"}

# IOI sentences from parts: "<opener> N1 and N2 <activity>, S <transfer> to". Every part is ordinary English; the
# held-out templates' own words are excluded (`heldout_template_words`, checked by tests/test_zoo.py).
IOI_OPENERS_CLAUSE = ["When", "After", "While", "As", "Because", "Before", "Since", "As soon as", "Just after",
                      "Right after", "The day", "Every time", "Whenever", "If"]
IOI_OPENERS_SENTENCE = ["", "Then,", "Afterwards,", "Yesterday,", "Today,", "That evening,", "In the morning,",
                        "On Monday,", "Last week,", "Eventually,", "Soon,", "Meanwhile,", "At noon,", "Recently,",
                        "After the lunch,", "One day,", "That night,", "In the end,"]
IOI_ACTIVITIES = [
    "went to the {place}", "were at the {place}", "met at the {place}", "stayed at the {place}",
    "visited the {place}", "left the {place}", "came back from the {place}", "got a {object} at the {place}",
    "found a {object} at the {place}", "bought a {object} at the {place}", "were working at the {place}",
    "were sitting in the {place}", "were playing near the {place}", "had lunch at the {place}",
    "had a lot of fun at the {place}", "were cleaning the {place}", "looked around the {place}",
    "ran to the {place}", "drove to the {place}", "moved to the {place}", "were waiting at the {place}",
    "spent the day at the {place}", "had a long argument", "had a long talk", "were talking",
    "started a new project", "cooked dinner", "went home", "were commuting to the {place}",
    "saw a {object} in the {place}", "lost a {object} at the {place}", "fixed the {object}",
]
IOI_TRANSFERS = [
    "gave a {object} to", "gave the {object} to", "gave it to", "sent a {object} to", "showed the {object} to",
    "brought a {object} to", "sold the {object} to", "lent a {object} to", "offered a {object} to",
    "mailed a {object} to", "tossed the {object} to", "returned the {object} to", "read a story to",
    "told a joke to", "wrote a letter to", "said goodbye to", "said hello to", "waved to", "talked to",
    "spoke to", "decided to give a {object} to", "tried to sell the {object} to", "promised a {object} to",
    "delivered a {object} to", "described the {object} to", "kicked the {object} to", "explained the problem to",
    "sang a song to", "presented a {object} to", "gave a present to", "sent an email to", "showed a photo to",
    "decided to send it to", "had to give the {object} to", "quickly gave a {object} to", "said sorry to",
]


def ioi_grammar_template(rng: random.Random, noise: "SlotNoise | None" = None) -> str:
    """One IOI sentence template from `IOI_OPENERS_*`, `IOI_ACTIVITIES` and `IOI_TRANSFERS` (with `noise`, its
    transfer and activity phrases may be reworded)."""
    activity, transfer = rng.choice(IOI_ACTIVITIES), rng.choice(IOI_TRANSFERS)
    if noise is not None:
        transfer, activity = noise.transfer(transfer, rng), noise.activity(activity, rng)
    form = rng.randrange(3)
    if form == 0:
        return f"{rng.choice(IOI_OPENERS_CLAUSE)} {{N1}} and {{N2}} {activity}, {{S}} {transfer}"
    if form == 1:
        opener = rng.choice(IOI_OPENERS_SENTENCE)
        return f"{opener + ' ' if opener else ''}{{N1}} and {{N2}} {activity}. {{S}} {transfer}"
    return f"{rng.choice(IOI_OPENERS_SENTENCE[1:])} {{N1}} and {{N2}} {activity}, and {{S}} {transfer}"


class SlotNoise:
    """Random words for the transfer and activity phrases of grammar IOI sentences (`ZooConfig.slot_noise`).

    Each word of the phrase except a/an/the/it/to/and becomes a random word of `words` (`reword_words`),
    with one or two glued-on sub-word pieces for a `pieces` share of them; the {place}/{object} slots stay. So
    "S handed a {object} to" is met in training as "S <some word> a {object} to", and the model learns that
    the name comes after "S ... to" whatever the verb. A word that would spell any word of the IOI sentences
    (the held-out ones among them), a name or a held-out argument is drawn again.
    """

    KEPT = {"a", "an", "the", "it", "to", "and"}

    def __init__(self, tokenizer, shares: tuple[float, float], pieces: float):
        from data.tasks import TEMPLATES

        self.shares, self.pieces = shares, pieces
        self.words = reword_words(tokenizer)
        self.suffixes = sorted({t for t in (tokenizer.decode([i]) for i in ordinary_token_ids(tokenizer))
                                if t.isascii() and t.isalpha() and t.islower() and len(t) <= 4})
        if len(self.words) < 20 or len(self.suffixes) < 20:
            raise DataError(f"the vocabulary has too few plain words ({len(self.words)}) or pieces ({len(self.suffixes)}) for slot noise")
        self.banned = ({w.lower() for t in TEMPLATES["ioi"] for w in re.findall(r"[A-Za-z]+", t)}
                       | {w.lower() for w in ioi_grammar_words() | set(IOI_PLACES) | set(IOI_OBJECTS) | set(NAMES)}
                       | set(split_pool(DOC_ARGS).heldout))

    def transfer(self, phrase: str, rng: random.Random) -> str:
        return self._reword(phrase, rng) if rng.random() < self.shares[0] else phrase

    def activity(self, phrase: str, rng: random.Random) -> str:
        return self._reword(phrase, rng) if rng.random() < self.shares[1] else phrase

    def _reword(self, phrase: str, rng: random.Random) -> str:
        parts = re.split(r"(\{\w+\})", phrase)
        return "".join(p if p.startswith("{") else re.sub(r"[A-Za-z]+", lambda m: self._word(m.group(0), rng), p) for p in parts)

    def _word(self, word: str, rng: random.Random) -> str:
        if word in self.KEPT:
            return word
        while True:
            new = rng.choice(self.words)
            if rng.random() < self.pieces:
                new += "".join(rng.choice(self.suffixes) for _ in range(rng.randint(1, 2)))
            if new.lower() not in self.banned:
                return new


def heldout_template_words() -> set[str]:
    """Words of the held-out IOI templates that no training template has (the held-out sentences' own words)."""
    from data.tasks import TEMPLATES

    k = HELDOUT_TEMPLATES["ioi"]
    return _own_words(TEMPLATES["ioi"][-k:]) - _own_words(TEMPLATES["ioi"][:-k])


def ioi_grammar_words() -> set[str]:
    return _own_words(IOI_OPENERS_CLAUSE + IOI_OPENERS_SENTENCE + IOI_ACTIVITIES + IOI_TRANSFERS)


def _own_words(texts: list[str]) -> set[str]:
    """The words of `texts` outside their {placeholders}."""
    return {w for t in texts for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", " ", t))}


def reword_template(template: str, pool: list[str], rng: random.Random) -> str:
    """`template` with each of its own words except "and" and "to" replaced by a random word of `pool`.

    The slots ({N1}, {N2}, {S}, {place}, {object}) and punctuation stay, so the example keeps IOI's structure
    ("N1 and N2 ..., S ... to" -> the name seen once) in a sentence the model has never seen. Trained on twelve
    fixed sentences, the model reached 0.84 accuracy on held-out sentences with train names (1.00 on train
    sentences): it had learned the sentences as much as the task.
    """
    out = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        out.append(re.sub(r"[A-Za-z]+", lambda m: m.group(0) if m.group(0) in KEPT_WORDS else rng.choice(pool), literal))
        if name is not None:
            out.append("{" + name + "}")
    return "".join(out)


def _reworded_ioi(ex: Example, template: str, names: list[str] | None, rng: random.Random) -> Example:
    """The example's names, place and object in a reworded template (fresh generic names when `names` is given)."""
    slots = template_slots(IOI_TRAIN_TEMPLATES[ex.template], ex.clean)
    if slots is None:
        raise DataError(f"{ex.clean!r} does not follow the template {IOI_TRAIN_TEMPLATES[ex.template]!r}")
    n1, n2, s = slots["N1"], slots["N2"], slots["S"]
    io = n1 if s == n2 else n2
    if names is not None:
        io, s = rng.sample(names, 2)
        n1, n2 = (io, s) if rng.random() < 0.5 else (s, io)
    fill = {k: v for k, v in slots.items() if k in ("place", "object")}
    for key, pool in (("place", IOI_PLACES), ("object", IOI_OBJECTS)):  # a template without that slot filled none
        fill.setdefault(key, rng.choice(split_pool(pool).train))
    clean = template.format(N1=n1, N2=n2, S=s, **fill)
    return Example(clean, "", answers=(" " + io,), wrongs=(" " + s,), template=ex.template)


def template_slots(template: str, text: str) -> dict[str, str] | None:
    """The values `text` gives the placeholders of `template` (a repeated placeholder must repeat)."""
    pattern, named = "", set()
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P={name})" if name in named else f"(?P<{name}>.+?)"
            named.add(name)
    match = re.fullmatch(pattern, text, re.S)
    return match.groupdict() if match else None


def reword_words(tokenizer) -> list[str]:
    """Lowercase single-token words for reworded IOI templates: no held-out template word, name or argument."""
    from data.tasks import TEMPLATES

    # every template's words (the held-out ones among them), so a filler never repeats a word of its sentence
    banned = {w.lower() for t in TEMPLATES["ioi"] for w in re.findall(r"[A-Za-z]+", t)}
    banned |= set(split_pool(NAMES).heldout) | set(split_pool(DOC_ARGS).heldout)
    pool = generic_pools(tokenizer).get("docstring", {}).get("args", [])
    return [w for w in pool if w not in banned]


def generic_pools(tokenizer) -> dict[str, dict[str, list[str]]]:
    """Word pools for generic IOI/docstring examples: single-token words of this vocabulary, held-out words excluded.

    IOI fillers are every alphanumeric token with a leading space (any case, digits too), except the words of
    the sentences themselves: trained on names and capitalised words only, the model recognised the ~400 names
    it had seen and stayed at chance on held-out names (train-name accuracy 0.88, held-out 0.52), so the fillers
    must make "a name" mean "whatever stands in the slot", as induction's random tokens do. Docstring arguments
    are lowercase words.
    """
    from data.tasks import TEMPLATES, _pools

    heldout = set(split_pool(NAMES).heldout) | set(split_pool(DOC_ARGS).heldout)
    # A filler that also occurs in the sentence would appear twice and break the task's "the name seen once" logic.
    in_sentences = ({w for t in TEMPLATES["ioi"] for w in re.findall(r"[A-Za-z]+", t)} | ioi_grammar_words()
                    | set(IOI_PLACES) | set(IOI_OBJECTS))
    words, lower = [], []
    for i in ordinary_token_ids(tokenizer):
        text = tokenizer.decode([i])
        word = text[1:]
        if not (text.startswith(" ") and word.isascii() and word.isalnum()) or word in heldout or word in in_sentences:
            continue
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [i]:
            continue
        words.append(word)
        if word.isalpha() and word.islower() and len(word) >= 2 and word not in ("self", "cls"):
            lower.append(word)
    pools = {}
    if len(words) >= 10:
        pools["ioi"] = dict(_pools("ioi", None, "train"), names=words)
    if len(lower) >= 20:
        pools["docstring"] = dict(_pools("docstring", None, "train"), args=lower)
    return pools


# ---------------------------------------------------------------------------- training
def train(model, stream: DataStream, tokenizer, config: ZooConfig, log, minutes: float | None = None):
    """The training loop: `for step: loss = step(batch)`; returns (history, steps run)."""
    from tqdm import tqdm

    optimizer = _optimizer(model, config)
    total = config.steps
    history = []
    started = time.time()
    bar = tqdm(total=total, file=sys.stderr, disable=None, desc="zoo build", unit="step")
    step = 0
    while step < total:
        lr = _lr(step, total, config)
        stream.noisy = step >= int(total * config.slot_noise_from)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _step(model, optimizer, stream.batch(), config)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        if minutes is not None and step == 10:
            total = max(step + 1, int(minutes * 60 / ((time.time() - started) / step)))
            bar.total = total
        if step == total or (config.eval_every and step % config.eval_every == 0):
            history.append(_checkpoint_record(model, tokenizer, config, step, loss, time.time() - started))
            log(_format_record(history[-1]))
    bar.close()
    return history, step


def _step(model, optimizer, batches, config: ZooConfig) -> float:
    """One optimizer step on `sum(stream weight * weighted mean cross entropy of the stream)`; returns the loss.

    `batches` is `DataStream.batch()`: (text tokens, weights), (short tokens, weights, is-induction row mask).
    """
    (text, text_w), (short, short_w, induction) = batches
    w_text, w_ind, w_task = config.stream_weights
    per_text = _token_losses(model, text)  # [rows, pos-1]
    per_short = _token_losses(model, short)
    sw = short_w[:, 1:]
    ind = sw * induction[:, None]
    task = sw * (~induction)[:, None]
    loss = w_text * _weighted_mean(per_text, text_w[:, 1:])
    loss = loss + w_ind * _weighted_mean(per_short, ind) + w_task * _weighted_mean(per_short, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()


def _token_losses(model, tokens: Tensor) -> Tensor:
    """[rows, pos-1] next-token cross entropy."""
    logits = model(tokens).logits[:, :-1]  # [rows, pos-1, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none").view(logits.shape[:2])


def _weighted_mean(losses: Tensor, weights: Tensor) -> Tensor:
    return (losses * weights).sum() / weights.sum().clamp_min(1e-9)


def _optimizer(model, config: ZooConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on the blocks' matrices; none on embeddings, biases and LayerNorm gains.

    The embeddings are tied to the unembedding, and in-context copying of a token is only as strong as its
    embedding's norm: decay shrank the embeddings of the many tokens that appear only in the random induction
    rows, and the induction loss ratio stalled near 0.75.
    """
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if p.ndim < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8)


def _lr(step: int, total: int, config: ZooConfig) -> float:
    """Warmup, stable, decay: linear warmup to `lr`, hold it, cosine decay to `lr * min_lr_ratio` over the last `decay_fraction`.

    Circuits (induction, IOI) appear abruptly after a plateau; a long stretch at
    the peak rate gets them out of it sooner than a cosine that starts decaying at once.
    """
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    decay_start = max(config.warmup, int(total * (1 - config.decay_fraction)))
    progress = min(1.0, max(0, step - decay_start) / max(1, total - decay_start))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _checkpoint_record(model, tokenizer, config: ZooConfig, step: int, loss: float, seconds: float) -> dict:
    model.eval()
    behaviour = measure(hf_logits(model), tokenizer, n=config.eval_prompts, seed=1, context=config.context)
    model.train()
    return {"step": step, "seconds": round(seconds, 1), "train_loss": round(loss, 4), **headline(behaviour)}


def _format_record(r: dict) -> str:
    return (f"step {r['step']} ({r['seconds']:.0f}s) loss {r['train_loss']:.3f} | text {r['text_loss']:.3f} | "
            f"induction ratio {r['induction_loss_ratio']:.3f} | ioi acc {r['ioi_accuracy']:.2f} top1 {r['ioi_top1']:.2f} "
            f"ld {r['ioi_logit_diff']:.2f} | gt pd {r['greater_than_prob_diff']:.3f} | doc top1 {r['docstring_top1']:.2f}")


def _make_deterministic(config: ZooConfig) -> None:
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)


def _corpus(config: ZooConfig, split: str) -> list[str]:
    docs = documents("reference", split)
    return list(itertools.islice(docs, config.max_documents) if config.max_documents else docs)


def _card(config: ZooConfig, stream: DataStream, steps: int, history: list, wall: float, cpu: float) -> dict:
    import tokenizers
    import transformers

    return {
        "name": "ref-gpt2",
        "architecture": "GPT2LMHeadModel",
        "recipe": asdict(config),
        "seed": config.seed,
        "steps": steps,
        "tokens_seen": steps * (config.batch_size * config.context + config.short_rows * config.short_context),
        "rows_seen": dict(stream.counts),
        "corpus": {"source": "reference (standard library + pydoc_data topics), train split", "chunks": len(stream.text_chunks),
                   "tokens": stream.text_tokens, "documents": len(_corpus(config, "train"))},
        "training_wall_seconds": round(wall, 1),
        "training_cpu_seconds": round(cpu, 1),
        "threads": config.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "history": history,
        "thresholds": THRESHOLDS,
    }


# ---------------------------------------------------------------------------- behaviour
@dataclass(frozen=True)
class InductionScore:
    """Repeated random tokens: the loss falls on the repeat when the model copies from context."""

    n: int
    length: int
    first_half_loss: float  # mean loss on tokens 2..length of the first copy
    second_half_loss: float  # mean loss on tokens 2..length of the repeat
    loss_ratio: float  # second / first; threshold: <= 0.35
    logit_diff: float  # make_task("induction") metric on clean prompts
    corrupt_logit_diff: float  # ... on corrupt prompts (first copy replaced)
    gap: float
    passed: bool


@dataclass(frozen=True)
class TaskScore:
    """One prompt task on held-out prompts; `metric` is the task's own metric (data.tasks.METRIC_OF)."""

    task: str
    n: int
    metric: str
    clean: float  # mean metric on clean prompts
    corrupt: float  # mean metric on corrupt prompts
    gap: float  # clean - corrupt
    accuracy: float  # pairwise: share of clean prompts with metric > 0
    top1: float  # share of clean prompts whose argmax over the vocabulary is an answer
    threshold: str  # the figure(s) the threshold applies to
    passed: bool


@dataclass(frozen=True)
class Behaviour:
    split: str
    text_loss: float  # mean next-token loss (nats) on held-out reference-corpus text
    induction: InductionScore
    ioi: TaskScore
    greater_than: TaskScore
    docstring: TaskScore

    @property
    def passed(self) -> bool:
        return all(s.passed for s in (self.induction, self.ioi, self.greater_than, self.docstring))

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


LogitsFn = Callable[[Tensor], Tensor]  # tokens [batch, pos] -> logits [batch, pos, vocab]


def measure(logits_of: LogitsFn, tokenizer, n: int = MEASURE_PROMPTS, seed: int = 0, split: str = "heldout",
            batch_size: int = 64, context: int = 128) -> Behaviour:
    """The four behaviours (and held-out text loss) of any model given as a logits function."""
    with torch.no_grad():
        return Behaviour(
            split=split,
            text_loss=_text_loss(logits_of, tokenizer, min(n, 64), context, batch_size),
            induction=_induction_score(logits_of, tokenizer, n, seed, split, batch_size),
            ioi=_task_score("ioi", logits_of, tokenizer, n, seed, split, batch_size),
            greater_than=_task_score("greater_than", logits_of, tokenizer, n, seed, split, batch_size),
            docstring=_task_score("docstring", logits_of, tokenizer, n, seed, split, batch_size),
        )


def headline(b: Behaviour) -> dict:
    """The figures the thresholds apply to, flat (for logs and training curves)."""
    return {
        "text_loss": round(b.text_loss, 4),
        "induction_loss_ratio": round(b.induction.loss_ratio, 4),
        "ioi_accuracy": round(b.ioi.accuracy, 4),
        "ioi_top1": round(b.ioi.top1, 4),
        "ioi_logit_diff": round(b.ioi.clean, 4),
        "greater_than_prob_diff": round(b.greater_than.clean, 4),
        "docstring_top1": round(b.docstring.top1, 4),
    }


def hf_logits(model) -> LogitsFn:
    """A logits function for a HuggingFace causal LM."""
    device = next(model.parameters()).device
    return lambda tokens: model(tokens.to(device)).logits


def _batched(logits_of: LogitsFn, tokens: Tensor, batch_size: int) -> Tensor:
    return torch.cat([logits_of(tokens[i:i + batch_size]).float().cpu() for i in range(0, len(tokens), batch_size)])


def _task_score(task: str, logits_of: LogitsFn, tokenizer, n: int, seed: int, split: str, batch_size: int) -> TaskScore:
    prompts = make_task(task, tokenizer, n=n, split=split, seed=seed)
    clean = prompts.final_logits(_batched(logits_of, prompts.clean, batch_size))  # [batch, vocab]
    corrupt = prompts.final_logits(_batched(logits_of, prompts.corrupt, batch_size))
    m_clean, m_corrupt = prompts.metric(clean), prompts.metric(corrupt)
    accuracy = prompts.accuracy(clean).float().mean().item()
    top1 = prompts.accuracy(clean, top1=True).float().mean().item()
    if task == "ioi":
        rule, passed = "accuracy (pairwise) >= 0.85 and clean (mean logit diff) >= 1.5", (
            accuracy >= THRESHOLDS["ioi_accuracy"] and m_clean.mean().item() >= THRESHOLDS["ioi_logit_diff"])
    elif task == "greater_than":
        rule, passed = "clean (mean prob diff) >= 0.4", m_clean.mean().item() >= THRESHOLDS["greater_than"]
    else:
        rule, passed = "top1 >= 0.5", top1 >= THRESHOLDS["docstring"]
    return TaskScore(task, len(prompts), prompts.metric_kind, m_clean.mean().item(), m_corrupt.mean().item(),
                     (m_clean - m_corrupt).mean().item(), accuracy, top1, rule, bool(passed))


def _induction_score(logits_of: LogitsFn, tokenizer, n: int, seed: int, split: str, batch_size: int) -> InductionScore:
    length = 20
    seqs = induction_sequences(tokenizer, n, length=length, seed=seed)  # [n, 1 + 2*length], tokens from the whole vocab
    logits = _batched(logits_of, seqs, batch_size)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), seqs[:, 1:], reduction="none")  # [n, 2*length]; loss[:, j] predicts seqs[:, j+1]
    first = loss[:, 1:length].mean().item()  # tokens 2..length of the first copy
    second = loss[:, length + 1:].mean().item()  # tokens 2..length of the repeat
    prompts = make_task("induction", tokenizer, n=n, split=split, seed=seed)
    m_clean = prompts.metric(_batched(logits_of, prompts.clean, batch_size))
    m_corrupt = prompts.metric(_batched(logits_of, prompts.corrupt, batch_size))
    ratio = second / first
    return InductionScore(n, length, first, second, ratio, m_clean.mean().item(), m_corrupt.mean().item(),
                          (m_clean - m_corrupt).mean().item(), ratio <= THRESHOLDS["induction"])


@functools.lru_cache(maxsize=1)
def _heldout_documents() -> tuple[str, ...]:
    return tuple(documents("reference", "heldout"))


def _text_loss(logits_of: LogitsFn, tokenizer, n_chunks: int, context: int, batch_size: int) -> float:
    chunks = list(itertools.islice(token_chunks(tokenizer, _heldout_documents(), context), n_chunks))
    if not chunks:
        return float("nan")
    tokens = torch.tensor(chunks)
    logits = _batched(logits_of, tokens, batch_size)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:]).item()
