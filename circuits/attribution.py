"""Gradient estimates of activation patching: attribution patching, EAP-IG and RelP, for nodes and edges.

All three score a node with the same first-order formula (denoising; gradients
on the corrupt run; TransformerLens 4.3's convention):

    score(node) = mean over prompts of (a_clean - a_corrupt) . g,   g = d metric / d a

and an edge writer -> reader with the writer's change dotted into the gradient
at the reader's input. They differ only in `g`:

1. **attribution** (Nanda 2023; Syed et al. 2023): `g` is the plain gradient on
   the corrupt run. Cost: one clean forward, one corrupt forward, one backward.
2. **ig** (EAP-IG, Hanna et al. 2024): `g` is averaged over `steps` runs whose
   input embeddings are moved from corrupt toward clean,
   `e = e_corrupt + alpha * (e_clean - e_corrupt)` with `alpha = k / steps`,
   k = 0 .. steps-1 (a left Riemann sum, so `steps=1` *is* attribution
   patching). The steps run as one batch.
3. **relp** (RelP, "Faithful and Efficient Circuit Discovery via Relevance
   Patching"): `g` is taken through a backward pass that follows LRP rules,
   installed as forward hooks on named sites that leave forward values unchanged:
   - every LayerNorm/RMSNorm scale (`*.hook_scale`) is detached;
   - element-wise MLP activations use the identity rule: with x at `mlp.hook_pre`
     and y = phi(x) at `mlp.hook_post`, the output is replaced by
     `y.detach() + (z - z.detach())`, `z = xs * (y / xs).detach()`,
     `xs = x + eps * sign(x)`: the value is y, the gradient is phi(x)/x;
   - gated MLPs (`mlp.hook_pre_linear` present: y = phi(gate) * up) use the
     identity rule on phi and the half rule on the product, each factor
     receiving half: `z = (A * up.detach() + A.detach() * up) / 2`;
   - attention patterns (`attn.hook_pattern`) are detached only if
     `RelPRules.detach_pattern` (off by default: a detached pattern hides every
     query/key composition, e.g. an induction head's dependence on a
     previous-token head; measure both);
   - linear layers are unchanged. Cost: the same as attribution patching.

Gradients are captured by adding a zero leaf at each site (`x + 0`, the leaf
requiring grad), so `d metric / d leaf = d metric / d x` whatever shape the
bridge hands the hook, and nothing touches the parameters' `.grad`.
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import einops
import torch
import torch.nn.functional as F
from torch import Tensor

from circuits.components import (DEFAULT_FAMILIES, EdgeLayout, check_additive, check_positions, edge_hooks,
                                 edge_layout, nodes_from_site_scores, reader_slice, site_names, writer_slice)
from circuits.graph import Graph, GraphInfo, Node, component_order
from circuits.patching import cache_sites, graph_info, replica_metric
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge

METHODS = ("attribution", "ig", "relp")
EMBED = "hook_embed"


@dataclass(frozen=True)
class RelPRules:
    """Which LRP rules RelP's backward pass follows (LayerNorm scales are always detached)."""

    detach_pattern: bool = False  # also freeze attention patterns (hides QK composition; measure both)
    mlp_identity: bool = True  # identity rule on MLP activations (and the half rule on gates)
    eps: float = 1e-6  # the stabiliser in xs = x + eps * sign(x)


class GradientPass(NamedTuple):
    """Activations of both runs and the metric's gradient at each site (IG: averaged along the path)."""

    clean: dict[str, Tensor]  # site -> [batch, pos, ...]
    corrupt: dict[str, Tensor]
    grads: dict[str, Tensor]
    clean_metric: Tensor  # [batch]
    corrupt_metric: Tensor


def attribute(model: "TransformerBridge", prompts: "TaskPrompts", method: str = "attribution",
              families=DEFAULT_FAMILIES, per_position: bool = True, steps: int = 5,
              rules: RelPRules | None = None) -> Graph:
    """Score every node of `families` with `method` (attribution, ig or relp); one graph, no edges."""
    start = time.perf_counter()
    check_positions(prompts, per_position)
    prompts = prompts.to(model.cfg.device)
    sites = site_names(model, families)
    run = gradient_pass(model, prompts, sites, method, steps, rules)
    scores = {s: node_scores(run, s).mean(0).cpu() for s in sites}
    nodes, values = nodes_from_site_scores(model, families, scores, per_position)
    info = graph_info(model, prompts, method, "position" if per_position else "component", run.clean_metric,
                      run.corrupt_metric, time.perf_counter() - start, method_params(method, steps, rules) | {"families": list(families)})
    return Graph(nodes, values, torch.zeros(len(nodes), len(nodes)), info)


