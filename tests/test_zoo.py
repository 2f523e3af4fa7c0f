"""The bundled reference model: its behaviour, its size and tokenizer, the build script, and the `models` command.

Oracles: the task thresholds of the issue measured on held-out prompts through
`load_model` (the TransformerBridge every user gets) and cross-checked against a
plain HuggingFace forward pass of the same checkpoint; the held-out word pools
(`data.words.split_pool`) for disjointness; two builds with one seed for determinism.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data import BUNDLED_MODELS, bundled_model_dir
from data.tasks import GT_CENTURIES, GT_YEARS, HELDOUT_TEMPLATES, TEMPLATES
from data.words import DOC_ARGS, DOC_FUNCS, GT_NOUNS, IOI_OBJECTS, IOI_PLACES, NAMES, split_pool
from data.zoo import (PRESETS, THRESHOLDS, SlotNoise, build, config_from_dict, hf_logits, ioi_grammar_words, measure, publish,
                      read_card, template_slots, training_examples)

REPO = Path(__file__).resolve().parents[1]
REF = bundled_model_dir("ref-gpt2")


@pytest.fixture(scope="module")
def ref_behaviour(ref_model):
    from workbench.zoo import measure_model

    return measure_model(ref_model, n=1024, seed=0)


@pytest.fixture(scope="module")
def ref_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REF)


# ---------------------------------------------------------------------------- the committed checkpoint
@pytest.mark.reference
def test_induction_threshold(ref_behaviour):
    ind = ref_behaviour.induction
    assert ind.first_half_loss > 3.0  # random tokens really are unpredictable the first time
    assert ind.loss_ratio <= THRESHOLDS["induction"], ind
    assert ind.gap > 0


@pytest.mark.reference
def test_ioi_threshold(ref_behaviour):
    ioi = ref_behaviour.ioi
    assert ioi.accuracy >= THRESHOLDS["ioi_accuracy"] and ioi.clean >= THRESHOLDS["ioi_logit_diff"], ioi
    assert ioi.clean - ioi.corrupt >= 1.0  # the corrupt (ABC) prompts destroy the behaviour


@pytest.mark.reference
def test_greater_than_threshold(ref_behaviour):
    gt = ref_behaviour.greater_than
    assert gt.clean >= THRESHOLDS["greater_than"], gt
    # a comparison, not a prior for late years: with the start year "01" the same answers lose (nearly all of)
    # their advantage; a model ignoring the start year would score the corrupt prompts like the clean ones
    assert gt.gap > 0.5 and gt.corrupt < 0.25 * gt.clean, gt


@pytest.mark.reference
def test_docstring_threshold(ref_behaviour):
    doc = ref_behaviour.docstring
    assert doc.top1 >= THRESHOLDS["docstring"], doc
    assert doc.gap > 0


@pytest.mark.reference
def test_bridge_measurement_matches_hugging_face(ref_model):
    """The figures through the TransformerBridge equal those from a plain HF forward pass of the same files."""
    from transformers import AutoModelForCausalLM

    from workbench.zoo import measure_model

    hf = AutoModelForCausalLM.from_pretrained(REF, attn_implementation="eager").eval()
    via_bridge = measure_model(ref_model, n=32, seed=5)
    via_hf = measure(hf_logits(hf), ref_model.tokenizer, n=32, seed=5)
    for task in ("ioi", "greater_than", "docstring"):
        a, b = getattr(via_bridge, task), getattr(via_hf, task)
        assert a.clean == pytest.approx(b.clean, abs=2e-3) and a.top1 == b.top1 and a.accuracy == b.accuracy
    assert via_bridge.induction.loss_ratio == pytest.approx(via_hf.induction.loss_ratio, abs=1e-3)


def test_checkpoint_size_and_card():
    files = {p.name: p.stat().st_size for p in REF.iterdir() if p.is_file()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "model_card.json"):
        assert name in files, name
    assert sum(files.values()) <= 25 * 1024 * 1024
    card = read_card(REF)
    config = json.loads((REF / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] >= 2 and card["recipe"]["n_layers"] == config["n_layer"]
    assert card["seed"] == card["recipe"]["seed"] and card["python"] and card["training_wall_seconds"] > 0
    assert card["behaviour"]["passed"] in (True, False) and "thresholds" in card


def test_required_words_are_single_tokens(ref_tokenizer):
    words = [" " + n for n in NAMES] + [f"{i:02d}" for i in range(100)] + [" " + a for a in DOC_ARGS]
    assert len(NAMES) >= 150
    split = [w for w in words if len(ref_tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    assert not split
    # and in context, as the prompts use them: " 1732" is " 17" + "32"
    assert len(ref_tokenizer(" the year 1732", add_special_tokens=False)["input_ids"]) == 4


# ---------------------------------------------------------------------------- held-out really held out
def test_task_training_data_never_uses_heldout_words(ref_tokenizer):
    """Parse every slot of the synthetic task examples the build trains on, against the held-out pools.

    The examples come from `training_examples`, the one source the build draws
    task data from, with the committed model's recipe and tokenizer.
    """
    card = read_card(REF)
    config = config_from_dict(card["recipe"])
    heldout = {
        "names": set(split_pool(NAMES).heldout), "places": set(split_pool(IOI_PLACES).heldout),
        "objects": set(split_pool(IOI_OBJECTS).heldout), "nouns": set(split_pool(GT_NOUNS).heldout),
        "years": set(split_pool([f"{cc}{yy:02d}" for cc in GT_CENTURIES for yy in GT_YEARS]).heldout),
        "args": set(split_pool(DOC_ARGS).heldout), "funcs": set(split_pool(DOC_FUNCS).heldout),
    }
    assert all(heldout.values())
    seen = {"ioi": 0, "greater_than": 0, "docstring": 0, "generic": 0, "rewritten": 0}

    def words(templates):
        return {w.lower() for t in templates for w in re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", t))}

    k = HELDOUT_TEMPLATES["ioi"]
    heldout_own_words = words(TEMPLATES["ioi"][-k:]) - words(TEMPLATES["ioi"][:-k])  # handed, threw, reached, ...
    assert {"handed", "threw", "passed", "reached", "wanted"} <= heldout_own_words
    for ex in itertools.islice(training_examples(config, ref_tokenizer), 6000):
        task, text = ex.task, ex.example.clean
        for template in TEMPLATES[task][-HELDOUT_TEMPLATES[task]:]:
            assert template_slots(template, text) is None, f"held-out template used: {text!r}"
        if ex.template is not None:  # a grammar or reworded IOI sentence: none of the held-out sentences' own words
            assert not words([ex.template]) & heldout_own_words, ex.template
            seen["rewritten"] += 1
        slots = template_slots(ex.template or TEMPLATES[task][: -HELDOUT_TEMPLATES[task]][ex.example.template], text)
        assert slots is not None, text
        if task == "ioi":
            assert not {slots["N1"], slots["N2"], slots["S"], ex.answer.strip()} & heldout["names"], text
            assert ex.answer.strip() in (slots["N1"], slots["N2"]) and ex.answer.strip() != slots["S"], text
            assert slots.get("place") not in heldout["places"] and slots.get("object") not in heldout["objects"], text
        elif task == "greater_than":
            assert slots["noun"] not in heldout["nouns"] and slots["cc"] + slots["yy"] not in heldout["years"], text
            assert int(ex.answer) > int(slots["yy"])
            assert not config.gt_answer_window or int(ex.answer) <= int(slots["yy"]) + config.gt_answer_window
        else:
            args = {slots[f"a{i}"] for i in range(5)} | {ex.answer.strip()}
            assert not args & heldout["args"] and slots["func"] not in heldout["funcs"], text
        seen[task] += 1
        seen["generic"] += ex.generic
    rewritten = seen.pop("rewritten")
    assert min(seen.values()) > 300, seen
    assert (rewritten > 300) == (config.reworded_share > 0 or config.grammar_share > 0), rewritten


def test_slot_noise_keeps_the_sentence_frame_and_spells_no_sentence_word(ref_tokenizer):
    """Reworded transfer/activity phrases: same slots, same kept words (a/an/the/it/to/and) in the same places,
    every other word replaced by one that is no word of any IOI sentence (held-out ones included) or name."""
    import random

    from data.zoo import IOI_ACTIVITIES, IOI_TRANSFERS

    noise = SlotNoise(ref_tokenizer, (1.0, 1.0), pieces=0.5)
    assert {"handed", "threw", "passed", "reached", "walked", "arrived"} <= noise.banned
    rng = random.Random(0)
    glued = 0
    for phrase in IOI_TRANSFERS + IOI_ACTIVITIES:
        for _ in range(20):
            new = noise.transfer(phrase, rng) if phrase in IOI_TRANSFERS else noise.activity(phrase, rng)
            old_words, new_words = phrase.split(" "), new.split(" ")
            assert len(old_words) == len(new_words), (phrase, new)
            for a, b in zip(old_words, new_words):
                if a.startswith("{") or a in SlotNoise.KEPT:
                    assert a == b, (phrase, new)
                else:
                    assert b.isalnum() and b.lower() not in noise.banned, (phrase, new)
                    glued += b not in noise.words
    assert glued > 0  # some words carry glued-on pieces


def test_slot_noise_is_off_until_switched_on(ref_tokenizer):
    """With `noisy()` false the examples are exactly those of the recipe without slot noise (no random draw is
    spent on it); switched on, grammar sentences start to carry reworded phrases."""
    card_config = config_from_dict(read_card(REF)["recipe"])
    config = replace(card_config, slot_noise=(0.5, 0.3))
    quiet = replace(config, slot_noise=(0.0, 0.0))
    off = [ex.example.clean for ex in itertools.islice(training_examples(config, ref_tokenizer, noisy=lambda: False), 1500)]
    assert off == [ex.example.clean for ex in itertools.islice(training_examples(quiet, ref_tokenizer), 1500)]
    on = list(itertools.islice(training_examples(config, ref_tokenizer, noisy=lambda: True), 1500))
    plain = ioi_grammar_words() | SlotNoise.KEPT
    grammar = [ex.template for ex in on if ex.template]
    reworded = [t for t in grammar if not set(re.findall(r"[A-Za-z]+", re.sub(r"\{\w+\}", "", t))) <= plain]
    # a sentence keeps both phrases with probability (1 - 0.5) * (1 - 0.3)
    assert len(grammar) > 300 and abs(len(reworded) / len(grammar) - 0.65) < 0.1, (len(reworded), len(grammar))


# ---------------------------------------------------------------------------- the build
def test_build_smoke_deterministic_and_loadable(tmp_path):
    """A tiny recipe for a few steps: two builds with one seed give identical weights; the result boots via load_model."""
    from safetensors.torch import load_file

    from workbench.model import load_model

    config = PRESETS["tiny"]
    a = build(config, tmp_path / "a").directory
    b = build(config, tmp_path / "b").directory
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    model = load_model(a, device="cpu")
    tokens = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(a).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).log_softmax(-1), hf(tokens).logits.log_softmax(-1), atol=2e-4, rtol=0)
    card = read_card(a)
    assert card["steps"] == config.steps and card["recipe"]["seed"] == config.seed


def test_publish_swaps_complete_directories_only(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    staging = tmp_path / ".model.building"
    staging.mkdir()
    (staging / "config.json").write_text('{"new": 1}')
    publish(staging, target)
    assert json.loads((target / "config.json").read_text()) == {"new": 1} and not staging.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    other = tmp_path / ".x"
    other.mkdir()
    with pytest.raises(Exception, match="not a model directory"):
        publish(other, precious)
    assert (precious / "thesis.txt").read_text() == "keep me"


def test_zoo_build_cli_refuses_a_non_model_directory(tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("keep me")
    proc = _cli("zoo", "build", "--preset", "tiny", "--out", str(precious))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "refusing" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes"] and (precious / "thesis.txt").read_text() == "keep me"


def test_zoo_build_writes_planted_models_by_hand_not_by_training(tmp_path):
    """`zoo build --model planted-induction` writes the hand-built weights: identical to data.planted's, with ground truth."""
    from safetensors.torch import load_file

    from data.planted import PLANTED, build_planted

    proc = _cli("zoo", "build", "--model", "planted-induction", "--out", str(tmp_path / "p"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["trained"] is False
    expected = load_file(build_planted(PLANTED["planted-induction"], tmp_path / "oracle") / "model.safetensors")
    got = load_file(tmp_path / "p" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert (tmp_path / "p" / "ground_truth.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oracle", "p"]


@pytest.mark.parametrize("noisy", [False, True])
def test_short_rows_hold_one_example_each_and_pad_with_zero_weight(noisy):
    """Oracle: the stream's task rows, re-split at BOS, are exactly `task_examples` in order, each weighted as
    built, with the slot noise off (as before `slot_noise_from`) or on, as the stream's flag says."""
    from data.zoo import DataStream, build_tokenizer, task_examples

    config = replace(PRESETS["tiny"], short_rows=40, induction_share=0.25)  # ~30 task rows: grammar IOI among them
    tokenizer = build_tokenizer(config)
    stream = DataStream(config, tokenizer)
    stream.noisy = noisy
    (text, text_w), (short, short_w, induction) = stream.batch()
    assert text.shape == (config.batch_size, config.context) and short.shape == (config.short_rows, config.short_context)
    expected = task_examples(config, tokenizer, noisy=lambda: noisy)
    bos = tokenizer.bos_token_id
    for row, w, is_ind in zip(short.tolist(), short_w.tolist(), induction.tolist()):
        assert row[0] == bos and w[0] == 0
        if is_ind:
            n = sum(1 for x in w if x > 0)
            assert row[1:1 + n] == row[1 + n:1 + 2 * n] and all(x == 0 for x in w[1:1 + n])
            continue
        ids, ws = next(expected)
        while len(ids) >= config.short_context:
            ids, ws = next(expected)
        assert row[1:1 + len(ids)] == ids and w[1:1 + len(ids)] == ws
        assert all(t == bos for t in row[1 + len(ids):]) and all(x == 0 for x in w[1 + len(ids):])


# ---------------------------------------------------------------------------- the models command
@pytest.mark.reference
def test_models_json_shape(ref_behaviour):
    proc = _cli("models", "--json", "--n", "1024")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [m["name"] for m in out["bundled"]] == list(BUNDLED_MODELS) and out["bundled"][0]["built"]
    assert out["model"] == "ref-gpt2" and out["thresholds"] == THRESHOLDS
    b = out["behaviour"]
    assert set(b) >= {"induction", "ioi", "greater_than", "docstring", "text_loss", "passed"}
    assert b["ioi"]["accuracy"] == pytest.approx(ref_behaviour.ioi.accuracy)
    assert b["greater_than"]["clean"] == pytest.approx(ref_behaviour.greater_than.clean, abs=1e-4)
    assert b["passed"] == ref_behaviour.passed == out["passed"]


def test_models_bad_name_is_one_line():
    proc = _cli("models", "--model", "./no-such-model-dir")
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-model-dir" in lines[0]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workbench", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
