"""Edge-level methods against oracles: TL 4.3's edge attribution, its exact direct path patching and its
ablate-outside faithfulness; ACDC on a planted circuit."""

from __future__ import annotations

import pytest
import torch

from circuits.acdc import acdc
from circuits.attribution import attribute, attribute_edges
from circuits.components import edge_layout
from circuits.graph import Node
from circuits.patching import ablated_logits, edge_run, path_patch
from data.planted import PLANTED, build_planted, load_ground_truth
from data.tasks import make_task
from tests.test_circuits import hook_count
from workbench.errors import WorkbenchError
from workbench.model import load_model

TL_KINDS = {"embed": "embed", "attn_head_out": "head", "mlp_out": "mlp", "q_input": "head", "k_input": "head",
            "v_input": "head", "mlp_in": "mlp"}
CHANNEL = {"q_input": 0, "k_input": 1, "v_input": 2}


@pytest.fixture(scope="module")
def pair(tiny_model):
    return make_task("ioi", tiny_model.tokenizer, n=1, template=0, seed=5)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    directory = build_planted(PLANTED["planted-induction"], tmp_path_factory.mktemp("planted") / "planted-induction")
    return load_model(directory, device="cpu"), load_ground_truth(directory)


def ours(tl_node, n_layers: int) -> Node:
    if tl_node.kind == "logits":
        return Node("logits", n_layers, tl_node.position)
    layer = -1 if tl_node.layer is None else tl_node.layer
    return Node(TL_KINDS[tl_node.kind], layer, tl_node.position, -1 if tl_node.head is None else tl_node.head)


def test_edge_attribution_matches_transformer_lens(tiny_model, pair):
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    graph = attribute_edges(tiny_model, pair, per_position=True)
    where = graph.index()
    tl = attribution_patch(tiny_model, pair.clean, pair.corrupt, lambda lg: pair.metric(lg).sum(),
                           config=EdgeAttributionConfig(granularity="edge"))
    n = tiny_model.cfg.n_layers
    for (writer, reader), expected in tl.edge_scores.items():
        t, s = where[ours(reader, n)], where[ours(writer, n)]
        channel = CHANNEL.get(reader.kind)
        value = graph.channels[channel, t, s] if channel is not None else graph.adjacency[t, s]
        assert float(value) == pytest.approx(expected, abs=1e-6, rel=1e-4)
    # a writer's outgoing edges sum to its node attribution (the logits edge carries the direct path)
    nodes = dict(zip(*[attribute(tiny_model, pair, "attribution", families=("embed", "head", "mlp")).nodes,
                       attribute(tiny_model, pair, "attribution", families=("embed", "head", "mlp")).scores.tolist()]))
    for node, score in nodes.items():
        assert float(graph.scores[where[node]]) == pytest.approx(score, abs=1e-5, rel=1e-4)
    assert hook_count(tiny_model) == 0
    assert not tiny_model.cfg.use_split_qkv_input and not tiny_model.cfg.use_attn_result


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_path_patching_matches_transformer_lens_direct_paths(tiny_model, pair, component):
    """Head -> later head edges, patched at every position: TL's exact `get_act_patch_direct_path_all_sources`."""
    from transformer_lens.patching import get_act_patch_direct_path_all_sources

    graph = path_patch(tiny_model, pair, per_position=False)
    where = graph.index()
    _, clean_cache = tiny_model.run_with_cache(pair.clean)
    _, corrupt_cache = tiny_model.run_with_cache(pair.corrupt)
    metric = lambda logits: pair.metric(logits).mean()  # noqa: E731
    tl = get_act_patch_direct_path_all_sources(tiny_model, pair.corrupt, clean_cache, corrupt_cache, metric,
                                               component=component, verbose=False)
    corrupt = graph.info.corrupt_metric
    c = "qkv".index(component)
    L, H = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    for sl in range(L):
        for sh in range(H):
            for dl in range(sl + 1, L):
                for dh in range(H):
                    value = graph.channels[c, where[Node("head", dl, -1, dh)], where[Node("head", sl, -1, sh)]]
                    assert float(value) == pytest.approx(float(tl[sl, sh, dl, dh]) - corrupt, abs=1e-5)
    assert hook_count(tiny_model) == 0


