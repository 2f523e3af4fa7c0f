"""Where each node lives in the model: hook sites, node layouts, and the residual-stream edge layout.

Node families and the site each reads (TransformerLens compatibility names):

| family | site | per token |
|---|---|---|
| `embed` | `hook_embed` | `[d_model]` |
| `resid` | `blocks.L.hook_resid_pre` (layer `n_layers`: the last `hook_resid_post`) | `[d_model]` |
| `attn`  | `blocks.L.hook_attn_out` | `[d_model]` |
| `mlp`   | `blocks.L.hook_mlp_out` | `[d_model]` |
| `head`  | `blocks.L.attn.hook_z` | `[n_heads, d_head]` |

Edges follow the residual stream at one position (as in TransformerLens 4.3's
edge attribution): a *writer* (embeddings, a head's own output
`attn.hook_result`, an MLP's output) feeds every later *reader* (a head's
query/key/value input `attn.hook_{q,k,v}_input`, an MLP's input
`hook_mlp_in`, and the logits, read at the last `hook_resid_post`). Those
per-head hook points only fire while the bridge's `use_attn_result`,
`use_split_qkv_input` and `use_hook_mlp_in` flags are on; `edge_hooks` turns
them on and restores the caller's flags afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from circuits.graph import Node
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge

FAMILIES = ("embed", "resid", "attn", "mlp", "head")
DEFAULT_FAMILIES = ("embed", "head", "mlp")
AGREEMENT_FAMILIES = ("resid", "attn", "mlp", "head")


def family_sites(model: "TransformerBridge", family: str) -> list[tuple[int, str]]:
    """(layer, site) of every component of a node family."""
    n = model.cfg.n_layers
    if family == "embed":
        return [(-1, "hook_embed")]
    if family == "resid":
        return [(layer, f"blocks.{layer}.hook_resid_pre") for layer in range(n)] + [(n, f"blocks.{n - 1}.hook_resid_post")]
    if family == "attn":
        return [(layer, f"blocks.{layer}.hook_attn_out") for layer in range(n)]
    if family == "mlp":
        return [(layer, f"blocks.{layer}.hook_mlp_out") for layer in range(n)]
    if family == "head":
        return [(layer, f"blocks.{layer}.attn.hook_z") for layer in range(n)]
    raise WorkbenchError(f"unknown node family {family!r}; choose from {', '.join(FAMILIES)}")


def node_site(model: "TransformerBridge", node: Node) -> str:
    """The hook site a component node reads."""
    return dict(family_sites(model, node.kind))[node.layer]


def check_families(families: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise WorkbenchError(f"unknown node famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown) or '(none)'}; "
                             f"choose from {', '.join(FAMILIES)}")
    return tuple(families)


def component_nodes(model: "TransformerBridge", families, n_pos: int, per_position: bool) -> list[Node]:
    """Every node of the families, layer by layer, at each position (or once, pos=-1)."""
    positions = range(n_pos) if per_position else [-1]
    nodes = []
    for family in check_families(families):
        for layer, _ in family_sites(model, family):
            heads = range(model.cfg.n_heads) if family == "head" else [-1]
            nodes += [Node(family, layer, pos, head) for head in heads for pos in positions]
    return nodes


def nodes_from_site_scores(model: "TransformerBridge", families, site_scores: dict[str, Tensor],
                           per_position: bool) -> tuple[list[Node], Tensor]:
    """Graph nodes and their scores from per-site tensors ([pos] or [pos, head], mean over prompts)."""
    nodes, values = [], []
    for family in check_families(families):
        for layer, site in family_sites(model, family):
            table = site_scores[site] if per_position else site_scores[site].sum(0, keepdim=True)
            table = table if table.ndim == 2 else table[:, None]  # [pos, head or 1]
            for head in range(table.shape[1]):
                for pos in range(table.shape[0]):
                    nodes.append(Node(family, layer, pos if per_position else -1, head if family == "head" else -1))
                    values.append(float(table[pos, head]))
    return nodes, torch.tensor(values)


def check_positions(prompts: "TaskPrompts", per_position: bool) -> None:
    """Per-position scores need every prompt to have the same length, so positions line up."""
    if per_position and not prompts.same_length:
        lengths = sorted(set((prompts.final_pos + 1).tolist()))
        raise WorkbenchError(
            f"per-position scores need prompts of one length, but these have {len(lengths)} lengths "
            f"({', '.join(map(str, lengths[:6]))} tokens); pin one template (--template N) or score whole components (--positions all)")


def one_length(prompts: "TaskPrompts", n: int | None = None) -> "TaskPrompts":
    """The first `n` prompts of the most common length, so that positions line up across the batch."""
    lengths = prompts.final_pos
    values, counts = lengths.unique(return_counts=True)
    mode = values[counts.argmax()]
    return prompts[(lengths == mode).nonzero().flatten()[:n]]


def site_names(model: "TransformerBridge", families) -> list[str]:
    return [site for family in check_families(families) for _, site in family_sites(model, family)]


# ---------------------------------------------------------------------------- edges
@dataclass(frozen=True)
class EdgeLayout:
    """Writers, readers and which writer can reach which reader (at one position).

    `readers[r]` is `(node, channel)`: channel 0/1/2 = q/k/v of a head node, -1 otherwise.
    `upstream[r, w]` is True when writer w precedes reader r in the residual stream.
    """

    writers: list[Node]
    readers: list[tuple[Node, int]]
    upstream: Tensor  # [n_readers, n_writers] bool

    def writer_sites(self) -> list[str]:
        return list(dict.fromkeys(writer_site(w) for w in self.writers))

    def reader_sites(self) -> list[str]:
        return list(dict.fromkeys(reader_site(node, ch, self.n_layers) for node, ch in self.readers))

    @property
    def n_layers(self) -> int:
        return max(node.layer for node, _ in self.readers)


def edge_layout(model: "TransformerBridge") -> EdgeLayout:
    """The residual-stream graph of embeddings, heads, MLPs and logits (parallel attn/MLP blocks respected)."""
    n, H = model.cfg.n_layers, model.cfg.n_heads
    parallel = bool(getattr(model.cfg, "parallel_attn_mlp", False))
    writers = [Node("embed")] + [node for layer in range(n) for node in
                                 [Node("head", layer, head=h) for h in range(H)] + [Node("mlp", layer)]]
    readers = [(Node("head", layer, head=h), c) for layer in range(n) for c in range(3) for h in range(H)]
    readers = sorted(readers + [(Node("mlp", layer), -1) for layer in range(n)] + [(Node("logits", n), -1)],
                     key=lambda r: (r[0].layer, r[0].kind == "mlp", r[1], r[0].head))
    upstream = torch.tensor([[_precedes(w, node, parallel) for w in writers] for node, _ in readers])
    return EdgeLayout(writers, readers, upstream)


def writer_site(node: Node) -> str:
    if node.kind == "embed":
        return "hook_embed"
    if node.kind == "head":
        return f"blocks.{node.layer}.attn.hook_result"
    return f"blocks.{node.layer}.hook_mlp_out"


def reader_site(node: Node, channel: int, n_layers: int) -> str:
    if node.kind == "head":
        return f"blocks.{node.layer}.attn.hook_{'qkv'[channel]}_input"
    if node.kind == "mlp":
        return f"blocks.{node.layer}.hook_mlp_in"
    return f"blocks.{n_layers - 1}.hook_resid_post"


def writer_slice(acts: dict[str, Tensor], node: Node) -> Tensor:
    """A writer's residual contribution [batch, pos, d_model] from a cache of writer sites."""
    x = acts[writer_site(node)]
    return x[:, :, node.head] if node.kind == "head" else x


