"""One graph type for every circuit method: a dense node list and an adjacency matrix, rows = targets.

Every method (activation and path patching, attribution patching, EAP-IG,
RelP, ACDC, transcoder and feature circuits, discrete codes) returns a `Graph`:

- `nodes[i]` is a `Node`: its `kind` is one of `KINDS` (embeddings, attention
  heads, attention outputs, MLPs, residual positions, dictionary features,
  dictionary error terms, logits), with a layer, a position (-1 = summed over
  every position), a head, a feature index and the dictionary it belongs to.
- `scores[i]` is the node's effect on the task metric, in the one sign
  convention of this package (denoising, see below).
- `adjacency[t, s]` is the weight of the edge from source `s` to target `t`
  (rows are targets, as in circuit-tracer): the effect of moving `s` from its
  corrupt toward its clean value on `t`'s input (or on the metric through `t`).
  Edges into attention heads may carry their query/key/value parts in
  `channels[c, t, s]` (c = 0, 1, 2 for q, k, v); `adjacency` is their sum.
- `node_mask` / `edge_mask` / `channel_mask` mark the circuit the method kept.

Sign convention (denoising, TransformerLens 4.3's): every score moves the
model from the corrupt run toward the clean run. An exact score is
`metric(corrupt run with the node patched to its clean value) - metric(corrupt)`;
a gradient score is `(a_clean - a_corrupt) . d metric / d a`, the gradient taken
on the corrupt run. Positive = the node carries the behaviour.

Storage: `save_graph` publishes one DuckDB file per circuit (`db/circuit-<id>.duckdb`)
holding the tables `circuits`, `circuit_nodes`, `circuit_edges` (and, when the
circuit was evaluated, `circuit_curves`); `load_graph` reads a circuit back
through the workspace's read-only union view. Exports: `circuits.export`.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable

import duckdb
import torch
from torch import Tensor

from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from workbench.workspace import Workspace

KINDS = ("embed", "head", "attn", "mlp", "resid", "feature", "error", "logits")
CHANNELS = ("q", "k", "v")


@dataclass(frozen=True, order=True)
class Node:
    """One node: a component (or dictionary feature) at a position (-1 = every position at once)."""

    kind: str
    layer: int = -1  # block index; -1 for embeddings; n_layers for logits and the final residual
    pos: int = -1
    head: int = -1
    feature: int = -1  # dictionary feature index, or the vocabulary id of a logit node
    dictionary: str = ""  # dictionary name, for feature and error nodes

    @property
    def component(self) -> str:
        """The node's name without its position: `embed`, `L1H2`, `MLP0`, `ATTN1`, `RESID2`, `logits`, `sae:F12`."""
        if self.kind == "head":
            return f"L{self.layer}H{self.head}"
        if self.kind in ("mlp", "attn", "resid"):
            return f"{self.kind.upper()}{self.layer}"
        if self.kind == "feature":
            return f"{self.dictionary}:F{self.feature}"
        if self.kind == "error":
            return f"{self.dictionary}:err"
        if self.kind == "logits" and self.feature >= 0:
            return f"logit:{self.feature}"
        return self.kind

    @property
    def id(self) -> str:
        """Unique within a graph: the component name, then `@pos` when the node is one position."""
        return self.component if self.pos < 0 else f"{self.component}@{self.pos}"


@dataclass(frozen=True)
class GraphInfo:
    """What a graph was computed on and how."""

    model: str
    task: str
    method: str
    metric: str  # the task metric kind (logit_diff, prob_diff, ...)
    granularity: str  # "component", "position", "edge", "feature" or "code"
    n_prompts: int
    clean_metric: float  # mean task metric on the clean prompts
    corrupt_metric: float
    runtime_s: float
    prompt: str = ""  # the first clean prompt, for display and export
    prompt_tokens: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)  # method settings (steps, threshold, rules, ...)
    circuit_id: str = ""
    created: float = 0.0