def node_scores(run: GradientPass, site: str) -> Tensor:
    """Per-prompt scores at a site: (clean - corrupt) . grad over the last axis -> [batch, pos(, head)]."""
    return ((run.clean[site] - run.corrupt[site]) * run.grads[site]).sum(-1)


def gradient_pass(model: "TransformerBridge", prompts: "TaskPrompts", sites: list[str], method: str = "attribution",
                  steps: int = 5, rules: RelPRules | None = None) -> GradientPass:
    """A clean forward, then one corrupt forward + backward (IG: `steps` of them, batched) capturing gradients."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown gradient method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "ig" and steps < 1:
        raise WorkbenchError(f"integrated gradients need at least one step, got steps={steps}")
    clean, clean_metric = cache_sites(model, prompts.clean, list(sites) + [EMBED], prompts.metric)
    alphas = torch.arange(steps, dtype=torch.float32) / steps if method == "ig" else torch.zeros(1)
    rules = (rules or RelPRules()) if method == "relp" else None
    grads, corrupt, corrupt_metric = _corrupt_gradients(model, prompts, sites, alphas, clean[EMBED], rules)
    return GradientPass({s: clean[s] for s in sites}, corrupt, grads, clean_metric, corrupt_metric)


def method_params(method: str, steps: int, rules: RelPRules | None) -> dict:
    if method == "ig":
        return {"steps": steps}
    if method == "relp":
        return {"rules": asdict(rules or RelPRules())}
    return {}


def _corrupt_gradients(model, prompts, sites: list[str], alphas: Tensor, clean_embed: Tensor,
                       rules: RelPRules | None) -> tuple[dict, dict, Tensor]:
    replicas, batch = len(alphas), len(prompts)
    alpha = alphas.to(model.cfg.device).repeat_interleave(batch).view(-1, 1, 1)  # [replica * batch, 1, 1]
    leaves: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def leaf_hook(site: str, scored: bool):
        def hook(x, hook):
            if site == EMBED and replicas > 1:  # IG: move the input embeddings toward clean
                x = x + alpha * (clean_embed.repeat(replicas, 1, 1) - x)
            if not scored:
                return x
            acts[site] = x.detach()[:batch].clone()  # replica 0 is the corrupt run itself (alpha = 0)
            leaves[site] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[site]
        return hook

    hooked = list(dict.fromkeys(list(sites) + ([EMBED] if replicas > 1 else [])))
    hooks = [(s, leaf_hook(s, s in sites)) for s in hooked] + (relp_hooks(model, rules) if rules else [])
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*edited hook_scale.*")
        logits = model(prompts.corrupt.repeat(replicas, 1))
        metric = replica_metric(prompts, logits, replicas)  # [replica, batch]
        grads = torch.autograd.grad(metric.sum(), [leaves[s] for s in sites])
    mean = {s: g.view(replicas, batch, *g.shape[1:]).mean(0) for s, g in zip(sites, grads)}
    return mean, acts, metric[0].detach()


# ---------------------------------------------------------------------------- RelP rules as hooks
def relp_hooks(model: "TransformerBridge", rules: RelPRules) -> list[tuple[str, Callable]]:
    """Forward hooks that keep every value and change the backward pass to RelP's LRP rules."""
    names = list(model.hook_dict)
    hooks = [(n, _detach) for n in names if re.search(r"(^|\.)hook_scale$", n)]
    if rules.detach_pattern:
        hooks += [(n, _detach) for n in names if n.endswith("attn.hook_pattern")]
    if rules.mlp_identity:
        for layer in range(model.cfg.n_layers):
            hooks += _mlp_rule_hooks(model, layer, rules.eps)
    return hooks


def _detach(x, hook):
    return x.detach()


def _mlp_rule_hooks(model, layer: int, eps: float) -> list[tuple[str, Callable]]:
    prefix = f"blocks.{layer}.mlp"
    live: dict[str, Tensor] = {}

    def keep(key):
        def hook(x, hook):
            live[key] = x
        return hook

    if f"{prefix}.hook_pre_linear" in model.hook_dict:
        act = _activation(model.cfg.act_fn)
        return [(f"{prefix}.hook_pre", keep("gate")), (f"{prefix}.hook_pre_linear", keep("up")),
                (f"{prefix}.hook_post", lambda y, hook: _gated_rule(y, live["gate"], live["up"], act, eps))]
    return [(f"{prefix}.hook_pre", keep("pre")), (f"{prefix}.hook_post", lambda y, hook: _identity_rule(y, live["pre"], eps))]


