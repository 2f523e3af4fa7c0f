"""Steering: generation, measurement, directions, orthogonalisation, rerouting, storage and the CLI.

Oracles: generation without the KV cache (every step a fresh full forward), by-hand hook
forwards for the target and side effects, the model before the call, by-hand means and
TransformerLens's own difference-of-means basis, the hook ablation for the orthogonalised
model. Tests marked `reference` use the bundled reference model and report the figures
the issue's done-when asks for (run with `-s` to see them).
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

from workbench.directions import (PromptBatch, SteeringVector, behaviour_codes, activate_codes, collect,
                                  contrastive_vectors, layer_sweep, orthogonalize, promoted_tokens, readability, reroute,
                                  separating_direction)
from workbench.errors import WorkbenchError
from workbench.interventions import (ALL, GENERATED, PROMPT, AddDirection, ablate_direction_everywhere, at, intervene)
from workbench.steering import Meter, SteeringRun, generate, is_monotonic, save_run, side_by_side

SITE = "blocks.0.hook_resid_post"
LAST = "blocks.1.hook_resid_post"
PROMPT_A = "When Mary and John went to the store, John gave a drink to"


def no_hooks(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


@pytest.fixture(scope="module")
def neutral(tokenizer):
    from data.tasks import make_task

    return make_task("docstring", tokenizer, n=4, template=0).clean


@pytest.fixture(scope="module")
def ioi(tokenizer):
    from data.tasks import make_task

    return make_task("ioi", tokenizer, n=24, seed=1)


def unembed_direction(model, token: int) -> torch.Tensor:
    return model.W_U[:, token].detach().clone()


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("positions", [ALL, PROMPT, GENERATED, at(2, -1, 9)])
def test_cached_generation_matches_full_recompute(tiny_model, positions):
    """The KV-cached loop tells each intervention the absolute positions; recomputing everything is the oracle."""
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    ivs = [AddDirection(SITE, v, 3.0, positions)]
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=5, top_k=50)):
        cached = generate(tiny_model, "When Mary and John went", ivs, max_new_tokens=6, stop_at_eos=False, **kw)
        full = generate(tiny_model, "When Mary and John went", ivs, max_new_tokens=6, stop_at_eos=False, use_cache=False, **kw)
        assert cached.new_tokens == full.new_tokens and len(cached.new_tokens) == 6
    assert no_hooks(tiny_model)


def test_kv_cache_holds_every_token_run_and_decodes_as_a_fresh_forward(tiny_model):
    """Unsteered: after the prompt and each decode step the cache holds every token so far, and a decode step's
    logits equal the last position of a fresh forward over the whole sequence (transformers 5.24 renamed the
    argument TransformerLens's attention reads the cache from; unfilled, each step saw only its own token)."""
    from workbench.steering import _step

    tokens = tiny_model.to_tokens("When Mary and John went")
    logits, cache = _step(tiny_model, tokens, None, True)
    assert cache.get_seq_length() == tokens.shape[1]
    for token in (7, 19, 3):
        tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
        logits, cache = _step(tiny_model, tokens[:, -1:], cache, True)
        assert cache.get_seq_length() == tokens.shape[1]
        torch.testing.assert_close(logits[:, -1], tiny_model(tokens)[:, -1], rtol=1e-4, atol=1e-5)


def test_a_cache_that_is_not_filled_is_refused(tiny_model, monkeypatch):
    """Planted fault: attention that never writes the cache (what TransformerLens 4.3 did under transformers 5.24
    before the workaround) makes cached generation a clear error, not text generated from a truncated context."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", lambda self, k, v, **kwargs: (k, v))
    with pytest.raises(WorkbenchError, match="KV cache holds 0 tokens"):
        generate(tiny_model, "When Mary and John went", (), max_new_tokens=3, stop_at_eos=False)
    assert generate(tiny_model, "When Mary and John went", (), max_new_tokens=3, stop_at_eos=False, use_cache=False).new_tokens


def test_side_by_side_uses_the_same_seed(tiny_model):
    """The baseline is the unsteered sample with that seed; a zero coefficient reproduces it token for token."""
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, seed=11, temperature=1.0, stop_at_eos=False)
    pair = side_by_side(tiny_model, PROMPT_A, [AddDirection(SITE, v, 0.0)], **kw)
    assert pair.baseline == generate(tiny_model, PROMPT_A, (), **kw)
    assert pair.steered.new_tokens == pair.baseline.new_tokens
    other_seed = generate(tiny_model, PROMPT_A, (), **{**kw, "seed": 12})
    assert other_seed.new_tokens != pair.baseline.new_tokens  # the seed is what makes them equal


def test_first_generated_token_is_steered(tiny_model):
    """'generated' positions include the last prompt token, whose output is the first new token."""
    base = generate(tiny_model, PROMPT_A, (), max_new_tokens=3, temperature=0.0, stop_at_eos=False)
    target = next(t for t in range(5, 100) if t != base.new_tokens[0])
    push = AddDirection(LAST, unembed_direction(tiny_model, target), 200.0, GENERATED)
    steered = generate(tiny_model, PROMPT_A, [push], max_new_tokens=3, temperature=0.0, stop_at_eos=False)
    assert steered.new_tokens[0] == target
    prompt_only_but_last = generate(tiny_model, PROMPT_A, [AddDirection(LAST, unembed_direction(tiny_model, target), 200.0, at(1, 2))],
                                    max_new_tokens=1, temperature=0.0)
    assert prompt_only_but_last.new_tokens[0] == base.new_tokens[0]  # a position before the last cannot move it directly


# ---------------------------------------------------------------------------- measurement
def test_meter_against_hand_computation(tiny_model, neutral):
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    targets = [304, 958]
    prompts = PromptBatch.of(tiny_model, [PROMPT_A, "When Mary went to the"])
    meter = Meter(tiny_model, prompts, targets=targets, neutral=neutral)
    effect = meter.effect([AddDirection(SITE, v, 4.0)])

    def by_hand(x, hook):
        return x + 4.0 * v

    with torch.no_grad():
        steered = tiny_model.run_with_hooks(prompts.tokens, fwd_hooks=[(SITE, by_hand)])
        base = tiny_model(prompts.tokens)
        final = steered[torch.arange(2), prompts.lengths - 1]
        n_steered = tiny_model.run_with_hooks(neutral, fwd_hooks=[(SITE, by_hand)]).log_softmax(-1)[:, :-1]
        n_base = tiny_model(neutral).log_softmax(-1)[:, :-1]
    assert effect.target_prob == pytest.approx(float(final.softmax(-1)[:, targets].sum(-1).mean()), rel=1e-5)
    assert effect.target_logit == pytest.approx(float(final[:, targets].mean()), rel=1e-5)
    kl = float((n_base.exp() * (n_base - n_steered)).sum(-1).mean())
    ce = lambda lp: float(-lp.gather(-1, neutral[:, 1:, None]).mean())  # noqa: E731
    assert effect.kl == pytest.approx(kl, rel=1e-4) and effect.kl > 0
    assert effect.ce_increase == pytest.approx(ce(n_steered) - ce(n_base), abs=1e-5)
    assert meter.baseline.kl == 0.0 and meter.baseline.ce_increase == 0.0
    assert meter.baseline.target_prob == pytest.approx(float(base[torch.arange(2), prompts.lengths - 1].softmax(-1)[:, targets].sum(-1).mean()), rel=1e-5)
    assert no_hooks(tiny_model)


def test_dose_response_of_an_unembedding_direction_is_monotonic(tiny_model, neutral):
    token = 958
    meter = Meter(tiny_model, [PROMPT_A], targets=[token], neutral=neutral)
    rows = meter.dose_response(lambda c: [AddDirection(LAST, unembed_direction(tiny_model, token), c)], [0, 1, 2, 4, 8])
    probs = [r.target_prob for r in rows]
    assert is_monotonic(probs) and probs[-1] > 2 * probs[0]
    assert rows[0].kl == pytest.approx(0.0, abs=1e-6) and is_monotonic([r.kl for r in rows])


def test_feature_activation_is_read_after_the_edit(tiny_model):
    """Adding c * W_dec[f] raises the feature's own activation by c (for a ReLU feature with w_enc . w_dec = 1, active)."""
    from workbench.interventions import Feature

    d = tiny_model.cfg.d_model
    w = torch.randn(d, generator=torch.Generator().manual_seed(3))
    w = w / w.norm()
    feature = Feature.from_rows(SITE, w, 100.0, w)  # always active: activation = x.w + 100
    meter = Meter(tiny_model, [PROMPT_A], feature=feature)
    rows = meter.dose_response(lambda c: [AddDirection(SITE, w, c)], [0.0, 1.0, 3.0])
    assert [r.feature_act - rows[0].feature_act for r in rows] == pytest.approx([0.0, 1.0, 3.0], abs=1e-4)


def test_non_finite_logits_are_a_clear_error(tiny_model):
    meter = Meter(tiny_model, [PROMPT_A], targets=[5])
    v = torch.ones(tiny_model.cfg.d_model)
    with pytest.raises(WorkbenchError, match="at coefficient 1e\\+38: .*NaN or infinite logits"):
        meter.dose_response(lambda c: [AddDirection(SITE, v, c)], [1.0, 1e38])
    with pytest.raises(WorkbenchError, match="NaN or infinite"):
        generate(tiny_model, PROMPT_A, [AddDirection(SITE, v, 1e38)], max_new_tokens=2)
    assert no_hooks(tiny_model)


# ---------------------------------------------------------------------------- directions
def test_contrastive_vectors_against_hand_means_and_transformerlens(tiny_model, ioi):
    from transformer_lens.tools.analysis.interchange import mean_difference_basis

    sites = [SITE, LAST]
    vectors = contrastive_vectors(tiny_model, ioi, PromptBatch(ioi.corrupt, ioi.final_pos + 1), sites)
    assert [(v.site, v.method) for v in vectors] == [(SITE, "mean_diff"), (SITE, "pca"), (LAST, "mean_diff"), (LAST, "pca")]
    with torch.no_grad():
        _, clean = tiny_model.run_with_cache(ioi.clean, names_filter=lambda n: n in sites)
        _, corrupt = tiny_model.run_with_cache(ioi.corrupt, names_filter=lambda n: n in sites)
    rows = torch.arange(len(ioi))
    for v in vectors:
        a, b = clean[v.site][rows, ioi.final_pos], corrupt[v.site][rows, ioi.final_pos]
        if v.method == "mean_diff":
            torch.testing.assert_close(v.vector, a.mean(0) - b.mean(0), rtol=1e-4, atol=1e-6)
            basis = mean_difference_basis(torch.cat([a, b]), [1] * len(a) + [0] * len(b))[:, 0]
            assert abs(float(torch.nn.functional.cosine_similarity(basis, v.vector, dim=0))) == pytest.approx(1.0, abs=1e-5)
        else:  # the top right-singular vector of the paired differences, aligned with and scaled to the mean difference
            diffs = (a - b).double()
            top = torch.linalg.eigh(diffs.T @ diffs).eigenvectors[:, -1].float()
            assert abs(float(torch.nn.functional.cosine_similarity(top, v.vector, dim=0))) == pytest.approx(1.0, abs=1e-4)
            mean_diff = a.mean(0) - b.mean(0)
            assert float(mean_diff @ v.vector) > 0
            assert float(v.vector.norm()) == pytest.approx(abs(float(mean_diff @ top)), rel=1e-4)


def test_layer_sweep_ranks_by_the_callers_score(tiny_model, ioi):
    vectors = contrastive_vectors(tiny_model, ioi, PromptBatch(ioi.corrupt, ioi.final_pos + 1), [SITE, LAST], methods=["mean_diff"])
    meter = Meter(tiny_model, ioi, metric=ioi.metric)
    rows = layer_sweep(tiny_model, vectors, lambda ivs: meter.effect(ivs).metric, coef=-2.0, positions=ALL)
    by_hand = {v.site: meter.effect([v.add(-2.0)]).metric for v in vectors}
    assert [r.site for r in rows] == sorted(by_hand, key=lambda s: -by_hand[s])
    assert [r.score for r in rows] == pytest.approx(sorted(by_hand.values(), reverse=True))


def test_vector_files_round_trip(tmp_path):
    v = SteeringVector("blocks.1.hook_resid_post", torch.randn(32), "mean_diff", "ioi")
    loaded = SteeringVector.load(v.save(tmp_path / "v.safetensors"))
    assert loaded.site == v.site and loaded.method == "mean_diff" and torch.equal(loaded.vector, v.vector)
    import numpy as np

    np.save(tmp_path / "v.npy", v.vector.numpy())
    assert torch.equal(SteeringVector.load(tmp_path / "v.npy", site=SITE).vector, v.vector)
    with pytest.raises(WorkbenchError, match="names no site"):
        SteeringVector.load(tmp_path / "v.npy")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WorkbenchError, match="cannot read vector file"):
        SteeringVector.load(tmp_path / "bad.safetensors", site=SITE)