@dataclass
class Graph:
    """Nodes, their metric scores, and weighted edges (rows = targets); see the module docstring."""

    nodes: list[Node]
    scores: Tensor  # [n_nodes]
    adjacency: Tensor  # [n_nodes (target), n_nodes (source)]
    info: GraphInfo
    channels: Tensor | None = None  # [3, n_nodes, n_nodes]: q/k/v parts of edges into heads
    node_mask: Tensor | None = None  # [n_nodes] bool: the circuit's nodes
    edge_mask: Tensor | None = None  # [n_nodes, n_nodes] bool: the circuit's edges
    channel_mask: Tensor | None = None  # [3, n_nodes, n_nodes] bool: the circuit's q/k/v edges into heads
    activations: Tensor | None = None  # [n_nodes]: a feature node's activation (clean - corrupt), for display
    influence: Tensor | None = None  # [n_nodes]: cumulative influence on the metric (feature graphs)

    def __post_init__(self):
        n = len(self.nodes)
        if self.scores.shape != (n,) or self.adjacency.shape != (n, n):
            raise ValueError(f"graph of {n} nodes has scores {tuple(self.scores.shape)} and adjacency {tuple(self.adjacency.shape)}")
        if len(set(self.nodes)) != n:
            raise ValueError("graph nodes are not unique")
        if not self.info.circuit_id:
            self.info = replace(self.info, circuit_id=new_circuit_id(self.info), created=self.info.created or time.time())

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def circuit_id(self) -> str:
        return self.info.circuit_id

    def index(self) -> dict[Node, int]:
        return {node: i for i, node in enumerate(self.nodes)}

    def circuit_nodes(self) -> list[Node]:
        """The nodes the method kept (every node when it kept no mask)."""
        if self.node_mask is None:
            return list(self.nodes)
        return [n for n, keep in zip(self.nodes, self.node_mask.tolist()) if keep]

    def component_scores(self, absolute: bool = False) -> dict[str, float]:
        """Scores summed per component over positions (`L1H2`, `MLP0`, ...); `absolute` sums |score| instead."""
        totals: dict[str, float] = {}
        values = self.scores.abs() if absolute else self.scores
        for node, value in zip(self.nodes, values.tolist()):
            totals[node.component] = totals.get(node.component, 0.0) + value
        return totals

    def top(self, k: int = 10) -> list[tuple[Node, float]]:
        """The k nodes with the largest |score|, largest first."""
        order = self.scores.abs().argsort(descending=True)[:k]
        return [(self.nodes[i], float(self.scores[i])) for i in order.tolist()]

    def collapse_positions(self) -> "Graph":
        """The same graph with every node summed over its positions (pos = -1): scores and edges add."""
        merged = sorted({replace(n, pos=-1) for n in self.nodes}, key=_node_order)
        where = {n: i for i, n in enumerate(merged)}
        to = torch.tensor([where[replace(n, pos=-1)] for n in self.nodes])
        m = len(merged)
        scores = torch.zeros(m).index_add_(0, to, self.scores.float())
        adjacency = _collapse_square(self.adjacency, to, m)
        channels = None if self.channels is None else torch.stack([_collapse_square(c, to, m) for c in self.channels])
        node_mask = None if self.node_mask is None else torch.zeros(m, dtype=torch.bool).index_fill_(0, to[self.node_mask], True)
        edge_mask = None if self.edge_mask is None else _collapse_square(self.edge_mask.float(), to, m) > 0
        info = replace(self.info, circuit_id="", granularity="component" if self.info.granularity == "position" else self.info.granularity)
        return Graph(merged, scores, adjacency, info, channels=channels, node_mask=node_mask, edge_mask=edge_mask)

    def to(self, device: str | torch.device) -> "Graph":
        tensors = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in vars(self).items()}
        return Graph(**tensors)


def new_circuit_id(info: GraphInfo) -> str:
    """`<model>-<task>-<method>-<8 hex>`: readable, unique, and a valid workspace name."""
    stem = "-".join(_slug(s) for s in (info.model.rstrip("/").split("/")[-1], info.task, info.method))
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def component_order(nodes: Iterable[Node]) -> list[Node]:
    """Nodes in topological order: embeddings, then per layer heads, attention, MLP, residual, features; logits last."""
    return sorted(nodes, key=_node_order)


