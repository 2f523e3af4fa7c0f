"""Feature circuits over real trained dictionaries (the sae package's trainer), checked against exact
feature patching, the transcoder weight split, circuit-tracer's pruning maths; and the discrete-code method."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.codes import code_circuit
from circuits.export import to_neuronpedia, validate_neuronpedia
from circuits.features import (feature_circuit, load_dictionaries, prune_by_influence, quick_dictionaries,
                               transcoder_split)
from circuits.graph import load_graph, save_graph
from circuits.patching import cache_sites
from data.planted import PLANTED, build_planted
from data.tasks import make_task
from tests.test_circuits import hook_count
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.model import load_model


@pytest.fixture(scope="module")
def dictionaries(tiny_model):
    """Transcoders on both MLPs and attention-output SAEs on both layers' hook_z, trained for a few seconds."""
    torch.manual_seed(0)
    tokens = torch.randint(1, tiny_model.cfg.d_vocab, (192, 20))
    trained = quick_dictionaries(tiny_model, tokens, d_sae=96, k=6, train_tokens=25_000)
    return {d.cfg.name: d for d in trained}


@pytest.fixture(scope="module")
def prompts(tiny_model):
    return make_task("ioi", tiny_model.tokenizer, n=6, template=0, seed=1)


def exact_feature_effect(model, prompts, d, node, corrupt_features, clean_features) -> float:
    """metric(corrupt, this feature moved to its clean value at its position) - metric(corrupt)."""
    delta = (clean_features - corrupt_features)[:, node.pos, node.feature]  # [batch]

    def move(y, hook):
        y = y.clone()
        y[:, node.pos] += delta[:, None] * d.W_dec[node.feature].detach()
        return y

    with torch.no_grad():
        patched = prompts.metric(model.run_with_hooks(prompts.corrupt, fwd_hooks=[(d.cfg.target_site, move)]))
        base = prompts.metric(model(prompts.corrupt))
    return float((patched - base).mean())


@pytest.mark.parametrize("via", ["attribution", "relp"])
def test_feature_scores_track_exact_feature_patching(tiny_model, dictionaries, prompts, via):
    ds = [dictionaries["tc0"], dictionaries["tc1"]]
    result = feature_circuit(tiny_model, prompts, ds, via=via, max_features=40)
    graph = result.graph
    feats = {}
    for d in ds:
        x = {}
        for tokens, key in ((prompts.clean, "clean"), (prompts.corrupt, "corrupt")):
            acts, _ = cache_sites(tiny_model, tokens, [d.cfg.site])
            x[key] = d.encode(d.site_input(acts[d.cfg.site]))
        feats[d.cfg.name] = x
    nodes = [(i, n) for i, n in enumerate(graph.nodes) if n.kind == "feature"][:20]
    exact = torch.tensor([exact_feature_effect(tiny_model, prompts, dictionaries[n.dictionary], n, feats[n.dictionary]["corrupt"],
                                               feats[n.dictionary]["clean"]) for _, n in nodes])
    approx = graph.scores[[i for i, _ in nodes]]
    assert torch.corrcoef(torch.stack([exact, approx]))[0, 1] > 0.9
    assert hook_count(tiny_model) == 0


def test_transcoder_split_is_exact_on_the_residual_path(tiny_model, dictionaries, prompts):
    """With attention outputs frozen, a transcoder-to-transcoder edge is exactly (W_dec . C . W_enc) x (delta a / sigma)."""
    ds = [dictionaries["tc0"], dictionaries["tc1"]]
    frozen = [(f"blocks.{l}.hook_attn_out", lambda x, hook: x.detach()) for l in range(tiny_model.cfg.n_layers)]
    with tiny_model.hooks(fwd_hooks=frozen):
        result = feature_circuit(tiny_model, prompts, ds, via="relp", detach_pattern=True, max_features=300,
                                 node_threshold=1.0, edge_threshold=1.0)
    result.graph.edge_mask = result.graph.adjacency != 0  # split every edge, not only those pruning keeps
    rows = transcoder_split(tiny_model, result, ds, prompts)
    assert len(rows) >= 5
    for row in rows:
        assert row.via_attention == pytest.approx(0.0, abs=1e-6 + 1e-4 * abs(row.total)), row
    loose = feature_circuit(tiny_model, prompts, ds, via="relp", max_features=300)
    loose.graph.edge_mask = loose.graph.adjacency != 0
    unfrozen = transcoder_split(tiny_model, loose, ds, prompts)
    assert any(abs(r.via_attention) > 1e-4 * abs(r.total) for r in unfrozen)  # attention does carry part of it