def test_promoted_tokens_of_an_unembedding_column(tiny_model):
    token = 777
    top = promoted_tokens(tiny_model, SteeringVector(LAST, unembed_direction(tiny_model, token)), k=3)
    assert top[0].token == token and top[0].score >= top[1].score


def test_direction_ablation_removes_linear_readability_along_it(tiny_model, tokenizer):
    """Two prompt sets (IOI vs docstring prompts): readable along the difference of means; after ablation, chance."""
    from data.tasks import make_task

    pos = make_task("ioi", tokenizer, n=40, seed=2)
    neg = make_task("docstring", tokenizer, n=40, seed=2)
    sep = separating_direction(tiny_model, pos, neg, SITE)
    assert sep.positive_mean > sep.threshold > sep.negative_mean
    before = collect(tiny_model, pos, [LAST])[LAST], collect(tiny_model, neg, [LAST])[LAST]
    ablation = ablate_direction_everywhere(tiny_model, sep.direction)
    after = collect(tiny_model, pos, [LAST], interventions=ablation)[LAST], collect(tiny_model, neg, [LAST], interventions=ablation)[LAST]
    r_before, r_after = readability(*before, sep.direction), readability(*after, sep.direction)
    assert r_before.direction > 0.9
    assert r_after.direction == pytest.approx(0.5, abs=0.05)
    assert float((torch.cat(after) @ sep.direction).abs().max()) < 1e-4


