"""Exports: the circuit-tracer / Neuronpedia graph JSON, and Graphviz DOT.

The JSON layout is the one circuit-tracer's `create_graph_files` writes and its
viewer (and Neuronpedia's) reads: one `<slug>.json` per graph,

    {"metadata": {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
                  "schema_version": 1, "info": {...}, "pruning_settings": {...}},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}, ...],
     "links": [{"source", "target", "weight"}, ...]}

plus a `graph-metadata.json` index `{"graphs": [metadata, ...]}` in the same
directory. Node ids follow circuit-tracer: `"{layer}_{index}_{ctx}"` for
features, `"{layer}_{-1-k}_{ctx}"` for error nodes, `"E_{token}_{ctx}"` for
embeddings, `"{n_layers+1}_{token}_{ctx}"` for logits; the viewer knows the
feature types "cross layer transcoder", "mlp reconstruction error", "embedding"
and "logit", so heads and MLPs are written as feature nodes (index = head, or
n_heads for the MLP, n_heads+1 for the attention output) and their names go in
`clerp`. A node summed over positions sits at the last position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from circuits.graph import Graph, Node
from workbench.errors import WorkbenchError

SCHEMA = {
    "metadata": {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str},
    "qParams": {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str},
    "node": {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "token_prob": float,
             "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "jsNodeId": str, "clerp": str},
    "link": {"source": str, "target": str, "weight": float},
}
FEATURE_TYPES = ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit")


def to_neuronpedia(graph: Graph, slug: str | None = None, only_circuit: bool = True) -> dict[str, Any]:
    """The graph in circuit-tracer's JSON layout (the circuit's nodes and edges, or everything)."""
    keep = _kept_nodes(graph, only_circuit)
    n_pos = max(len(graph.info.prompt_tokens), 1 + max((n.pos for n in graph.nodes), default=0))
    ids = _node_ids(graph, n_pos)
    nodes = [_node_json(graph, i, ids[i], n_pos) for i in keep]
    kept = set(keep)
    edges = graph.edge_mask if (only_circuit and graph.edge_mask is not None) else graph.adjacency != 0
    targets, sources = edges.nonzero(as_tuple=True)
    links = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in kept and t in kept]
    meta = {"slug": slug or graph.circuit_id, "scan": graph.info.model, "transcoder_list": _dictionaries(graph),
            "prompt_tokens": list(graph.info.prompt_tokens), "prompt": graph.info.prompt,
            "node_threshold": graph.info.params.get("node_threshold"), "schema_version": 1,
            "info": {"generator": {"name": "workbench circuits", "method": graph.info.method},
                     "task": graph.info.task, "metric": graph.info.metric, "n_prompts": graph.info.n_prompts},
            "pruning_settings": {k: graph.info.params[k] for k in ("node_threshold", "edge_threshold") if k in graph.info.params}}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": meta, "qParams": qparams, "nodes": nodes, "links": links}


def write_neuronpedia(graph: Graph, directory: str | Path, slug: str | None = None, only_circuit: bool = True) -> Path:
    """Write `<slug>.json` and update `graph-metadata.json` in `directory` (the viewer's layout)."""
    from workbench.workspace import atomic_write_text

    data = to_neuronpedia(graph, slug, only_circuit)
    validate_neuronpedia(data)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{data['metadata']['slug']}.json"
    atomic_write_text(path, json.dumps(data, indent=1))
    index_path = directory / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != data["metadata"]["slug"]] + [data["metadata"]]
    atomic_write_text(index_path, json.dumps(index, indent=1))
    return path


def validate_neuronpedia(data: dict[str, Any]) -> None:
    """Check a graph JSON against circuit-tracer's layout (its pydantic models' fields and types); one line per problem."""
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in data:
            raise WorkbenchError(f"graph JSON lacks {key!r}")
    _check_fields(data["metadata"], SCHEMA["metadata"], "metadata")
    _check_fields(data["qParams"], SCHEMA["qParams"], "qParams")
    seen = set()
    for node in data["nodes"]:
        _check_fields(node, SCHEMA["node"], f"node {node.get('node_id')}")
        if node["feature_type"] not in FEATURE_TYPES:
            raise WorkbenchError(f"node {node['node_id']}: unknown feature_type {node['feature_type']!r}")
        if node["node_id"] in seen:
            raise WorkbenchError(f"node id {node['node_id']} is not unique")
        seen.add(node["node_id"])
    if len({n["jsNodeId"] for n in data["nodes"]}) != len(data["nodes"]):
        raise WorkbenchError("jsNodeId values are not unique")
    for link in data["links"]:
        _check_fields(link, SCHEMA["link"], "link")
        if link["source"] not in seen or link["target"] not in seen:
            raise WorkbenchError(f"link {link['source']} -> {link['target']} names a node the graph does not hold")
        if not math.isfinite(link["weight"]):
            raise WorkbenchError(f"link {link['source']} -> {link['target']} has weight {link['weight']}")


