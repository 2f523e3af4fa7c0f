"""Task prompt sets: clean/corrupt pairs, answer tokens, and the task metric.

A task turns text templates into a `TaskPrompts` batch for one tokenizer:

1. `examples(task, n, split, seed)` draws text-level `Example`s (clean prompt,
   corrupt prompt, answer strings, wrong-answer strings) from the task's
   templates and word pools; `split="train"` uses the training halves of the
   pools and templates, `split="heldout"` the halves the reference model never
   saw in task data (see `data.words.split_pool`).
2. `tokenize(examples, tokenizer)` checks every answer is one token and every
   clean/corrupt pair has the same length, and right-pads the batch. Right
   padding is harmless for a causal model: logits are read at `final_pos`.
3. `TaskPrompts.metric(logits)` gives one number per prompt, higher = more of
   the behaviour; it is differentiable, so attribution methods use it directly.

The tasks:
- `ioi` (Wang et al. 2022): "When Mary and John went to the store, John gave a
  drink to" -> " Mary". Corrupt: the three names replaced by three others (the
  "ABC" distribution). Metric: logit(IO) - logit(S).
- `greater_than` (Hanna et al. 2023): "The war lasted from the year 1732 to the
  year 17" -> any of 33..99. Corrupt: the start year's last two digits set to 01.
  Metric: P(YY' > YY) - P(YY' <= YY) over the full softmax.
- `docstring` (Heimersheim & Janiak 2023): a Python def with five arguments and
  a docstring documenting the first two; the next `:param` is the third.
  Corrupt: the def's argument names replaced by others. Metric: logit of the
  right argument minus the largest logit among the other arguments.
- `induction`: a random token sequence repeated; predict the next token of the
  repeat. Corrupt: the first copy replaced by other random tokens. Metric:
  logit(right token) - logit(the token the corrupt copy had there).
A user prompt set is a JSONL file; see `load_jsonl`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from data.words import DOC_ARGS, DOC_FUNCS, DOC_WORDS, GT_NOUNS, IOI_OBJECTS, IOI_PLACES, NAMES, split_pool

TASKS = ("ioi", "greater_than", "docstring", "induction")
METRICS = ("logit_diff", "prob_diff", "logit_diff_max_wrong")
SPLITS = ("train", "heldout")


class DataError(ValueError):
    """Bad task input (unknown task, a prompt that does not tokenize as needed, bad JSONL); one line that says which."""


@dataclass(frozen=True)
class Example:
    """One text-level prompt pair, before tokenization."""

    clean: str
    corrupt: str
    answers: tuple[str, ...]  # each must be a single token
    wrongs: tuple[str, ...]
    template: int = 0


@dataclass(frozen=True)
class TaskPrompts:
    """A tokenized batch of prompt pairs, right-padded; read logits at `final_pos`."""

    task: str
    split: str
    metric_kind: str  # one of METRICS
    clean: Tensor  # [batch, pos] long
    corrupt: Tensor  # [batch, pos] long
    final_pos: Tensor  # [batch] index of the last real token
    answers: Tensor  # [batch, n_answers] long, padded with -1
    wrongs: Tensor  # [batch, n_wrongs] long, padded with -1
    examples: tuple[Example, ...]

    def __len__(self) -> int:
        return self.clean.shape[0]

    def __getitem__(self, index: slice | Sequence[int] | Tensor) -> "TaskPrompts":
        """A sub-batch (padding columns beyond its longest prompt are kept: they are harmless)."""
        idx = torch.arange(len(self))[index]
        examples = tuple(self.examples[i] for i in idx.tolist())
        return TaskPrompts(self.task, self.split, self.metric_kind, self.clean[idx], self.corrupt[idx],
                           self.final_pos[idx], self.answers[idx], self.wrongs[idx], examples)

    def to(self, device: str | torch.device) -> "TaskPrompts":
        return TaskPrompts(self.task, self.split, self.metric_kind, self.clean.to(device), self.corrupt.to(device),
                           self.final_pos.to(device), self.answers.to(device), self.wrongs.to(device), self.examples)

    @property
    def same_length(self) -> bool:
        """True when every prompt has the same length, so positions line up across the batch."""
        return bool((self.final_pos == self.final_pos[0]).all())

    def final_logits(self, logits: Tensor) -> Tensor:
        """[batch, pos, vocab] -> [batch, vocab] at each prompt's last real token (a [batch, vocab] input passes through)."""
        if logits.ndim == 2:
            return logits
        return logits[torch.arange(logits.shape[0], device=logits.device), self.final_pos.to(logits.device)]

    def metric(self, logits: Tensor) -> Tensor:
        """Per-prompt task metric, [batch]; differentiable."""
        final = self.final_logits(logits).float()
        answers, wrongs = self.answers.to(final.device), self.wrongs.to(final.device)
        if self.metric_kind == "prob_diff":
            probs = final.softmax(-1)
            return _masked(probs, answers).sum(-1) - _masked(probs, wrongs).sum(-1)
        answer = _masked_mean(final, answers)
        if self.metric_kind == "logit_diff_max_wrong":
            return answer - _masked(final, wrongs, fill=float("-inf")).max(-1).values
        return answer - _masked_mean(final, wrongs)

    def accuracy(self, logits: Tensor, top1: bool = False) -> Tensor:
        """Per-prompt success, [batch] bool.

        Default (pairwise): the metric is positive, i.e. the answer beats the
        wrong answer(s) as the metric defines it. `top1=True`: the first answer
        is the argmax over the whole vocabulary (for `prob_diff` tasks: the
        argmax is one of the answers).
        """
        if not top1:
            return self.metric(logits) > 0
        final = self.final_logits(logits)
        best = final.argmax(-1, keepdim=True)
        answers = self.answers.to(final.device)
        if self.metric_kind == "prob_diff":
            return (best == answers).any(-1)
        return best[:, 0] == answers[:, 0]