def reader_slice(acts: dict[str, Tensor], reader: tuple[Node, int], n_layers: int) -> Tensor:
    node, channel = reader
    x = acts[reader_site(node, channel, n_layers)]
    return x[:, :, node.head] if node.kind == "head" else x


@contextlib.contextmanager
def edge_hooks(model: "TransformerBridge") -> Iterator[None]:
    """Turn on the per-head writer/reader hook points for the duration, restoring the caller's flags.

    `use_split_qkv_input` excludes `use_attn_in`, so that one is turned off first
    and back on last. GQA/MQA models (shared key/value heads) are refused: their
    key and value inputs are not per query head.
    """
    cfg = model.cfg
    kv = getattr(cfg, "n_key_value_heads", None)
    if kv is not None and kv != cfg.n_heads:
        raise WorkbenchError(f"edge-level methods need one key/value head per query head; {cfg.model_name} has "
                             f"{kv} key/value heads for {cfg.n_heads} query heads (GQA): use node-level methods")
    saved = (cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_hook_mlp_in, bool(getattr(cfg, "use_attn_in", False)))
    try:
        if saved[3]:
            model.set_use_attn_in(False)
        model.set_use_attn_result(True)
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_attn_result(saved[0])
        model.set_use_split_qkv_input(saved[1])
        model.set_use_hook_mlp_in(saved[2])
        if saved[3]:
            model.set_use_attn_in(True)


def check_additive(model: "TransformerBridge", layout: EdgeLayout, clean: dict[str, Tensor], corrupt: dict[str, Tensor],
                   final: tuple[Tensor, Tensor]) -> None:
    """Refuse models whose residual stream is not a plain sum of writers (post-norms, scaled residuals).

    The final residual's clean-minus-corrupt change must equal the summed writer
    changes; a post-attention norm or a scaled residual add breaks that.
    """
    total = sum(writer_slice(clean, w) - writer_slice(corrupt, w) for w in layout.writers)
    change = final[0] - final[1]
    error = float((total - change).norm() / change.norm().clamp_min(1e-12))
    if error > 1e-3:
        raise WorkbenchError(f"edge-level methods need a residual stream that is a plain sum of its writers; on "
                             f"{model.cfg.model_name} the summed writer changes miss the final residual's change by "
                             f"{error:.1%} (post-norms or scaled residuals): use node-level methods")


def _precedes(writer: Node, reader: Node, parallel: bool) -> bool:
    if writer.kind == "embed":
        return True
    if reader.kind == "logits":
        return True
    if writer.kind == "head":
        return writer.layer < reader.layer or (reader.kind == "mlp" and writer.layer == reader.layer and not parallel)
    return writer.layer < reader.layer  # an MLP feeds later layers only