def to_dot(graph: Graph, only_circuit: bool = True, max_edges: int = 400) -> str:
    """Graphviz DOT: one rank per layer, edges coloured by sign (blue +, red -), widths by |weight|."""
    keep = _kept_nodes(graph, only_circuit)
    kept = set(keep)
    lines = ["digraph circuit {", '  rankdir=BT; node [shape=box, style="rounded,filled", fontname="Helvetica"];',
             f'  label="{_escape(graph.info.model)} / {_escape(graph.info.task)} / {graph.info.method}"; labelloc=t;']
    by_layer: dict[int, list[int]] = {}
    for i in keep:
        by_layer.setdefault(graph.nodes[i].layer, []).append(i)
    top = float(graph.scores.abs().max()) or 1.0
    for layer in sorted(by_layer):
        lines.append("  { rank=same; " + " ".join(f"n{i};" for i in by_layer[layer]) + " }")
        for i in by_layer[layer]:
            score = float(graph.scores[i])
            shade = min(1.0, abs(score) / top)
            color = _rgb(0.2, 0.4, 1.0, shade) if score >= 0 else _rgb(1.0, 0.3, 0.2, shade)
            lines.append(f'  n{i} [label="{_escape(graph.nodes[i].id)}\\n{score:.3g}", fillcolor="{color}"];')
    edges = graph.edge_mask if (only_circuit and graph.edge_mask is not None) else graph.adjacency != 0
    pairs = [(t, s) for t, s in edges.nonzero().tolist() if s in kept and t in kept]
    pairs = sorted(pairs, key=lambda ts: -abs(float(graph.adjacency[ts[0], ts[1]])))[:max_edges]
    heaviest = max((abs(float(graph.adjacency[t, s])) for t, s in pairs), default=1.0) or 1.0
    for t, s in pairs:
        weight = float(graph.adjacency[t, s])
        width = 0.5 + 4.0 * abs(weight) / heaviest
        label = _channel_label(graph, t, s, only_circuit)
        lines.append(f'  n{s} -> n{t} [color="{"#3366ff" if weight >= 0 else "#ff4422"}", penwidth={width:.2f}, '
                     f'tooltip="{weight:.4g}"{f", label={chr(34)}{label}{chr(34)}" if label else ""}];')
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- helpers
def _kept_nodes(graph: Graph, only_circuit: bool) -> list[int]:
    if only_circuit and graph.node_mask is not None:
        keep = [i for i, m in enumerate(graph.node_mask.tolist()) if m or graph.nodes[i].kind in ("embed", "logits")]
    else:
        keep = list(range(len(graph)))
    if not keep:
        raise WorkbenchError(f"graph {graph.circuit_id} has no nodes to export")
    return keep


def _node_ids(graph: Graph, n_pos: int) -> list[str]:
    """circuit-tracer node ids: unique per (layer, index, position)."""
    slots: dict[tuple, int] = {}
    ids = []
    dictionaries = _dictionaries(graph)
    n_layers = max((n.layer for n in graph.nodes if n.kind == "logits"), default=max(n.layer for n in graph.nodes) + 1)
    for node in graph.nodes:
        ctx = node.pos if node.pos >= 0 else n_pos - 1
        if node.kind == "embed":
            ids.append(f"E_{max(node.feature, 0)}_{ctx}" if node.feature >= 0 else f"E_{ctx}_{ctx}")
        elif node.kind == "logits":
            ids.append(f"{n_layers + 1}_{max(node.feature, 0)}_{ctx}")
        elif node.kind == "error":
            ids.append(f"{node.layer}_{-1 - dictionaries.index(node.dictionary)}_{ctx}")
        else:
            key = (node.layer, node.kind, node.head, node.feature, node.dictionary)
            slots.setdefault(key, len([k for k in slots if k[0] == node.layer]))
            ids.append(f"{node.layer}_{slots[key]}_{ctx}")
    return ids


def _node_json(graph: Graph, i: int, node_id: str, n_pos: int) -> dict[str, Any]:
    node: Node = graph.nodes[i]
    layer_part, index_part, ctx_part = node_id.split("_")
    feature_type = {"embed": "embedding", "logits": "logit", "error": "mlp reconstruction error"}.get(node.kind,
                                                                                                   "cross layer transcoder")
    influence = float(graph.influence[i]) if graph.influence is not None else None
    activation = float(graph.activations[i]) if graph.activations is not None else None
    label = node.component
    if node.kind == "logits":
        label = f"Output: {graph.info.metric} (mean {graph.info.clean_metric:.3g} clean, {graph.info.corrupt_metric:.3g} corrupt)"
    return {"node_id": node_id, "feature": int(index_part), "layer": layer_part, "ctx_idx": int(ctx_part),
            "feature_type": feature_type, "token_prob": 0.0, "is_target_logit": node.kind == "logits", "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": f"{layer_part}_{index_part}-{ctx_part}",
            "clerp": f"{label} (score {float(graph.scores[i]):.4g})", "influence": influence, "activation": activation}


def _channel_label(graph: Graph, t: int, s: int, only_circuit: bool) -> str:
    """Which of q/k/v an edge into a head uses (the circuit's channels, or the nonzero ones)."""
    if graph.channels is None or graph.nodes[t].kind != "head":
        return ""
    if only_circuit and graph.channel_mask is not None:
        used = graph.channel_mask[:, t, s]
    else:
        used = graph.channels[:, t, s].abs() > 1e-3 * graph.channels[:, t, s].abs().max().clamp_min(1e-30)
    return ",".join(c for c, u in zip("qkv", used.tolist()) if u)


def _dictionaries(graph: Graph) -> list[str]:
    return sorted({n.dictionary for n in graph.nodes if n.dictionary})


def _check_fields(obj: dict, fields: dict[str, type], where: str) -> None:
    for name, kind in fields.items():
        if name not in obj:
            raise WorkbenchError(f"graph JSON {where} lacks {name!r}")
        value = obj[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else (
            isinstance(value, kind) and not (kind is int and isinstance(value, bool)))
        if not ok:
            raise WorkbenchError(f"graph JSON {where}: {name} should be {kind.__name__}, got {type(value).__name__}")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _rgb(r: float, g: float, b: float, shade: float) -> str:
    mix = [int(255 * (1 - shade * (1 - c))) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)