def make_task(
    task: str,
    tokenizer,
    n: int = 64,
    split: str = "train",
    seed: int = 0,
    prepend_bos: bool = True,
    template: int | None = None,
) -> TaskPrompts:
    """`n` tokenized prompt pairs of a built-in task, or of a JSONL file when `task` is a path.

    Word pools are first narrowed to words that are one token for this
    tokenizer (documented behaviour: a tokenizer that splits " Caroline" simply
    never sees Caroline); too small a pool is an error. `template` pins one
    template so every prompt has the same length (needed for per-position patching).
    """
    if task not in TASKS:
        if task.endswith(".jsonl") or Path(task).exists():
            return load_jsonl(task, tokenizer, prepend_bos=prepend_bos)
        raise DataError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or pass a .jsonl file")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or heldout")
    if n < 1:
        raise DataError(f"need at least one prompt, got n={n}")
    if task == "induction":
        return _induction(tokenizer, n, split, seed, prepend_bos)
    pools = _pools(task, tokenizer, split)
    exs = examples(task, n, split, seed, template=template, pools=pools)
    return tokenize(exs, tokenizer, task=task, split=split, metric_kind=METRIC_OF[task], prepend_bos=prepend_bos)


METRIC_OF = {"ioi": "logit_diff", "greater_than": "prob_diff", "docstring": "logit_diff_max_wrong", "induction": "logit_diff"}


def examples(
    task: str, n: int, split: str = "train", seed: int = 0, template: int | None = None, pools: dict | None = None
) -> list[Example]:
    """Text-level examples of a built-in task (not induction, which is token-level)."""
    rng = random.Random(f"{task}:{split}:{seed}")
    pools = pools or _pools(task, None, split)
    templates = _split_templates(task, split)
    if template is not None:
        if not 0 <= template < len(templates):
            raise DataError(f"task {task} has {len(templates)} {split} templates; template={template} is out of range")
        templates = [templates[template]]
    make = {"ioi": _ioi_example, "greater_than": _gt_example, "docstring": _doc_example}[task]
    return [make(rng, templates, pools) for _ in range(n)]