def test_probe_separation_points_from_negative_to_positive(tiny_model, tokenizer):
    from data.tasks import make_task

    pos = make_task("ioi", tokenizer, n=40, seed=5)
    neg = make_task("docstring", tokenizer, n=40, seed=5)
    probe = separating_direction(tiny_model, pos, neg, SITE, method="probe")
    means = separating_direction(tiny_model, pos, neg, SITE)
    assert probe.positive_mean > probe.threshold > probe.negative_mean
    assert float(probe.direction.norm()) == pytest.approx(1.0) and abs(float(probe.direction.sum())) < 1e-4  # unit, centred
    held_pos = collect(tiny_model, make_task("ioi", tokenizer, n=30, seed=6), [SITE])[SITE]
    held_neg = collect(tiny_model, make_task("docstring", tokenizer, n=30, seed=6), [SITE])[SITE]
    assert readability(held_pos, held_neg, probe.direction).direction > 0.9
    assert float(probe.direction @ means.direction) > 0  # the two methods agree on the side
    with pytest.raises(WorkbenchError, match="unknown separation method"):
        separating_direction(tiny_model, pos, neg, SITE, method="lda")


@pytest.mark.parametrize("arch", ["gpt2", "neox", "llama", "qwen2"])
def test_orthogonalized_model_matches_the_hook_ablation(arch, model_dirs, tmp_path):
    """Saved, reloaded through load_model (processed and raw), and equal to the hook-based ablation."""
    from workbench.model import load_model

    model = load_model(model_dirs[arch], device="cpu")
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4)) + 0.5  # not centred on purpose
    out = orthogonalize(model, d, tmp_path / "ortho")
    tokens = model.to_tokens(PROMPT_A)
    with torch.no_grad():
        with intervene(model, ablate_direction_everywhere(model, d)):
            hooked = model(tokens).log_softmax(-1)
        original = model(tokens).log_softmax(-1)
        for process in (True, False):
            saved = load_model(out, device="cpu", process_weights=process)
            torch.testing.assert_close(saved(tokens).log_softmax(-1), hooked, rtol=0, atol=2e-5)
    assert (original - hooked).abs().max() > 1e-3
    with pytest.raises(WorkbenchError, match="already exists"):
        orthogonalize(model, d, out)