def _identity_rule(y: Tensor, x: Tensor, eps: float) -> Tensor:
    """Value y = phi(x); gradient phi(x)/x (the identity rule: relevance passes through unchanged)."""
    xs = x + eps * torch.sign(x)
    z = xs * (y / xs).detach()
    return y.detach() + (z - z.detach())


def _gated_rule(y: Tensor, gate: Tensor, up: Tensor, act: Callable, eps: float) -> Tensor:
    """Value y = phi(gate) * up; identity rule on phi, half rule on the product."""
    gs = gate + eps * torch.sign(gate)
    a = gs * (act(gate.detach()) / gs).detach()
    z = 0.5 * (a * up.detach() + a.detach() * up)
    return y.detach() + (z - z.detach())


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    table = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
             "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
             "gelu_fast": lambda x: F.gelu(x, approximate="tanh")}
    if name not in table:
        raise WorkbenchError(f"RelP's gate rule does not know the activation {name!r}; known: {', '.join(table)}")
    return table[name]


# ---------------------------------------------------------------------------- edges
def attribute_edges(model: "TransformerBridge", prompts: "TaskPrompts", method: str = "attribution",
                    per_position: bool = False, steps: int = 5, rules: RelPRules | None = None) -> Graph:
    """Edge scores writer -> reader: (writer_clean - writer_corrupt) . d metric / d reader input.

    A writer's scores over all its readers sum to its node score (the logits
    reader carries its direct path), as in TransformerLens 4.3's edge attribution.
    """
    start = time.perf_counter()
    check_positions(prompts, per_position)
    prompts = prompts.to(model.cfg.device)
    layout = edge_layout(model)
    n = model.cfg.n_layers
    with edge_hooks(model):
        run = gradient_pass(model, prompts, layout.writer_sites() + layout.reader_sites(), method, steps, rules)
    final = f"blocks.{n - 1}.hook_resid_post"
    check_additive(model, layout, run.clean, run.corrupt, (run.clean[final], run.corrupt[final]))
    deltas = torch.stack([writer_slice(run.clean, w) - writer_slice(run.corrupt, w) for w in layout.writers], 2)
    grads = torch.stack([reader_slice(run.grads, r, n) for r in layout.readers], 2)
    table = einops.einsum(deltas, grads, "b p w d, b p r d -> p r w") / len(prompts)  # [pos, reader, writer]
    table = table * layout.upstream.to(table.device)
    if not per_position:
        table = table.sum(0, keepdim=True)
    info = graph_info(model, prompts, method, "edge", run.clean_metric, run.corrupt_metric, time.perf_counter() - start,
                      method_params(method, steps, rules) | {"per_position": per_position})
    return edge_graph(model, layout, table.cpu(), info, per_position)


def edge_graph(model, layout: EdgeLayout, table: Tensor, info: GraphInfo, per_position: bool) -> Graph:
    """A graph from a [pos, reader, writer] table of edge scores (pos axis of 1 when summed over positions).

    Nodes are the writers and readers (heads and MLPs are both) at each position;
    edges into heads keep their q/k/v parts in `channels`. A writer's score is
    the sum of its outgoing edges; the logits node's is the sum of its incoming ones.
    """
    positions = range(table.shape[0]) if per_position else [-1]
    base = component_order({w for w in layout.writers} | {node for node, _ in layout.readers})
    nodes = [Node(b.kind, b.layer, p, b.head) for b in base for p in positions]
    where = {node: i for i, node in enumerate(nodes)}
    n = len(nodes)
    adjacency, channels = torch.zeros(n, n), torch.zeros(3, n, n)
    for pi, p in enumerate(positions):
        sources = torch.tensor([where[Node(w.kind, w.layer, p, w.head)] for w in layout.writers])
        for r, (reader, channel) in enumerate(layout.readers):
            t = where[Node(reader.kind, reader.layer, p, reader.head)]
            adjacency[t, sources] += table[pi, r]
            if channel >= 0:
                channels[channel, t, sources] += table[pi, r]
    scores = adjacency.sum(0)
    logits = torch.tensor([i for i, node in enumerate(nodes) if node.kind == "logits"])
    scores[logits] = adjacency[logits].sum(1)
    return Graph(nodes, scores, adjacency, info, channels=channels)