def tokenize(
    exs: Sequence[Example],
    tokenizer,
    task: str = "custom",
    split: str = "train",
    metric_kind: str = "logit_diff",
    prepend_bos: bool = True,
    where: Sequence[str] | None = None,
) -> TaskPrompts:
    """Tokenize and validate examples; `where[i]` names example i in errors (e.g. 'tasks.jsonl line 3')."""
    if metric_kind not in METRICS:
        raise DataError(f"unknown metric {metric_kind!r}; choose one of {', '.join(METRICS)}")
    if not exs:
        raise DataError("no prompts to tokenize")
    bos = [_bos_id(tokenizer)] if prepend_bos else []
    rows_clean, rows_corrupt, answers, wrongs = [], [], [], []
    for i, ex in enumerate(exs):
        label = where[i] if where else f"{task} example {i}"
        clean = bos + _ids(tokenizer, ex.clean)
        corrupt = bos + _ids(tokenizer, ex.corrupt)
        if len(clean) != len(corrupt):
            raise DataError(
                f"{label}: clean and corrupt prompts tokenize to different lengths ({len(clean)} vs {len(corrupt)} tokens)"
            )
        if not ex.answers:
            raise DataError(f"{label}: no answer given")
        answers.append([_single_token(tokenizer, a, label, "answer") for a in ex.answers])
        wrongs.append([_single_token(tokenizer, w, label, "wrong answer") for w in ex.wrongs])
        rows_clean.append(clean)
        rows_corrupt.append(corrupt)
    pad = _pad_id(tokenizer)
    return TaskPrompts(
        task=task,
        split=split,
        metric_kind=metric_kind,
        clean=_pad(rows_clean, pad),
        corrupt=_pad(rows_corrupt, pad),
        final_pos=torch.tensor([len(r) - 1 for r in rows_clean]),
        answers=_pad(answers, -1),
        wrongs=_pad(wrongs, -1),
        examples=tuple(exs),
    )


def load_jsonl(path: str | Path, tokenizer, prepend_bos: bool = True) -> TaskPrompts:
    """A user prompt set: one JSON object per line.

    Fields: `clean`, `corrupt` (same token length), `answer` and `wrong`
    (a string or a list of strings, each one token), and optionally `metric`
    (`logit_diff` default, `prob_diff`, `logit_diff_max_wrong`), the same on every line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    exs, where, metric = [], [], None
    from data.corpus import read_utf8

    for lineno, line in enumerate(read_utf8(path, "task file").splitlines(), start=1):
        if not line.strip():
            continue
        label = f"{path.name} line {lineno}"
        ex, line_metric = _parse_jsonl_line(line, label)
        if metric is not None and line_metric != metric:
            raise DataError(f"{label}: metric {line_metric!r} differs from earlier lines ({metric!r})")
        metric = line_metric
        exs.append(ex)
        where.append(label)
    if not exs:
        raise DataError(f"task file {path} has no prompts")
    return tokenize(exs, tokenizer, task=path.stem, split="custom", metric_kind=metric, prepend_bos=prepend_bos, where=where)


def induction_sequences(tokenizer, n: int, length: int = 20, seed: int = 0) -> Tensor:
    """[n, 1 + 2*length] sequences: BOS, `length` random ordinary tokens, the same tokens again."""
    rng = random.Random(f"induction-seq:{seed}")
    pool = ordinary_token_ids(tokenizer)
    rows = []
    for _ in range(n):
        seq = rng.sample(pool, length)
        rows.append([_bos_id(tokenizer)] + seq + seq)
    return torch.tensor(rows)


def ordinary_token_ids(tokenizer) -> list[int]:
    """Token ids that are not special tokens (the pool random-token tasks draw from)."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


# ---------------------------------------------------------------------------- templates
# IOI: {N1} and {N2} are the pair, {S} the subject repeated; the answer (IO) is the pair member that is not S.
IOI_TEMPLATES = [
    "When {N1} and {N2} went to the {place}, {S} gave a {object} to",
    "When {N1} and {N2} got a {object} at the {place}, {S} decided to give it to",
    "Then, {N1} and {N2} went to the {place}. {S} gave a {object} to",
    "Then, {N1} and {N2} had a lot of fun at the {place}. {S} gave a {object} to",
    "Then, {N1} and {N2} were working at the {place}. {S} decided to give a {object} to",
    "After {N1} and {N2} went to the {place}, {S} gave a {object} to",
    "While {N1} and {N2} were working at the {place}, {S} gave a {object} to",
    "Friends {N1} and {N2} found a {object} at the {place}. {S} gave it to",
    "Afterwards, {N1} and {N2} went to the {place}. {S} gave a {object} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S} said to",
    "After the lunch, {N1} and {N2} went to the {place}. {S} gave a {object} to",
    "While {N1} and {N2} were commuting to the {place}, {S} gave a {object} to",
    "Then, {N1} and {N2} were thinking about going to the {place}. {S} wanted to give a {object} to",
    "When {N1} and {N2} arrived at the {place}, {S} handed a {object} to",
    "Later, {N1} and {N2} walked to the {place}, and {S} passed a {object} to",
    "Once {N1} and {N2} reached the {place}, {S} threw a {object} to",
]

