"""The task suite: well-formed pairs, disjoint splits, metrics checked by hand, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from data.tasks import TASKS, DataError, Example, examples, load_jsonl, make_task, tokenize
from data.words import NAMES, split_pool


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pairs_are_well_formed(task, split, tokenizer):
    prompts = make_task(task, tokenizer, n=32, split=split, seed=3)
    assert prompts.clean.shape == prompts.corrupt.shape and len(prompts) == 32
    assert (prompts.clean[:, 0] == tokenizer.bos_token_id).all()
    for i in range(len(prompts)):
        end = int(prompts.final_pos[i]) + 1
        # clean and corrupt differ somewhere, and only inside the real prompt
        assert (prompts.clean[i, :end] != prompts.corrupt[i, :end]).any()
        assert (prompts.clean[i, end:] == prompts.corrupt[i, end:]).all()
        answers = prompts.answers[i][prompts.answers[i] >= 0]
        wrongs = prompts.wrongs[i][prompts.wrongs[i] >= 0]
        assert len(answers) >= 1 and not set(answers.tolist()) & set(wrongs.tolist())


def test_same_seed_same_prompts_and_template_pins_length(tokenizer):
    a = make_task("ioi", tokenizer, n=16, seed=7)
    b = make_task("ioi", tokenizer, n=16, seed=7)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt)
    assert not torch.equal(a.clean, make_task("ioi", tokenizer, n=16, seed=8).clean)
    pinned = make_task("ioi", tokenizer, n=16, template=2)
    assert pinned.same_length


def test_heldout_names_and_templates_never_appear_in_train():
    names = split_pool(NAMES)
    assert not set(names.train) & set(names.heldout) and len(names.train) + len(names.heldout) == len(set(NAMES))
    train = examples("ioi", 300, "train", seed=0)
    heldout_names = set(names.heldout)
    assert not any(word.strip(",.") in heldout_names for ex in train for word in ex.clean.split())
    gt_train = {ex.clean.split(" the year ")[1][:4] for ex in examples("greater_than", 300, "train")}
    gt_heldout = {ex.clean.split(" the year ")[1][:4] for ex in examples("greater_than", 300, "heldout")}
    assert not gt_train & gt_heldout


def test_ioi_answer_is_the_name_not_repeated():
    for ex in examples("ioi", 50, seed=1):
        io, s = ex.answers[0].strip(), ex.wrongs[0].strip()
        words = ex.clean.replace(",", " ").replace(".", " ").split()
        assert words.count(io) == 1 and words.count(s) == 2


def test_greater_than_answers_partition_the_numbers():
    for ex in examples("greater_than", 20, seed=2):
        yy = int(ex.clean.split(" the year ")[1][2:4])
        assert sorted(ex.answers + ex.wrongs) == [f"{i:02d}" for i in range(100)]
        assert min(int(a) for a in ex.answers) == yy + 1


def test_metrics_by_hand(tokenizer):
    exs = [Example("a b", "c d", (" Mary",), (" John",)), Example("a b", "c d", (" Mary",), (" John", " Alice"))]
    prompts = tokenize(exs, tokenizer, metric_kind="logit_diff")
    vocab = len(tokenizer)
    ids = {w: tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" Mary", " John", " Alice")}
    logits = torch.zeros(2, prompts.clean.shape[1], vocab)
    last = prompts.final_pos
    logits[0, last[0], ids[" Mary"]] = 3.0
    logits[0, last[0], ids[" John"]] = 1.0
    logits[1, last[1], ids[" Mary"]] = 2.0
    logits[1, last[1], ids[" Alice"]] = 4.0
    torch.testing.assert_close(prompts.metric(logits), torch.tensor([2.0, 2.0 - 2.0]))
    max_wrong = tokenize(exs, tokenizer, metric_kind="logit_diff_max_wrong")
    torch.testing.assert_close(max_wrong.metric(logits), torch.tensor([2.0, -2.0]))
    probs = tokenize(exs, tokenizer, metric_kind="prob_diff")
    p = logits[torch.arange(2), last].softmax(-1)
    expected = torch.stack([p[0, ids[" Mary"]] - p[0, ids[" John"]], p[1, ids[" Mary"]] - p[1, ids[" John"]] - p[1, ids[" Alice"]]])
    torch.testing.assert_close(probs.metric(logits), expected)
    assert probs.accuracy(logits).tolist() == [True, False]
    assert max_wrong.accuracy(logits, top1=True).tolist() == [True, False]


def test_unknown_task(tokenizer):
    with pytest.raises(DataError, match="unknown task 'nope'"):
        make_task("nope", tokenizer)


def test_jsonl_prompt_set(tmp_path, tokenizer):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"clean": "When Mary and John went out, John thanked", "corrupt": "When Alice and Bob went out, Carl thanked", "answer": " Mary", "wrong": " John"},
        {"clean": "When Emma and Paul went out, Paul thanked", "corrupt": "When Alice and Bob went out, Carl thanked", "answer": [" Emma"], "wrong": [" Paul"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = make_task(str(path), tokenizer)
    assert len(prompts) == 2 and prompts.task == "mine" and prompts.metric_kind == "logit_diff"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('{"clean": "x", "corrupt": "y"}', "line 2: missing field"),
        ('{"clean": "When Mary went", "corrupt": "When Mary and John went", "answer": " Mary"}', "line 2: clean and corrupt prompts tokenize to different lengths"),
        ('{"clean": "a", "corrupt": "b", "answer": " Maryzzqx"}', "line 2: answer ' Maryzzqx' is"),
        ('{"clean": "a", "corrupt": "b", "answer": " Mary", "metric": "accuracy"}', "line 2: unknown metric"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"clean": "a", "corrupt": "b", "answer": " Mary", "wrong": " John"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        load_jsonl(path, tokenizer)


def test_a_task_file_that_is_not_utf8_is_refused_where_it_stops_being_utf8(tmp_path, tokenizer):
    path = tmp_path / "latin.jsonl"
    good = json.dumps({"clean": "a", "corrupt": "b", "answer": " Mary", "wrong": " John"}) + "\n"
    path.write_bytes(good.encode() + '{"clean": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"task file .*latin.jsonl is not UTF-8 text \(byte {len(good) + 14:,}, line 2\)"):
        load_jsonl(path, tokenizer)
