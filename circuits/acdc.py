"""ACDC: greedy edge pruning with a threshold, verified by real ablation (Conmy et al. 2023).

1. Start from the full residual-stream graph (embeddings, heads, MLPs, logits;
   edges into heads split by query/key/value input) on the clean prompts.
2. Visit readers from the logits backwards (reverse topological order); for each
   reader, visit its incoming edges, later writers first. Ablate the edge on top
   of everything already removed (its reader gets the writer's *corrupt* output,
   at every position) and measure the objective: the KL divergence of the final
   next-token distribution from the clean model's (`objective="kl"`, ACDC's
   default), or the mean absolute change of the task metric (`"metric"`).
3. If the objective rose by less than `threshold`, the edge goes for good;
   otherwise it stays. Each edge's recorded weight is that rise.
4. Drop kept edges whose writer no longer reaches the logits.
5. Verify: one fresh forward with every removed edge ablated at once gives the
   circuit's KL, task metric and recovered fraction
   `(m_circuit - m_corrupt) / (m_clean - m_corrupt)`; these are what is reported.

Cost: one forward per edge (about a few hundred on the small models here).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from circuits.attribution import edge_graph
from circuits.graph import Graph
from circuits.patching import EdgeRun, ablated_logits, edge_run, graph_info
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge

OBJECTIVES = ("kl", "metric")


class AcdcResult(NamedTuple):
    """The pruned circuit and its verification by real ablation."""

    graph: Graph  # edges weighted by the objective's rise when removed; masks = the circuit
    kept: list[tuple[int, int]]  # (reader, writer) layout indices of the circuit's edges
    removed: list[tuple[int, int]]
    kl: float  # verified: KL(clean || circuit) at the final position, mean over prompts
    metric: float  # verified: mean task metric of the circuit
    recovered: float  # (metric - corrupt) / (clean - corrupt)
    forwards: int


def acdc(model: "TransformerBridge", prompts: "TaskPrompts", threshold: float = 0.01,
         objective: str = "kl") -> AcdcResult:
    """Prune the residual-stream graph greedily; see the module docstring."""
    if objective not in OBJECTIVES:
        raise WorkbenchError(f"unknown ACDC objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if threshold < 0:
        raise WorkbenchError(f"the ACDC threshold must be >= 0, got {threshold}")
    start = time.perf_counter()
    prompts = prompts.to(model.cfg.device)
    run = edge_run(model, prompts)
    target = _Objective(model, prompts, run, objective)
    removed: list[tuple[int, int]] = []
    rise = torch.zeros(len(run.layout.readers), len(run.layout.writers))
    current = 0.0
    for r, w in _visit_order(run):
        value = target([removed + [(r, w)]])[0]
        rise[r, w] = value - current
        if value - current < threshold:
            removed.append((r, w))
            current = value
    every = [tuple(rw) for rw in run.layout.upstream.nonzero().tolist()]
    gone = set(removed)
    kept = _reaching_logits(run, [rw for rw in every if rw not in gone])
    stays = set(kept)
    removed = [rw for rw in every if rw not in stays]
    logits = ablated_logits(model, prompts, run, [removed])[0]
    verified = target.of_logits(logits)
    metric = float(prompts.metric(logits).mean())
    gap = float(run.clean_metric.mean() - run.corrupt_metric.mean())
    recovered = (metric - float(run.corrupt_metric.mean())) / gap if gap else float("nan")
    info = graph_info(model, prompts, "acdc", "edge", run.clean_metric, run.corrupt_metric, time.perf_counter() - start,
                      {"threshold": threshold, "objective": objective, "verified_kl": verified, "verified_metric": metric,
                       "recovered": recovered, "kept_edges": len(kept), "forwards": target.forwards + 1})
    graph = _acdc_graph(model, run, rise, kept, info)
    return AcdcResult(graph, kept, removed, verified if objective == "kl" else float(target.kl(logits)), metric,
                      recovered, target.forwards + 1)


class _Objective:
    """Evaluates the objective of ablated edge sets against the clean run (counting forwards)."""

    def __init__(self, model, prompts: "TaskPrompts", run: EdgeRun, kind: str):
        self.model, self.prompts, self.run, self.kind = model, prompts, run, kind
        self.clean_logprobs = ablated_logits(model, prompts, run, [[]])[0].log_softmax(-1)
        self.forwards = 1

    def __call__(self, removed_sets) -> list[float]:
        self.forwards += len(removed_sets)
        return [self.of_logits(lg) for lg in ablated_logits(self.model, self.prompts, self.run, removed_sets)]

    def of_logits(self, logits: Tensor) -> float:
        if self.kind == "kl":
            return self.kl(logits)
        return float((self.prompts.metric(logits) - self.run.clean_metric).abs().mean())

    def kl(self, logits: Tensor) -> float:
        logp = logits.log_softmax(-1)
        return float((self.clean_logprobs.exp() * (self.clean_logprobs - logp)).sum(-1).mean())


def _visit_order(run: EdgeRun) -> list[tuple[int, int]]:
    """Readers from the logits backwards; within a reader, later writers first."""
    order = []
    for r in reversed(range(len(run.layout.readers))):
        writers = run.layout.upstream[r].nonzero().flatten().tolist()
        order += [(r, w) for w in reversed(writers)]
    return order


def _reaching_logits(run: EdgeRun, kept: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Kept edges whose writer still has a kept path to the logits."""
    layout = run.layout
    logits = next(r for r, (node, _) in enumerate(layout.readers) if node.kind == "logits")
    alive_nodes = {layout.readers[logits][0]}
    changed = True
    while changed:
        changed = False
        for r, w in kept:
            if layout.readers[r][0] in alive_nodes and layout.writers[w] not in alive_nodes:
                alive_nodes.add(layout.writers[w])
                changed = True
    return [(r, w) for r, w in kept if layout.readers[r][0] in alive_nodes]


def _acdc_graph(model, run: EdgeRun, rise: Tensor, kept: list[tuple[int, int]], info) -> Graph:
    graph = edge_graph(model, run.layout, rise[None], info, per_position=False)
    kept_table = torch.zeros_like(rise)
    for r, w in kept:
        kept_table[r, w] = 1.0
    mask = edge_graph(model, run.layout, kept_table[None], info, per_position=False)
    graph.edge_mask = mask.adjacency > 0
    graph.channel_mask = mask.channels > 0
    graph.node_mask = graph.edge_mask.any(0) | graph.edge_mask.any(1)
    return graph
