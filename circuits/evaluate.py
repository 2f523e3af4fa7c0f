"""How good is a circuit: faithfulness/completeness curves, agreement with exact patching, planted ground truth.

Faithfulness and completeness (Wang et al. 2022; Marks et al. 2024), as curves
over circuit size k (the k nodes of largest |score|). With m(M) the metric of
the full model, m(empty) the metric with every scored node ablated, m(C) the
metric with every node *outside* C ablated, and m(M \\ C) with C ablated:

    faithfulness(k) = (m(C_k) - m(empty)) / (m(M) - m(empty))     1 = the circuit alone does it all
    completeness(k) = (m(M) - m(M \\ C_k)) / (m(M) - m(empty))     1 = removing the circuit removes it all

The model runs on the clean prompts; an ablated node takes its `mean` value
over the clean prompts (per position) or its value on the paired corrupt prompt
(`resample`). Embeddings are never ablated (they are the input).

Agreement (the RelP paper's table): Pearson correlation between each gradient
method's node scores and exact activation patching, per node family (residual
stream, attention output, MLP output, heads), every layer and position, with
each method's runtime.

Ground truth: on a planted model, every head and MLP is a candidate; a
method's component score is |sum of its node scores over positions| (feature
graphs bring their own: the summed |scores| of the features and error terms of
each component, hook_z features split exactly per head). ROC AUC is the
Mann-Whitney statistic of the circuit's components against the rest;
precision and recall are those of the circuit the method selects: its own mask
for ACDC and codes, else the components with importance >= `relative_threshold`
x the largest. Edges (`score_edges`) are scored the same way, per component pair.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
from torch import Tensor

from circuits.attribution import RelPRules, attribute
from circuits.components import AGREEMENT_FAMILIES, node_site
from circuits.graph import Graph, Node
from circuits.patching import Patch, activation_patch, cache_sites, patch_groups
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.planted import GroundTruth
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge

ABLATIONS = ("mean", "resample")
ABLATABLE = ("head", "mlp", "attn")
MASK_METHODS = ("acdc", "codes")  # methods whose own circuit (node_mask) is scored for precision/recall


class CurvePoint(NamedTuple):
    size: int
    faithfulness: float
    completeness: float
    metric_circuit: float  # m(C): everything outside the circuit ablated
    metric_complement: float  # m(M \ C): the circuit ablated


class AgreementRow(NamedTuple):
    method: str
    family: str
    pearson: float
    n_nodes: int
    runtime_s: float  # the method's whole pass (every family at once)


class GroundTruthScore(NamedTuple):
    model: str
    method: str
    roc_auc: float
    precision: float
    recall: float
    selected: tuple[str, ...]  # the components the method's circuit holds
    runtime_s: float


# ---------------------------------------------------------------------------- curves
def faithfulness_curve(model: "TransformerBridge", prompts: "TaskPrompts", graph: Graph, ablation: str = "mean",
                       sizes: Sequence[int] | None = None) -> list[CurvePoint]:
    """Faithfulness and completeness of the top-k nodes of a component graph, for each k in `sizes`."""
    if ablation not in ABLATIONS:
        raise WorkbenchError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
    prompts = prompts.to(model.cfg.device)
    ranked = [graph.nodes[i] for i in graph.scores.abs().argsort(descending=True).tolist()
              if graph.nodes[i].kind in ABLATABLE]
    if not ranked:
        raise WorkbenchError(f"graph {graph.circuit_id} has no head, MLP or attention nodes to ablate")
    sizes = sorted(set(sizes)) if sizes is not None else _default_sizes(len(ranked))
    values = _ablation_values(model, prompts, ranked, ablation)
    patch = {n: Patch(node_site(model, n), n.pos, n.head) for n in ranked}
    groups = [[], [patch[n] for n in ranked]]
    for k in sizes:
        groups += [[patch[n] for n in ranked[k:]], [patch[n] for n in ranked[:k]]]
    metrics = patch_groups(model, prompts.clean, groups, values, prompts).mean(1).tolist()
    full, empty = metrics[0], metrics[1]
    gap = full - empty
    return [CurvePoint(k, (metrics[2 + 2 * i] - empty) / gap, (full - metrics[3 + 2 * i]) / gap,
                       metrics[2 + 2 * i], metrics[3 + 2 * i]) for i, k in enumerate(sizes)]


def _default_sizes(n: int) -> list[int]:
    sizes = {0, n} | {k for k in (1, 2, 3, 5, 8, 12, 20, 30, 50, 80, 120, 200, 300, 500) if k < n}
    return sorted(sizes)


def _ablation_values(model, prompts: "TaskPrompts", nodes: list[Node], ablation: str) -> dict[str, Tensor]:
    sites = list(dict.fromkeys(node_site(model, n) for n in nodes))
    if ablation == "resample":
        return cache_sites(model, prompts.corrupt, sites)[0]
    clean, _ = cache_sites(model, prompts.clean, sites)
    return {s: v.mean(0, keepdim=True) for s, v in clean.items()}


# ---------------------------------------------------------------------------- agreement
def agreement_table(model: "TransformerBridge", prompts: "TaskPrompts", methods: Sequence[str] = ("attribution", "ig", "relp",
                    "relp_detach"), families=AGREEMENT_FAMILIES, steps: int = 5,
                    reference: Graph | None = None) -> tuple[list[AgreementRow], Graph]:
    """Pearson agreement of each method with exact activation patching, per family (every layer and position).

    `relp_detach` is RelP with attention patterns detached too. Returns the rows
    and the activation-patching graph (reuse it through `reference`).
    """
    if reference is None:
        reference = activation_patch(model, prompts, families=families, per_position=True)
    rows = [AgreementRow("activation", f, 1.0, _family_size(reference, f), reference.info.runtime_s) for f in families]
    for method in methods:
        kind, rules = ("relp", RelPRules(detach_pattern=True)) if method == "relp_detach" else (method, None)
        graph = attribute(model, prompts, kind, families=families, per_position=True, steps=steps, rules=rules)
        for family in families:
            rows.append(AgreementRow(method, family, pearson(_family_scores(graph, family), _family_scores(reference, family)),
                                     _family_size(reference, family), graph.info.runtime_s))
    return rows, reference


def pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = a.norm() * b.norm()
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def _family_scores(graph: Graph, family: str) -> Tensor:
    return torch.tensor([s for n, s in zip(graph.nodes, graph.scores.tolist()) if n.kind == family])


def _family_size(graph: Graph, family: str) -> int:
    return sum(1 for n in graph.nodes if n.kind == family)


# ---------------------------------------------------------------------------- ground truth
def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        raise WorkbenchError("ROC AUC needs at least one positive and one negative component")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def component_importance(graph: Graph) -> dict[str, float]:
    """|score| per head/MLP component (`L1H2`, `MLP0`), summed over positions before the absolute value.

    (The sum over positions is the first-order estimate of patching every position at once.)
    Feature graphs carry their own per-component importance (`FeatureCircuit.component_scores`).
    """
    signed: dict[str, float] = {}
    for node, score in zip(graph.nodes, graph.scores.tolist()):
        if node.kind in ("head", "mlp"):
            signed[node.component] = signed.get(node.component, 0.0) + score
    return {k: abs(v) for k, v in signed.items()}


def score_ground_truth(graph: Graph, truth: "GroundTruth", relative_threshold: float = 0.1,
                       importance: dict[str, float] | None = None) -> GroundTruthScore:
    """ROC AUC and precision/recall of a graph's components against a planted circuit."""
    importance = importance if importance is not None else component_importance(graph)
    candidates = [f"L{l}H{h}" for l in range(truth.n_layers) for h in range(truth.n_heads)] + [f"MLP{l}" for l in range(truth.n_layers)]
    positives = truth.components()
    scores = [importance.get(c, 0.0) for c in candidates]
    auc = roc_auc(scores, [c in positives for c in candidates])
    if graph.node_mask is not None and graph.info.method in MASK_METHODS:
        selected = {n.component for n in graph.circuit_nodes() if n.kind in ("head", "mlp")}
    else:
        top = max(scores) if scores else 0.0
        selected = {c for c, s in zip(candidates, scores) if top > 0 and s >= relative_threshold * top}
    hits = len(selected & positives)
    precision = hits / len(selected) if selected else 0.0
    return GroundTruthScore(truth.model, graph.info.method, auc, precision, hits / len(positives),
                            tuple(sorted(selected)), graph.info.runtime_s)