GT_TEMPLATES = [
    "The {noun} lasted from the year {cc}{yy} to the year {cc}",
    "The {noun} started in the year {cc}{yy} and ended in the year {cc}",
    "The {noun} ran from the year {cc}{yy} until the year {cc}",
    "The {noun} began in the year {cc}{yy} and was over by the year {cc}",
]

DOC_TEMPLATES = [
    'def {func}(self, {a0}, {a1}, {a2}, {a3}, {a4}):\n    """{d0} {d1} {d2}\n\n    :param {a0}: {w0} {w1}\n    :param {a1}: {w2} {w3}\n    :param',
    'def {func}(cls, {a0}, {a1}, {a2}, {a3}, {a4}):\n    """{d0} {d1}\n\n    :param {a0}: {w0} {w1}\n    :param {a1}: {w2} {w3}\n    :param',
    'def {func}(self, {a0}, {a1}, {a2}, {a3}, {a4}):\n    """{d0} {d1} {d2} {d1}\n\n    :param {a0}: {w0}\n    :param {a1}: {w2} {w3} {w1}\n    :param',
]

TEMPLATES = {"ioi": IOI_TEMPLATES, "greater_than": GT_TEMPLATES, "docstring": DOC_TEMPLATES}
HELDOUT_TEMPLATES = {"ioi": 4, "greater_than": 1, "docstring": 1}  # the last k templates of each task are held out
GT_CENTURIES = list(range(11, 20))
GT_YEARS = list(range(2, 99))


def _split_templates(task: str, split: str) -> list[str]:
    k = HELDOUT_TEMPLATES[task]
    return TEMPLATES[task][:-k] if split == "train" else TEMPLATES[task][-k:]


def _pools(task: str, tokenizer, split: str) -> dict[str, list[str]]:
    """The word pools of a task for one split, narrowed to single tokens when a tokenizer is given."""
    def part(words: list[str]) -> list[str]:
        halves = split_pool(words)
        return halves.train if split == "train" else halves.heldout

    def words(pool: list[str], prefix: str, need: int, what: str) -> list[str]:
        chosen = part(pool)
        if tokenizer is not None:
            chosen = [w for w in chosen if len(_ids(tokenizer, prefix + w)) == 1]
        if len(chosen) < need:
            raise DataError(f"only {len(chosen)} {split} {what} are single tokens for this tokenizer; the task needs {need}")
        return chosen

    if task == "ioi":
        return {"names": words(NAMES, " ", 5, "names"), "places": part(IOI_PLACES), "objects": part(IOI_OBJECTS)}
    if task == "greater_than":
        years = [f"{cc}{yy:02d}" for cc in GT_CENTURIES for yy in GT_YEARS]
        return {"nouns": part(GT_NOUNS), "years": part(years)}
    return {"args": words(DOC_ARGS, " ", 10, "argument names"), "funcs": part(DOC_FUNCS), "words": DOC_WORDS}


def _ioi_example(rng: random.Random, templates: list[str], pools: dict) -> Example:
    t = rng.randrange(len(templates))
    io, s, c1, c2, c3 = rng.sample(pools["names"], 5)
    n1, n2 = (io, s) if rng.random() < 0.5 else (s, io)
    fill = dict(place=rng.choice(pools["places"]), object=rng.choice(pools["objects"]))
    clean = templates[t].format(N1=n1, N2=n2, S=s, **fill)
    corrupt = templates[t].format(N1=c1, N2=c2, S=c3, **fill)
    return Example(clean, corrupt, answers=(" " + io,), wrongs=(" " + s,), template=t)