def test_path_patching_agrees_with_edge_attribution_to_first_order(tiny_model, tokenizer):
    prompts = make_task("ioi", tokenizer, n=6, template=0)
    exact = path_patch(tiny_model, prompts)
    approx = attribute_edges(tiny_model, prompts)
    mask = exact.adjacency != 0
    corr = torch.corrcoef(torch.stack([exact.adjacency[mask], approx.adjacency[mask]]))[0, 1]
    assert corr > 0.9


def test_acdc_recovers_the_planted_circuit_and_its_ablation_is_real(planted):
    model, truth = planted
    prompts = make_task("induction", model.tokenizer, n=6, seed=1)
    result = acdc(model, prompts, threshold=0.05)
    kept = {(result.graph.nodes[s].component, result.graph.nodes[t].component)
            for t, s in result.graph.edge_mask.nonzero().tolist()}
    assert kept <= set(truth.edges) and (truth.edges[-1] in kept)  # the induction head -> logits edge at least
    assert {c for pair_ in kept for c in pair_} >= {"L0H2", "L1H1", "logits"}
    assert result.recovered > 0.9 and result.kl < 0.05
    # verification: the reported metric is a fresh forward with every removed edge ablated
    run = edge_run(model, prompts.to("cpu"))
    fresh = prompts.metric(ablated_logits(model, prompts, run, [result.removed])[0]).mean()
    assert float(fresh) == pytest.approx(result.metric, abs=1e-4)
    assert result.forwards == len(run.layout.upstream.nonzero()) + 2


def test_edge_ablation_matches_transformer_lens_faithfulness(planted):
    """Our edge ablation (ACDC's) equals TL 4.3's `faithfulness` with corrupt replacements, edge set expanded per position."""
    from transformer_lens.tools.analysis import FaithfulnessConfig, Node as TLNode, faithfulness

    model, _ = planted
    prompts = make_task("induction", model.tokenizer, n=1, seed=2)
    layout = edge_layout(model)
    run = edge_run(model, prompts)
    keep = [(r, w) for r, w in layout.upstream.nonzero().tolist() if (r + w) % 3 == 0]
    removed = [(r, w) for r, w in layout.upstream.nonzero().tolist() if (r, w) not in set(keep)]
    ours_metric = float(prompts.metric(ablated_logits(model, prompts, run, [removed])[0]).mean())
    n = model.cfg.n_layers

    def tl(node: Node, channel: int, pos: int, reader: bool):
        if node.kind == "embed":
            return TLNode("embed", pos)
        if node.kind == "logits":
            return TLNode("logits", pos, layer=n - 1)
        if node.kind == "head":
            return TLNode(("q_input", "k_input", "v_input")[channel] if reader else "attn_head_out", pos, node.layer, node.head)
        return TLNode("mlp_in" if reader else "mlp_out", pos, node.layer)

    circuit = [(tl(layout.writers[w], -1, p, False), tl(*layout.readers[r], p, True))
               for r, w in keep for p in range(prompts.clean.shape[1])]
    result = faithfulness(model, prompts.clean, prompts.corrupt, lambda lg: prompts.metric(lg).sum(), circuit,
                          FaithfulnessConfig(ablation="corrupt"))
    ours_recovered = (ours_metric - result.corrupt_metric) / (result.full_metric - result.corrupt_metric)
    assert ours_recovered == pytest.approx(result.recovered, abs=1e-4)


def test_edge_methods_refuse_gqa_in_one_line(model_dirs, tokenizer):
    model = load_model(model_dirs["llama"], device="cpu")
    prompts = make_task("ioi", tokenizer, n=2, template=0)
    with pytest.raises(WorkbenchError, match="GQA") as e:
        attribute_edges(model, prompts)
    assert "\n" not in str(e.value)
    assert not model.cfg.use_split_qkv_input