def score_edges(graph: Graph, truth: "GroundTruth", relative_threshold: float = 0.1) -> GroundTruthScore:
    """ROC AUC and precision/recall of an edge graph's component edges (summed over positions and q/k/v)."""
    collapsed = graph.collapse_positions() if any(n.pos >= 0 for n in graph.nodes) else graph
    positives = set(truth.edges)
    pairs = [(collapsed.nodes[s].component, collapsed.nodes[t].component, abs(float(collapsed.adjacency[t, s])))
             for t, s in (collapsed.adjacency != 0).nonzero().tolist()]
    pairs += [(a, b, 0.0) for a, b in positives - {(a, b) for a, b, _ in pairs}]  # an edge never scored ranks last
    scores, labels = [w for _, _, w in pairs], [(a, b) in positives for a, b, _ in pairs]
    auc = roc_auc(scores, labels)
    if collapsed.edge_mask is not None and graph.info.method == "acdc":
        selected = {(collapsed.nodes[s].component, collapsed.nodes[t].component) for t, s in collapsed.edge_mask.nonzero().tolist()}
    else:
        top = max(scores)
        selected = {(a, b) for a, b, w in pairs if top > 0 and w >= relative_threshold * top}
    hits = len(selected & positives)
    return GroundTruthScore(truth.model, graph.info.method + "-edges", auc, hits / len(selected) if selected else 0.0,
                            hits / len(positives), tuple(sorted(f"{a}->{b}" for a, b in selected)), graph.info.runtime_s)


def timed(fn, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start