# ---------------------------------------------------------------------------- storage
def save_graph(workspace: "Workspace", graph: Graph, curves: list[dict] | None = None) -> str:
    """Publish `graph` as `db/circuit-<id>.duckdb` (tables circuits, circuit_nodes, circuit_edges[, circuit_curves])."""
    import pyarrow as pa

    with workspace.write_db(f"circuit-{graph.circuit_id}") as con:
        for table, rows in (("circuits", _circuit_row(graph)), ("circuit_nodes", _node_rows(graph)),
                            ("circuit_edges", _edge_rows(graph))):
            arrow = pa.table(rows)
            con.register("staged", arrow)
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM staged")
            con.unregister("staged")
        if curves:
            con.register("staged", pa.Table.from_pylist([{"circuit_id": graph.circuit_id} | c for c in curves]))
            con.execute("CREATE TABLE circuit_curves AS SELECT * FROM staged")
            con.unregister("staged")
    return graph.circuit_id


def load_graph(workspace: "Workspace", circuit_id: str) -> Graph:
    """Read a published circuit back (a WorkbenchError naming the known ids when it is not there)."""
    try:
        with workspace.connect() as con:
            head = _rows(con, "SELECT * FROM circuits WHERE circuit_id = ?", circuit_id)
            if not head:
                known = [r[0] for r in con.execute("SELECT circuit_id FROM circuits ORDER BY created").fetchall()]
                raise WorkbenchError(f"no circuit {circuit_id!r} in {workspace.root}; known: {', '.join(known[-10:]) or 'none'}")
            nodes = _rows(con, "SELECT * FROM circuit_nodes WHERE circuit_id = ? ORDER BY node", circuit_id)
            edges = _rows(con, "SELECT * FROM circuit_edges WHERE circuit_id = ?", circuit_id)
    except duckdb.CatalogException as e:  # no circuits table yet: nothing published
        raise WorkbenchError(f"no circuit {circuit_id!r} in {workspace.root}: no circuits are published there") from e
    return _graph_from_rows(head[0], nodes, edges)


def _rows(con, query: str, circuit_id: str) -> list[dict]:
    cursor = con.execute(query, [circuit_id])
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]


def _circuit_row(graph: Graph) -> dict[str, list]:
    i = graph.info
    n_edges = int((graph.adjacency != 0).sum())
    return {"circuit_id": [i.circuit_id], "created": [i.created], "model": [i.model], "task": [i.task],
            "method": [i.method], "metric": [i.metric], "granularity": [i.granularity], "n_prompts": [i.n_prompts],
            "n_nodes": [len(graph)], "n_edges": [n_edges], "clean_metric": [i.clean_metric],
            "corrupt_metric": [i.corrupt_metric], "runtime_s": [i.runtime_s], "prompt": [i.prompt],
            "prompt_tokens": [json.dumps(list(i.prompt_tokens))], "params": [json.dumps(i.params, default=str)]}


def _node_rows(graph: Graph) -> dict[str, list]:
    n = len(graph)
    mask = graph.node_mask.tolist() if graph.node_mask is not None else [True] * n
    optional = {name: (t.tolist() if t is not None else [None] * n) for name, t in
                (("activation", graph.activations), ("influence", graph.influence))}
    return {"circuit_id": [graph.circuit_id] * n, "node": list(range(n)), "node_id": [x.id for x in graph.nodes],
            "component": [x.component for x in graph.nodes], "kind": [x.kind for x in graph.nodes],
            "layer": [x.layer for x in graph.nodes], "pos": [x.pos for x in graph.nodes],
            "head": [x.head for x in graph.nodes], "feature": [x.feature for x in graph.nodes],
            "dictionary": [x.dictionary for x in graph.nodes], "score": graph.scores.tolist(),
            "in_circuit": [bool(m) for m in mask]} | optional