def test_pruning_follows_circuit_tracer():
    """Influence = w ((I - A)^-1 - I) on row-normalised |A|; a weak branch goes, the strong chain stays."""
    from circuits.features import _influence, _normalise

    torch.manual_seed(0)
    dag = torch.tril(torch.rand(7, 7), -1) * (torch.rand(7, 7) > 0.4)
    w = torch.tensor([0.0] * 6 + [1.0])
    closed = w @ (torch.linalg.inv(torch.eye(7) - _normalise(dag)) - torch.eye(7))
    torch.testing.assert_close(_influence(_normalise(dag), w), closed, atol=1e-5, rtol=1e-5)
    # embed(0) -> f1 -> f2 -> out(5) is strong; embed -> f3 -> f4 -> out is weak
    a = torch.zeros(6, 6)
    a[1, 0], a[2, 1], a[2, 0], a[3, 0], a[4, 3] = 1.0, 2.0, 0.5, 1.0, 1.0
    a[5, 2], a[5, 1], a[5, 4] = 5.0, 1.0, 0.01
    keep = torch.tensor([True, False, False, False, False, True])
    features = ~keep
    node_mask, edge_mask, cumulative = prune_by_influence(a, w[1:], keep, features, node_threshold=0.8, edge_threshold=0.98)
    assert node_mask.tolist() == [True, True, True, False, False, True]
    assert edge_mask[5, 2] and edge_mask[2, 1] and not edge_mask[5, 4]
    assert not edge_mask[~node_mask].any() and not edge_mask[:, ~node_mask].any()
    assert cumulative.max() == pytest.approx(1.0) and cumulative[3] > cumulative[1]
    with pytest.raises(WorkbenchError, match="node_threshold"):
        prune_by_influence(a, w[1:], keep, features, node_threshold=1.5)


def test_feature_graph_stores_and_exports(tiny_model, dictionaries, prompts, workspace):
    result = feature_circuit(tiny_model, prompts, [dictionaries["tc0"], dictionaries["z1"]], max_features=30)
    graph = result.graph
    kinds = {n.kind for n in graph.circuit_nodes()}
    assert {"embed", "logits"} <= kinds and kinds & {"feature", "error"}
    assert set(result.component_scores) <= {"MLP0"} | {f"L1H{h}" for h in range(4)}
    data = to_neuronpedia(graph)
    validate_neuronpedia(data)
    assert {"mlp reconstruction error", "cross layer transcoder"} & {n["feature_type"] for n in data["nodes"]}
    back = load_graph(workspace, save_graph(workspace, graph))
    torch.testing.assert_close(back.influence, graph.influence)
    torch.testing.assert_close(back.activations, graph.activations)


def test_dictionaries_from_another_model_are_refused(tiny_model, dictionaries, workspace, model_dirs, capsys):
    for d in dictionaries.values():
        d.save(workspace.dictionaries_dir / d.cfg.name)
    stranger = dictionaries["tc0"].with_config(name="stranger", model="some-other-model")
    stranger.save(workspace.dictionaries_dir / "stranger")
    with pytest.raises(WorkbenchError, match="trained on model 'some-other-model'"):
        load_dictionaries(workspace, ["stranger"], tiny_model)
    neox = load_model(model_dirs["neox"], device="cpu")
    wrong_width = dictionaries["z0"].with_config(name="wide", model=str(neox.cfg.model_name))
    wrong_width.save(workspace.dictionaries_dir / "wide")
    code = main(["circuit", "--task", "ioi", "--method", "features", "--dictionary", "stranger", "--model",
                 str(model_dirs["gpt2"]), "--workspace", str(workspace.root)])
    assert code == 1 and "some-other-model" in capsys.readouterr().err
    code = main(["circuit", "--task", "ioi", "--method", "transcoder", "--dictionary", "tc0", "--dictionary", "tc1",
                 "--model", str(model_dirs["gpt2"]), "--n", "4", "--workspace", str(workspace.root), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["method"] == "features-relp" and "transcoder_split" in summary


def test_codes_count_only_codes_unique_to_positive_examples(tmp_path):
    """Per-head codebooks trained from ten prompt pairs (the sae trainer): a head whose final output is the same on
    positive and negative examples (the previous-token head reads the last token before the end, identical in both)
    scores 0, and with negatives equal to positives every head does."""
    from dataclasses import replace

    spec = PLANTED["planted-induction"]
    model = load_model(build_planted(spec, tmp_path / "p"), device="cpu")
    prompts = make_task("induction", model.tokenizer, n=10, seed=0)
    result = code_circuit(model, prompts, code_size=8)
    scores = {(h.layer, h.head): h for h in result.heads}
    assert scores[spec.prev_head].score == 0.0 and scores[spec.prev_head].unique_codes == 0
    assert all(0.0 <= h.score <= 1.0 for h in result.heads) and result.n_positive == 10
    assert [h.score for h in result.heads] == sorted((h.score for h in result.heads), reverse=True)
    assert result.graph.info.granularity == "code" and torch.equal(result.graph.node_mask, result.graph.scores >= 0.5)
    same = code_circuit(model, replace(prompts, corrupt=prompts.clean), code_size=8)
    assert all(h.score == 0.0 for h in same.heads)