def test_orthogonalizing_a_subspace_matches_its_hook_ablation(tiny_model, tmp_path):
    from workbench.model import load_model

    stack = torch.randn(3, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(7))
    saved = load_model(orthogonalize(tiny_model, stack, tmp_path / "ortho3"), device="cpu")
    tokens = tiny_model.to_tokens(PROMPT_A)
    with torch.no_grad():
        with intervene(tiny_model, ablate_direction_everywhere(tiny_model, stack)):
            hooked = tiny_model(tokens).log_softmax(-1)
        _, cache = saved.run_with_cache(tokens, names_filter=lambda n: n == LAST)
        torch.testing.assert_close(saved(tokens).log_softmax(-1), hooked, rtol=0, atol=2e-5)
    centred = stack - stack.mean(-1, keepdim=True)
    assert float((cache[LAST] @ centred.T).abs().max()) < 1e-4


def test_orthogonalize_refuses_post_norm_architectures(model_dirs, tmp_path):
    from workbench.model import load_model

    model = load_model(model_dirs["gemma2"], device="cpu")
    with pytest.raises(WorkbenchError, match="not 'gemma2'.*hook ablation"):
        orthogonalize(model, torch.ones(model.cfg.d_model), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_reroute_moves_the_activation_across_the_threshold(tiny_model, tokenizer):
    """An embedding perturbation found by gradient descent moves the last token's projection to the other class."""
    from data.tasks import make_task

    pos = make_task("ioi", tokenizer, n=30, seed=3)
    neg = make_task("docstring", tokenizer, n=30, seed=3)
    sep = separating_direction(tiny_model, pos, neg, LAST)
    prompt = pos.clean[:1, : int(pos.final_pos[0]) + 1]
    result = reroute(tiny_model, prompt, sep, steps=200)
    assert result.start > sep.threshold and result.crossed and result.end < sep.threshold
    assert abs(result.end - result.target) < 0.1 * abs(result.start - result.target)
    with torch.no_grad(), intervene(tiny_model, [result.intervention()]):
        _, cache = tiny_model.run_with_cache(prompt, names_filter=lambda n: n == LAST)
    assert float(cache[LAST][0, -1] @ sep.direction) == pytest.approx(result.end, abs=1e-4)
    assert len(result.nearest_tokens) == prompt.shape[1] - 1 and 0 < result.relative_norm
    assert no_hooks(tiny_model) and all(p.grad is None for p in tiny_model.parameters())


def test_behaviour_codes_are_found_and_switched_on(tiny_model, tokenizer):
    """Codebook-style steering: codes selective for a behaviour, activated (delta clamp to 1) from the first new token."""
    from data.tasks import make_task
    from sae.dictionary import Dictionary, DictionaryConfig
    from workbench.interventions import Feature

    codebook = Dictionary(DictionaryConfig(name="cb", arch="codebook", d_in=tiny_model.cfg.d_model, d_sae=64, k=2, site=SITE), seed=9)
    pos = make_task("ioi", tokenizer, n=16, seed=4)
    neg = make_task("docstring", tokenizer, n=16, seed=4)
    codes = behaviour_codes(tiny_model, codebook, pos, neg, top=2)
    acts_pos = codebook.encode(collect(tiny_model, pos, [SITE], read="all")[SITE]).detach()
    acts_neg = codebook.encode(collect(tiny_model, neg, [SITE], read="all")[SITE]).detach()
    gap = (acts_pos > 0).float().mean(0) - (acts_neg > 0).float().mean(0)
    assert codes[0].index == int(gap.argmax()) and codes[0].score == pytest.approx(float(gap.max()))
    assert codes[0].mean_active == 1.0  # a codebook code's value is 1 when chosen
    clamps = activate_codes(codebook, codes, positions=GENERATED)
    feature = Feature.from_dictionary(codebook, codes[0].index)
    meter = Meter(tiny_model, [PROMPT_A], feature=feature)
    assert meter.effect(clamps).feature_act == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------- storage and CLI
def test_save_run_publishes_tables_keyed_by_run(tiny_model, workspace, neutral):
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    ivs = [AddDirection(SITE, v, 2.0)]
    meter = Meter(tiny_model, [PROMPT_A], targets=[958], neutral=neutral)
    pair = side_by_side(tiny_model, PROMPT_A, ivs, max_new_tokens=4, seed=0)
    run = SteeringRun("abc123", "tiny", "vector", [iv.describe() for iv in ivs], 2.0, "all", 0, 1.0, 4, [" drink"],
                      [pair], meter.baseline, meter.effect(ivs), meter.dose_response(lambda c: [AddDirection(SITE, v, c)], [0, 1, 2]))
    save_run(workspace, run)
    runs = workspace.sql("SELECT * FROM steering_runs")
    assert runs.run_id.tolist() == ["abc123"] and runs.steered_text[0] == pair.steered.text
    assert runs.kl[0] == pytest.approx(run.steered.kl)
    sweeps = workspace.sql("SELECT coef, target_prob FROM steering_sweeps WHERE run_id = 'abc123' ORDER BY coef")
    assert sweeps.coef.tolist() == [0.0, 1.0, 2.0]
    gens = workspace.sql("SELECT variant, text FROM steering_generations ORDER BY variant")
    assert gens.text.tolist() == [pair.baseline.text, pair.steered.text]
    assert json.loads(runs.interventions[0])[0]["kind"] == "add"
    # A second run without a sweep, a metric or neutral text: the union across files keeps every column's type.
    bare = SteeringRun("def456", "tiny", "vector", [], None, "all", 0, 1.0, 4, [], [pair], Meter(tiny_model, [PROMPT_A]).baseline,
                       Meter(tiny_model, [PROMPT_A]).effect(ivs))
    save_run(workspace, bare)
    types = workspace.sql("SELECT typeof(kl) AS kl, typeof(coef) AS coef, typeof(created) AS created FROM steering_runs")
    assert set(types.kl) == {"DOUBLE"} and set(types.coef) == {"DOUBLE"} and set(types.created) == {"TIMESTAMP"}
    assert workspace.sql("SELECT count(*) AS n FROM steering_sweeps").n[0] == 3


def _cli(argv):
    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def neutral_file(tmp_path_factory):
    from data.tasks import examples

    path = tmp_path_factory.mktemp("neutral") / "neutral.txt"
    path.write_text("\n\n".join(e.clean for e in examples("docstring", 12, seed=5)))
    return path


def test_cli_steer_with_a_vector_file(tiny_model, model_dirs, workspace, tmp_path, neutral_file):
    vector = SteeringVector(LAST, unembed_direction(tiny_model, 958), "vector", "push-drink").save(tmp_path / "push.safetensors")
    code, out, err = _cli(["steer", "--model", str(model_dirs["gpt2"]), "--workspace", str(workspace.root), "--json",
                           "--prompt", PROMPT_A, "--vector", str(vector), "--coef", "4", "--positions", "generated",
                           "--max-new-tokens", "5", "--temperature", "0", "--neutral", str(neutral_file), "--neutral-rows", "2"])
    assert code == 0, err
    result = json.loads(out)
    assert result["targets"] == [tiny_model.tokenizer.decode([958])]  # the vector's top promoted token
    assert result["steered"]["target_prob"] > result["baseline"]["target_prob"]
    assert [r["coef"] for r in result["sweep"]] == [-4.0, 0.0, 1.0, 2.0, 4.0, 8.0]
    assert is_monotonic([r["target_prob"] for r in result["sweep"]])
    assert result["steered"]["kl"] > 0 and len(result["generations"]) == 1
    stored = workspace.sql("SELECT run_id, kind FROM steering_runs")
    assert stored.run_id.tolist() == [result["run_id"]] and stored.kind[0] == "vector"


@pytest.mark.parametrize("extra, message", [
    (["--vector", "WIDE", "--coef", "1"], "width 33 does not fit"),
    (["--vector", "VEC", "--coef", "1e38"], "NaN or infinite logits"),
    (["--vector", "VEC", "--site", "blocks.9.hook_resid_post"], "unknown site"),
    (["--vector", "VEC", "--target", " no such multi token thing"], "give a single token"),
    (["--vector", "VEC", "--positions", "999"], "outside the sequence"),
    (["--vector", "VEC", "--max-new-tokens", "500"], "exceeds the model's context"),
    (["--feature", "nothere:3"], "no dictionary 'nothere'"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(model_dirs, workspace, tmp_path, neutral_file, extra, message):
    files = {"VEC": SteeringVector(LAST, torch.ones(32)).save(tmp_path / "v.safetensors"),
             "WIDE": SteeringVector(LAST, torch.ones(33)).save(tmp_path / "w.safetensors")}
    extra = [str(files.get(a, a)) for a in extra]
    code, out, err = _cli(["steer", "--model", str(model_dirs["gpt2"]), "--workspace", str(workspace.root), "--prompt", PROMPT_A,
                           "--max-new-tokens", "3", "--neutral", str(neutral_file), "--neutral-rows", "2", *extra])
    assert code == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not workspace.published_dbs()


def _steer(model_dirs, workspace, neutral_file, *extra):
    return _cli(["steer", "--model", str(model_dirs["gpt2"]), "--workspace", str(workspace.root), "--json", "--prompt", PROMPT_A,
                 "--max-new-tokens", "4", "--neutral", str(neutral_file), "--neutral-rows", "2", *map(str, extra)])


def test_cli_feature_add_and_clamp(tiny_model, model_dirs, workspace, neutral_file):
    """--feature NAME:F resolves a workspace dictionary; --coef adds its decoder row, --clamp clamps it (delta form)."""
    from sae.dictionary import Dictionary, DictionaryConfig

    sae = Dictionary(DictionaryConfig(name="tiny-sae", arch="relu", d_in=tiny_model.cfg.d_model, d_sae=40, site=LAST), seed=3)
    sae.save(workspace.dictionaries_dir / "tiny-sae")
    code, out, err = _steer(model_dirs, workspace, neutral_file, "--feature", "tiny-sae:5", "--coef", "3", "--sweep", "0,1,3")
    assert code == 0, err
    added = json.loads(out)
    assert added["kind"] == "feature"
    assert [r["coef"] for r in added["sweep"]] == [0.0, 1.0, 3.0]
    top = promoted_tokens(tiny_model, SteeringVector(LAST, sae.W_dec[5].detach()), k=1)[0]
    assert added["targets"] == [top.text] and added["steered"]["target_prob"] > added["baseline"]["target_prob"]
    acts = [r["feature_act"] for r in added["sweep"]]
    assert acts[0] == pytest.approx(added["baseline"]["feature_act"]) and is_monotonic(acts)
    code, out, err = _steer(model_dirs, workspace, neutral_file, "--feature", "tiny-sae:5", "--clamp", "7.5", "--positions", "generated")
    assert code == 0, err
    clamped = json.loads(out)
    with torch.no_grad():  # the encoder's reading of x + (7.5 - f(x)) W_dec[5] at the last prompt token
        _, cache = tiny_model.run_with_cache(tiny_model.to_tokens(PROMPT_A), names_filter=lambda n: n == LAST)
        x = cache[LAST][0, -1]
        expected = float(sae.encode(x + (7.5 - sae.encode(x)[5]) * sae.W_dec[5])[5])
    assert clamped["kind"] == "clamp" and clamped["steered"]["feature_act"] == pytest.approx(expected, abs=1e-5)
    assert clamped["steered"]["feature_act"] != pytest.approx(clamped["baseline"]["feature_act"])
    code, _, err = _steer(model_dirs, workspace, neutral_file, "--feature", "tiny-sae:40", "--coef", "1")
    assert code == 1 and "feature index 40 is out of range" in err
    assert len(workspace.published_dbs()) == 2


def test_cli_contrast_task_chooses_a_layer_and_saves_the_vector(model_dirs, workspace, neutral_file, tmp_path):
    code, out, err = _steer(model_dirs, workspace, neutral_file, "--contrast", "ioi", "--coef", "-1", "--save-vector", tmp_path / "ioi.safetensors")
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "contrast" and len(result["layers"]) == 2
    scores = [r["score"] for r in result["layers"]]
    assert scores == sorted(scores, reverse=True)
    # The task metric is reported on the held-out prompts, and the chosen layer's score is the steered metric (negated: coef < 0).
    assert result["steered"]["metric"] == pytest.approx(-scores[0], abs=1e-5)
    assert [r["coef"] for r in result["sweep"]] == [-2.0, -1.0, -0.5, -0.25, 0.0, 1.0]
    assert next(r["metric"] for r in result["sweep"] if r["coef"] == 0.0) == pytest.approx(result["baseline"]["metric"])
    saved = SteeringVector.load(tmp_path / "ioi.safetensors")
    assert saved.site == result["layers"][0]["site"] and saved.method == "mean_diff"
    layers = workspace.sql("SELECT site FROM steering_layers WHERE run_id = ?", [result["run_id"]])
    assert sorted(layers.site) == sorted(r["site"] for r in result["layers"])


def test_cli_codes(tiny_model, model_dirs, workspace, neutral_file, tmp_path):
    from data.tasks import examples
    from sae.dictionary import Dictionary, DictionaryConfig

    Dictionary(DictionaryConfig(name="cb", arch="codebook", d_in=tiny_model.cfg.d_model, d_sae=32, k=2, site=SITE), seed=1).save(
        workspace.dictionaries_dir / "cb")
    (tmp_path / "b.txt").write_text("\n".join(e.clean for e in examples("ioi", 8, seed=1)))
    (tmp_path / "o.txt").write_text("\n".join(e.clean for e in examples("greater_than", 8, seed=1)))
    code, out, err = _steer(model_dirs, workspace, neutral_file, "--codes", "cb", "--behaviour", tmp_path / "b.txt",
                            "--other", tmp_path / "o.txt", "--top", "2", "--positions", "generated")
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "codes" and "codes:" in err
    assert [r["coef"] for r in result["sweep"]] == [-1.0, 0.0, 0.25, 0.5, 1.0, 2.0]


def test_cli_ablate_direction_and_orthogonalize(tiny_model, model_dirs, workspace, neutral_file, tmp_path):
    from workbench.model import load_model

    direction = SteeringVector("residual", torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(6))).save(tmp_path / "d.safetensors")
    code, out, err = _steer(model_dirs, workspace, neutral_file, "--ablate-direction", direction, "--orthogonalize", tmp_path / "ortho")
    assert code == 0, err
    result = json.loads(out)
    assert result["kind"] == "ablate_direction" and result["sweep"] == [] and result["steered"]["kl"] > 0
    saved = load_model(result["orthogonalized_model"], device="cpu")
    tokens = tiny_model.to_tokens(PROMPT_A)
    with torch.no_grad(), intervene(tiny_model, ablate_direction_everywhere(tiny_model, SteeringVector.load(direction).vector)):
        hooked = tiny_model(tokens).log_softmax(-1)
    torch.testing.assert_close(saved(tokens).log_softmax(-1), hooked, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------- the reference model (done-when figures)
REF = "ref-gpt2"


def figure(message: str) -> None:
    """Print a done-when figure (visible with `pytest -s`)."""
    print(f"\n[steering figure] {message}")


@pytest.fixture(scope="module")
def ref_neutral(ref_model):
    from workbench.steering import neutral_tokens

    return neutral_tokens(ref_model, n=16, context=64)


@pytest.fixture(scope="module")
def ref_sae(ref_model):
    """A small TopK SAE trained here on the reference model's middle residual stream (train split of the corpus)."""
    from data.corpus import documents, token_chunks
    from sae.dictionary import DictionaryConfig
    from sae.train import TrainConfig, tensor_source, train_dictionaries

    site = f"blocks.{ref_model.cfg.n_layers // 2}.hook_resid_post"
    rows = []
    for row in token_chunks(ref_model.tokenizer, documents("reference", split="train"), 128):
        rows.append(row)
        if len(rows) == 128:
            break
    acts = collect(ref_model, torch.tensor(rows), [site], read="all")[site]  # [128 * 127, d_model]
    cfg = DictionaryConfig(name="ref-steer", arch="topk", d_in=ref_model.cfg.d_model, d_sae=4 * ref_model.cfg.d_model, k=16,
                           model=REF, site=site)
    result = train_dictionaries([cfg], tensor_source(acts, batch_size=1024), TrainConfig(tokens=120_000, batch_size=1024, seed=0),
                                progress=False)
    figure(f"SAE on {site}: {acts.shape[0]} activations, fvu {result.metrics[0].fvu:.3f}, l0 {result.metrics[0].l0:.1f}")
    return result.dictionaries[0].eval(), acts


@pytest.mark.reference
def test_ref_feature_direction_raises_its_top_promoted_token_monotonically(ref_model, ref_sae, ref_neutral):
    from workbench.directions import feature_vector
    from workbench.interventions import Feature

    sae, acts = ref_sae
    with torch.no_grad():
        feats = sae.encode(acts)
    alive = (feats > 0).float().mean(0) > 1e-3
    scale = float(acts.norm(dim=-1).mean())  # coefficients in units of the site's mean residual norm
    # The chosen feature: the alive one whose decoder row most strongly promotes a single token.
    direct = torch.stack([torch.tensor(promoted_tokens(ref_model, SteeringVector(sae.cfg.site, sae.W_dec[i].detach()), k=1)[0].score)
                          if alive[i] else torch.tensor(-1e9) for i in range(sae.cfg.d_sae)])
    f = int(direct.argmax())
    feature = Feature.from_dictionary(sae, f, f"ref-steer:{f}")
    top = promoted_tokens(ref_model, feature_vector(feature), k=1)[0]
    prompts = PromptBatch(ref_neutral[:, :32], torch.full((len(ref_neutral),), 32))
    meter = Meter(ref_model, prompts, targets=[top.token], feature=feature, neutral=ref_neutral)
    coefs = [m * scale for m in (0.0, 0.125, 0.25, 0.5, 1.0, 2.0)]
    rows = meter.dose_response(lambda c: [AddDirection(feature.write_site, feature.w_dec, c)], coefs)
    for r in rows:
        figure(f"feature {f} (promotes {top.text!r}) coef {r.coef:7.2f}: P={r.target_prob:.4f} act={r.feature_act:.2f} "
               f"KL={r.kl:.4f} dCE={r.ce_increase:+.4f}")
    probs = [r.target_prob for r in rows]
    assert is_monotonic(probs) and probs[-1] > 5 * probs[0]
    assert is_monotonic([r.feature_act for r in rows])


@pytest.mark.reference
def test_ref_start_year_vector_moves_the_predicted_year(ref_model):
    """A contrastive vector from greater-than prompts (start year 60-98 minus start year 02-40, last position) moves
    the year ref-gpt2 predicts on held-out prompts monotonically in its coefficient, far more than norm-matched random
    vectors, and subtracting it breaks the comparison (the probability difference falls).

    (The earlier ref-gpt2 was steered with an IOI name-order vector; the current one, trained on varied IOI
    sentences, does not carry IOI along that direction: coefficient -1 moved the held-out logit difference 0.38 of
    5.61, inside the range of random vectors, so IOI is no longer the test's behaviour.)
    """
    import re

    from data.tasks import make_task

    train = make_task("greater_than", ref_model.tokenizer, n=256, split="train", seed=0)
    heldout = make_task("greater_than", ref_model.tokenizer, n=128, split="heldout", seed=0)
    start = [int(re.search(r"\d\d(\d\d) ", e.clean).group(1)) for e in train.examples]
    late = train[[i for i, y in enumerate(start) if y >= 60]]
    early = train[[i for i, y in enumerate(start) if y <= 40]]
    years = torch.tensor([ref_model.tokenizer(f"{y:02d}", add_special_tokens=False)["input_ids"][0] for y in range(100)])
    rows_of = torch.arange(len(heldout))

    def predicted_year(logits):  # expected two-digit year at the answer position
        p = logits[rows_of, heldout.final_pos][:, years].softmax(-1)
        return (p * torch.arange(100.0)).sum(-1)

    site = f"blocks.{ref_model.cfg.n_layers - 2}.hook_resid_post"  # the residual stream entering the last block
    (vector,) = contrastive_vectors(ref_model, late, early, [site], methods=["mean_diff"])
    meter = Meter(ref_model, heldout, metric=predicted_year)
    base = meter.baseline.metric
    rows = meter.dose_response(lambda c: [vector.add(c)], [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    figure("predicted year vs coefficient of the start-year vector at " + site + ": "
           + ", ".join(f"{r.coef:+.1f}: {r.metric:.1f}" for r in rows))
    g = torch.Generator().manual_seed(0)
    placebos = []
    for _ in range(8):  # norm-matched random vectors at the same site
        r = torch.randn(vector.vector.shape, generator=g)
        placebos.append(abs(meter.effect([AddDirection(site, r / r.norm() * vector.vector.norm(), 1.0)]).metric - base))
    moved = meter.effect([vector.add(1.0)]).metric - base
    figure(f"start-year vector, coef +1: predicted year {base:.1f} -> {base + moved:.1f}; 8 random vectors move "
           f"{min(placebos):.1f}-{max(placebos):.1f} years")
    assert is_monotonic([r.metric for r in rows]) and rows[0].metric < base < rows[-1].metric
    assert moved > 10 and moved > 2 * max(placebos)
    comparison = Meter(ref_model, heldout, metric=heldout.metric)
    broken = comparison.effect([vector.add(-1.0)]).metric
    figure(f"probability difference P(> YY) - P(<= YY): {comparison.baseline.metric:.2f} -> {broken:.2f} at coef -1")
    assert broken < comparison.baseline.metric - 0.3


@pytest.fixture(scope="module")
def ref_separation(ref_model):
    """A direction separating IOI prompts (a name comes next) from greater-than prompts (a number comes next)."""
    from data.tasks import make_task

    site = f"blocks.{ref_model.cfg.n_layers // 2 - 1}.hook_resid_post"
    pos = make_task("ioi", ref_model.tokenizer, n=64, split="train", seed=1)
    neg = make_task("greater_than", ref_model.tokenizer, n=64, split="train", seed=1)
    return separating_direction(ref_model, pos, neg, site)


@pytest.mark.reference
def test_ref_direction_ablation_drops_the_probe_to_chance(ref_model, ref_separation, ref_neutral):
    from data.tasks import make_task

    sep = ref_separation
    pos = make_task("ioi", ref_model.tokenizer, n=64, split="heldout", seed=2)
    neg = make_task("greater_than", ref_model.tokenizer, n=64, split="heldout", seed=2)
    ablation = ablate_direction_everywhere(ref_model, sep.direction)
    read_at = f"blocks.{ref_model.cfg.n_layers - 1}.hook_resid_post"
    for site in (sep.site, read_at):
        before = collect(ref_model, pos, [site])[site], collect(ref_model, neg, [site])[site]
        after = (collect(ref_model, pos, [site], interventions=ablation)[site], collect(ref_model, neg, [site], interventions=ablation)[site])
        rb, ra = readability(*before, sep.direction), readability(*after, sep.direction)
        u = sep.direction / sep.direction.norm()
        left = max((x.float() @ u.float()).abs().max().item() for x in after)
        scale = max((x.float() @ u.float()).abs().max().item() for x in before)
        figure(f"separating direction at {sep.site}, probed at {site}: along it {rb.direction:.2f} -> {ra.direction:.2f}; "
               f"full-width probe {rb.full:.2f} -> {ra.full:.2f} (n={ra.n}); largest projection {scale:.3g} -> {left:.2g}")
        # The oracle: nothing is left along the direction but float rounding, which `readability` counts as zero.
        assert rb.direction > 0.9 and left < 1e-4 * scale
        assert ra.direction == pytest.approx(0.5, abs=0.05)
    side = Meter(ref_model, pos, metric=pos.metric, neutral=ref_neutral).effect(ablation)
    base = Meter(ref_model, pos, metric=pos.metric).baseline
    figure(f"direction ablation side effects: KL {side.kl:.4f} nats/token, CE +{side.ce_increase:.4f} on neutral text; "
           f"IOI logit diff {base.metric:.2f} -> {side.metric:.2f}")
    assert side.kl is not None and side.kl >= 0


@pytest.mark.reference
def test_ref_orthogonalized_model_matches_the_hook_ablation(ref_model, ref_separation, ref_neutral, tmp_path):
    from workbench.model import load_model

    out = orthogonalize(ref_model, ref_separation.direction, tmp_path / "ref-ortho")
    saved = load_model(out, device="cpu")
    with torch.no_grad():
        with intervene(ref_model, ablate_direction_everywhere(ref_model, ref_separation.direction)):
            hooked = ref_model(ref_neutral).log_softmax(-1)
        got = saved(ref_neutral).log_softmax(-1)
        original = ref_model(ref_neutral).log_softmax(-1)
    gap = float((got - hooked).abs().max())
    figure(f"orthogonalised ref-gpt2 vs hook ablation: max |log p| difference {gap:.2e} "
           f"(vs the original model: {float((original - hooked).abs().max()):.2e})")
    assert gap < 1e-4


@pytest.mark.reference
def test_ref_delta_clamp_keeps_the_error_term(ref_model, ref_sae, ref_neutral):
    """On the trained SAE: clamping a feature to the value it has is a no-op in delta form; naive re-encoding is not."""
    from workbench.interventions import ClampFeature, Feature

    sae, _ = ref_sae
    tokens = ref_neutral[:1]
    site = sae.cfg.site
    with torch.no_grad():
        _, cache = ref_model.run_with_cache(tokens, names_filter=lambda n: n == site)
        feats = sae.encode(cache[site])
        f = int((feats > 0).float().sum((0, 1)).argmax())
        pos = int((feats[0, :, f] > 0).nonzero()[0])
        value = float(feats[0, pos, f])

        def naive(x, hook):
            x = x.clone()
            z = sae.encode(x[:, pos])
            z[..., f] = value
            x[:, pos] = sae.decode(z)
            return x

        base = ref_model(tokens).log_softmax(-1)
        naive_lp = ref_model.run_with_hooks(tokens, fwd_hooks=[(site, naive)]).log_softmax(-1)
        with intervene(ref_model, [ClampFeature(Feature.from_dictionary(sae, f), value, at(pos))]):
            delta_lp = ref_model(tokens).log_softmax(-1)
    kl = lambda a, b: float((a.exp() * (a - b)).sum(-1)[0, pos])  # noqa: E731
    gap = lambda a, b: float((a - b).abs().max())  # noqa: E731
    figure(f"clamping feature {f} to its own value {value:.2f} at position {pos}: naive KL {kl(base, naive_lp):.2e} "
           f"(max |d log p| {gap(base, naive_lp):.2e}), delta KL {kl(base, delta_lp):.2e} (max {gap(base, delta_lp):.2e})")
    assert gap(base, delta_lp) < 1e-5 and gap(base, naive_lp) > 1e-3


@pytest.mark.reference
def test_ref_reroute_crosses_the_separation(ref_model, ref_separation):
    from data.tasks import make_task

    task = make_task("greater_than", ref_model.tokenizer, n=1, split="heldout", seed=3)
    prompt = task.clean[:, : int(task.final_pos[0]) + 1]
    result = reroute(ref_model, prompt, ref_separation)
    figure(f"reroute at {ref_separation.site}: projection {result.start:.2f} -> {result.end:.2f} (threshold {result.threshold:.2f}, "
           f"target {result.target:.2f}) in {result.steps} steps, |delta|/|e| {result.relative_norm:.2f}; "
           f"nearest tokens give {result.discrete_end:.2f} (crossed: {result.discrete_crossed})")
    assert result.crossed