def _gt_example(rng: random.Random, templates: list[str], pools: dict) -> Example:
    t = rng.randrange(len(templates))
    year = rng.choice(pools["years"])
    cc, yy = year[:2], int(year[2:])
    noun = rng.choice(pools["nouns"])
    clean = templates[t].format(noun=noun, cc=cc, yy=f"{yy:02d}")
    corrupt = templates[t].format(noun=noun, cc=cc, yy="01")
    answers = tuple(f"{y:02d}" for y in range(yy + 1, 100))
    wrongs = tuple(f"{y:02d}" for y in range(0, yy + 1))
    return Example(clean, corrupt, answers=answers, wrongs=wrongs, template=t)


def _doc_example(rng: random.Random, templates: list[str], pools: dict) -> Example:
    t = rng.randrange(len(templates))
    args = rng.sample(pools["args"], 10)
    real, fake = args[:5], args[5:]
    words = {f"d{i}": rng.choice(pools["words"]) for i in range(3)} | {f"w{i}": rng.choice(pools["words"]) for i in range(4)}
    func = rng.choice(pools["funcs"])
    clean = templates[t].format(func=func, **{f"a{i}": a for i, a in enumerate(real)}, **words)
    # The corrupt def names other arguments; the docstring still documents the real first two.
    corrupt_def = templates[t].format(func=func, **{f"a{i}": a for i, a in enumerate(fake)}, **words)
    head, _, _ = corrupt_def.partition("\n")
    corrupt = head + "\n" + clean.partition("\n")[2]
    wrongs = tuple(" " + a for a in real if a != real[2])
    return Example(clean, corrupt, answers=(" " + real[2],), wrongs=wrongs, template=t)


def _induction(tokenizer, n: int, split: str, seed: int, prepend_bos: bool) -> TaskPrompts:
    rng = random.Random(f"induction:{split}:{seed}")
    pool = ordinary_token_ids(tokenizer)
    length = 16
    bos = [_bos_id(tokenizer)] if prepend_bos else []
    clean, corrupt, answers, wrongs, exs = [], [], [], [], []
    for _ in range(n):
        seq = rng.sample(pool, 2 * length)
        first, other = seq[:length], seq[length:]
        stop = length - 1  # predict the last token of the repeat
        clean.append(bos + first + first[:stop])
        corrupt.append(bos + other + first[:stop])
        answers.append([first[stop]])
        wrongs.append([other[stop]])
        exs.append(Example(tokenizer.decode(clean[-1]), tokenizer.decode(corrupt[-1]),
                           (tokenizer.decode([first[stop]]),), (tokenizer.decode([other[stop]]),)))
    return TaskPrompts("induction", split, "logit_diff", torch.tensor(clean), torch.tensor(corrupt),
                       torch.full((n,), len(clean[0]) - 1), torch.tensor(answers), torch.tensor(wrongs), tuple(exs))


def _parse_jsonl_line(line: str, label: str) -> tuple[Example, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{label}: not valid JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{label}: expected a JSON object with clean, corrupt, answer, wrong")
    missing = [k for k in ("clean", "corrupt", "answer") if k not in obj]
    if missing:
        raise DataError(f"{label}: missing field(s) {', '.join(missing)}")

    def strings(key: str) -> tuple[str, ...]:
        value = obj.get(key, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{label}: {key} must be a string or a list of strings")
        return tuple(value)

    if not isinstance(obj["clean"], str) or not isinstance(obj["corrupt"], str):
        raise DataError(f"{label}: clean and corrupt must be strings")
    metric = obj.get("metric", "logit_diff")
    if metric not in METRICS:
        raise DataError(f"{label}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return Example(obj["clean"], obj["corrupt"], strings("answer"), strings("wrong")), metric


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token(tokenizer, text: str, label: str, what: str) -> int:
    ids = _ids(tokenizer, text)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise DataError(f"{label}: {what} {text!r} is {len(ids)} tokens {pieces}; answers must be single tokens")
    return ids[0]


def _bos_id(tokenizer) -> int:
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    raise DataError("the tokenizer has no BOS or EOS token; pass prepend_bos=False")


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return candidate
    return 0


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _masked(values: Tensor, index: Tensor, fill: float = 0.0) -> Tensor:
    """values gathered at index (-1 = padding, replaced by `fill`)."""
    gathered = values.gather(-1, index.clamp(min=0))
    return gathered.masked_fill(index < 0, fill)


def _masked_mean(values: Tensor, index: Tensor) -> Tensor:
    count = (index >= 0).sum(-1).clamp(min=1)
    return _masked(values, index).sum(-1) / count