def _edge_rows(graph: Graph) -> dict[str, list]:
    """One row per nonzero edge (or per circuit edge, even at weight 0)."""
    present = graph.adjacency != 0
    if graph.edge_mask is not None:
        present |= graph.edge_mask
    if graph.channels is not None:
        present |= (graph.channels != 0).any(0)
    target, source = present.nonzero(as_tuple=True)
    rows = {"circuit_id": [graph.circuit_id] * len(target), "source": source.tolist(), "target": target.tolist(),
            "source_id": [graph.nodes[s].id for s in source.tolist()],
            "target_id": [graph.nodes[t].id for t in target.tolist()],
            "weight": graph.adjacency[target, source].tolist(),
            "in_circuit": (graph.edge_mask[target, source] if graph.edge_mask is not None else torch.ones(len(target), dtype=torch.bool)).tolist()}
    for c, name in enumerate(CHANNELS):
        rows[f"weight_{name}"] = graph.channels[c][target, source].tolist() if graph.channels is not None else [None] * len(target)
        rows[f"in_circuit_{name}"] = (graph.channel_mask[c][target, source].tolist() if graph.channel_mask is not None
                                      else [None] * len(target))
    return rows


def _graph_from_rows(head: dict, nodes: list[dict], edges: list[dict]) -> Graph:
    n = len(nodes)
    node_list = [Node(r["kind"], r["layer"], r["pos"], r["head"], r["feature"], r["dictionary"]) for r in nodes]
    adjacency = torch.zeros(n, n)
    has_channels = any(e["weight_q"] is not None for e in edges)
    channels = torch.zeros(3, n, n) if has_channels else None
    channel_mask = torch.zeros(3, n, n, dtype=torch.bool) if any(e["in_circuit_q"] is not None for e in edges) else None
    edge_mask = torch.zeros(n, n, dtype=torch.bool)
    for e in edges:
        t, s = e["target"], e["source"]
        adjacency[t, s] = e["weight"]
        edge_mask[t, s] = bool(e["in_circuit"])
        for c, name in enumerate(CHANNELS):
            if channels is not None and e[f"weight_{name}"] is not None:
                channels[c, t, s] = e[f"weight_{name}"]
            if channel_mask is not None and e[f"in_circuit_{name}"] is not None:
                channel_mask[c, t, s] = bool(e[f"in_circuit_{name}"])
    info = GraphInfo(model=head["model"], task=head["task"], method=head["method"], metric=head["metric"],
                     granularity=head["granularity"], n_prompts=head["n_prompts"], clean_metric=head["clean_metric"],
                     corrupt_metric=head["corrupt_metric"], runtime_s=head["runtime_s"], prompt=head["prompt"],
                     prompt_tokens=tuple(json.loads(head["prompt_tokens"])), params=json.loads(head["params"]),
                     circuit_id=head["circuit_id"], created=head["created"])
    optional = {k: (torch.tensor([r[k] for r in nodes]) if nodes and nodes[0][k] is not None else None)
                for k in ("activation", "influence")}
    return Graph(node_list, torch.tensor([r["score"] for r in nodes], dtype=torch.float32), adjacency, info,
                 channels=channels, node_mask=torch.tensor([bool(r["in_circuit"]) for r in nodes]), edge_mask=edge_mask,
                 channel_mask=channel_mask, activations=optional["activation"], influence=optional["influence"])


# ---------------------------------------------------------------------------- helpers
_KIND_RANK = {"embed": 0, "resid": 1, "head": 2, "attn": 3, "feature": 4, "error": 5, "mlp": 6, "logits": 9}


def _node_order(node: Node) -> tuple:
    return (node.layer if node.kind != "embed" else -1, _KIND_RANK[node.kind], node.dictionary, node.head,
            node.feature, node.pos)


def _collapse_square(matrix: Tensor, to: Tensor, m: int) -> Tensor:
    """Sum rows and columns of a square matrix into `m` groups given by `to`."""
    rows = torch.zeros(m, matrix.shape[1], dtype=matrix.dtype).index_add_(0, to, matrix)
    return torch.zeros(m, m, dtype=matrix.dtype).index_add_(1, to, rows)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-") or "x"
