"""Planted-circuit models: the circuit is there by construction, and every method is scored against it."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.attribution import attribute_edges
from circuits.evaluate import score_edges, score_ground_truth
from circuits.find import CircuitOptions, find_circuit
from data.planted import GROUND_TRUTH_FILE, PLANTED, build_planted, ensure_planted, load_ground_truth
from data.tasks import DataError, make_task
from workbench.model import load_model


@pytest.fixture(scope="module", params=list(PLANTED))
def planted(request, tmp_path_factory):
    directory = build_planted(PLANTED[request.param], tmp_path_factory.mktemp("planted") / request.param)
    model = load_model(directory, device="cpu")
    return model, load_ground_truth(directory), make_task("induction", model.tokenizer, n=12, seed=0)


def test_the_planted_circuit_does_induction_and_is_the_mechanism(planted):
    model, truth, prompts = planted
    with torch.no_grad():
        clean, corrupt = model(prompts.clean), model(prompts.corrupt)
    assert prompts.accuracy(clean, top1=True).all()
    assert prompts.metric(clean).mean() > 5 and prompts.metric(corrupt).mean().abs() < 1
    (pl, ph), (il, ih) = truth.heads
    _, cache = model.run_with_cache(prompts.clean, names_filter=lambda n: n.endswith("hook_pattern"))
    prev = cache[f"blocks.{pl}.attn.hook_pattern"][:, ph]
    assert prev.diagonal(-1, dim1=-2, dim2=-1).mean() > 0.95
    final = cache[f"blocks.{il}.attn.hook_pattern"][:, ih, -1]  # query: the last token of the repeat
    assert (final.argmax(-1) == prompts.clean.shape[1] - 16).all()  # the token after its first occurrence
    # knocking out the previous-token head's output kills the behaviour
    def zero(z, hook):
        z[:, :, ph] = 0.0
        return z

    with torch.no_grad():
        knocked = model.run_with_hooks(prompts.clean, fwd_hooks=[(f"blocks.{pl}.attn.hook_z", zero)])
    assert prompts.metric(knocked).mean() < 0.3 * prompts.metric(clean).mean()


def test_ground_truth_is_saved_beside_the_weights(planted):
    model, truth, _ = planted
    raw = json.loads((model.workbench_dir / GROUND_TRUTH_FILE).read_text())
    spec = PLANTED[truth.model]
    assert truth.heads == (spec.prev_head, spec.induction_head) and raw["spec"]["seed"] == spec.seed
    assert truth.components() >= {f"L{spec.prev_head[0]}H{spec.prev_head[1]}"}
    assert (spec.relay_mlp is not None) == bool(truth.mlps)


@pytest.mark.parametrize("method", ["activation", "attribution", "ig", "relp"])
def test_methods_find_the_planted_components(planted, method):
    """The done-when bar: ROC AUC >= 0.95 on every planted model, for each of these four methods."""
    model, truth, prompts = planted
    run = find_circuit(model, prompts, CircuitOptions(method=method, positions="all", curve="none"))
    score = score_ground_truth(run.graph, truth)
    assert score.roc_auc >= 0.95, score
    assert score.precision == 1.0 and score.recall >= 0.3


@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_the_planted_circuit_alone_is_faithful_and_complete(planted, ablation):
    """Keeping only the planted components restores the behaviour; removing them removes it (real ablations)."""
    from circuits.evaluate import faithfulness_curve

    model, truth, prompts = planted
    graph = find_circuit(model, prompts, CircuitOptions(method="activation", positions="all", families=("head", "mlp"),
                                                         curve="none")).graph
    curve = {p.size: p for p in faithfulness_curve(model, prompts, graph, ablation=ablation)}
    k = len(truth.components())
    assert {n.component for n, _ in graph.top(k)} == truth.components()
    exact = faithfulness_curve(model, prompts, graph, ablation=ablation, sizes=[k])[0]
    assert exact.faithfulness > 0.8 and exact.completeness > 0.8, exact
    assert curve[0].faithfulness == 0.0 and curve[0].completeness == 0.0
    last = curve[max(curve)]
    assert last.faithfulness == pytest.approx(1.0) and last.completeness == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["attribution", "relp"])
def test_edge_attribution_finds_the_planted_edges(planted, method):
    model, truth, prompts = planted
    score = score_edges(attribute_edges(model, prompts, method), truth)
    assert score.roc_auc >= 0.95 and score.precision == 1.0 and score.recall >= 0.6, score


def test_planted_models_load_by_name(tmp_path):
    directory = ensure_planted("planted-induction")
    model = load_model("planted-induction", device="cpu")
    assert model.workbench_dir == directory and load_ground_truth("planted-induction").model == "planted-induction"
    with pytest.raises(DataError, match="unknown planted model"):
        ensure_planted("planted-nothing")
    with pytest.raises(DataError, match="not a planted-circuit model"):
        load_ground_truth(tmp_path)


def test_builds_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = build_planted(PLANTED["planted-induction"], tmp_path / "a")
    b = build_planted(PLANTED["planted-induction"], tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
