"""Feature circuits and attribution graphs over SAE and transcoder features, with error nodes.

Marks et al. 2024 ("Sparse Feature Circuits") for the nodes and edges, circuit-tracer
(Ameisen et al. 2025, "Circuit Tracing") for the graph and its pruning,
Dunefsky et al. 2024 ("Transcoders Find Interpretable LLM Feature Circuits")
for the weight split. One sign convention (denoising; gradients on the corrupt run).

1. **Splice.** Every dictionary is spliced into the forward by hooks that keep
   every value: at its target site y = decode(f) [+ skip(x)] + err, with
   f = encode(x) read at its input site and err = y - decode(f) - skip(x)
   (an SAE reads and writes one site; a transcoder reads an MLP's input and
   writes its output). Features f, error terms err and token embeddings are the
   graph's source nodes; the task metric is its output node.
2. **Node scores** (one corrupt forward + backward, after a clean forward): zero
   leaves are added to f and err at the target site, so `d metric / d f` is the
   total effect through the real model; score = mean over prompts of
   (f_clean - f_corrupt) . d metric / d f (`via="ig"`: gradients averaged along the
   embedding path; `via="relp"`: RelP's backward rules).
3. **Edges** (direct effects). A second corrupt forward where f and err *are*
   leaves: downstream layers see only decode(f) + skip(x) + err, so the gradient of
   a target (a kept feature's pre-activation, or the metric) reaches an upstream
   node only along paths that cross no other node (residual stream, attention,
   skip connections, MLPs without a dictionary). Edge weight
   A[target, source] = mean over prompts of (source_clean - source_corrupt) . d target / d source.
   Only the `max_features` features of largest |score| become nodes.
4. **Pruning by cumulative influence** (circuit-tracer's `prune_graph`): with |A|
   row-normalised, a node's influence on the metric is w (A + A^2 + ...); nodes
   are kept until `node_threshold` of the total influence is covered, then edges
   until `edge_threshold` of the edge influence; features and errors left
   without an outgoing edge (features: or an incoming one) are dropped, repeatedly.
5. **Transcoder weight split** (`transcoder_split`): an edge from transcoder
   feature i (layer l1) to transcoder feature j (layer l2 > l1) at one position
   contains the residual-stream term
   `(delta a_i / sigma) * (W_dec[i] . C . W_enc[:, j])`: an input-invariant
   virtual weight (C centres, for transcoders that read `ln2.hook_normalized`)
   times an input-dependent factor (the feature's activation change over the
   target's LayerNorm scale sigma). What remains of the edge travels through
   attention heads (and skip connections).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch
from torch import Tensor

from circuits.attribution import EMBED, RelPRules, relp_hooks
from circuits.components import check_positions
from circuits.graph import Graph, Node
from circuits.patching import cache_sites, graph_info, replica_metric
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from sae.dictionary import Dictionary
    from transformer_lens.model_bridge import TransformerBridge

VIA = ("attribution", "ig", "relp")


class FeatureCircuit(NamedTuple):
    graph: Graph  # nodes: embed@pos, features, errors, logits; pruned masks; influence; activations
    component_scores: dict[str, float]  # sum of |feature and error scores| per head (split exactly) or MLP
    dictionaries: dict[str, str]  # dictionary name -> the component it belongs to
    deltas: list[Tensor]  # per source node (graph order, logits excluded): clean - corrupt value per prompt


class SplitRow(NamedTuple):
    """One transcoder-to-transcoder edge, split into its residual-stream factors and the rest."""

    source: str
    target: str
    total: float  # the edge weight in the graph
    weights_term: float  # input-invariant: W_dec[i] . C . W_enc[:, j]
    input_term: float  # input-dependent: mean over prompts of (a_clean - a_corrupt) / sigma
    residual: float  # weights_term * input_term: the direct residual-stream path
    via_attention: float  # total - residual: through attention heads (and skip connections)


def load_dictionaries(workspace, names: Sequence[str], model: "TransformerBridge") -> list["Dictionary"]:
    """Load workspace dictionaries and check each was trained on this model, at a site it has, with its width."""
    from sae.dictionary import load_dictionary
    from workbench.model import site_info

    out = []
    for name in names:
        d = load_dictionary(workspace, name, device=model.cfg.device)
        check_dictionary(d, model)
        expected = {d.cfg.site: math.prod(d.cfg.site_shape) if d.cfg.site_shape else d.cfg.d_in}
        if not d.cfg.is_sae:
            expected[d.cfg.target_site] = d.cfg.d_out
        for site, width in expected.items():
            actual = site_info(model, [site])[site].width
            if actual != width:
                raise WorkbenchError(f"dictionary {name} expects width {width} at {site}, but {model.cfg.model_name} "
                                     f"has {actual} there: it was trained on another model")
        out.append(d)
    return out


def quick_dictionaries(model: "TransformerBridge", tokens: Tensor, kinds: Sequence[str] = ("transcoder", "heads"),
                       d_sae: int = 128, k: int = 8, train_tokens: int = 50_000, seed: int = 0) -> list["Dictionary"]:
    """Small TopK dictionaries for every layer, trained here with the sae package's trainer (not saved).

    `transcoder`: one per MLP, `ln2.hook_normalized` -> `hook_mlp_out`; `heads`: one
    attention-output SAE per layer on `attn.hook_z` (split per head by the graph).
    For tests, benchmarks and first looks; real work trains on the activation store.
    """
    from sae.dictionary import DictionaryConfig
    from sae.train import TrainConfig, tensor_source, train_dictionaries

    n, H, dh, D = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model
    plans = []
    for layer in range(n):
        if "transcoder" in kinds:
            plans.append(DictionaryConfig(name=f"tc{layer}", arch="topk", d_in=D, d_sae=d_sae, k=k, model=str(model.cfg.model_name),
                                          site=f"blocks.{layer}.ln2.hook_normalized", target_site=f"blocks.{layer}.hook_mlp_out"))
        if "heads" in kinds:
            plans.append(DictionaryConfig(name=f"z{layer}", arch="topk", d_in=H * dh, d_sae=d_sae, k=k, model=str(model.cfg.model_name),
                                          site=f"blocks.{layer}.attn.hook_z", site_shape=(H, dh)))
    acts, _ = cache_sites(model, tokens, list(dict.fromkeys(s for c in plans for s in (c.site, c.target_site) if s)))
    out = []
    for config in plans:
        x = acts[config.site].flatten(0, 1).flatten(1)
        y = acts[config.target_site].flatten(0, 1) if config.target_site else None
        batch = min(512, x.shape[0])
        result = train_dictionaries([config], tensor_source(x, y, batch_size=batch, seed=seed),
                                    TrainConfig(tokens=train_tokens, batch_size=batch, seed=seed, device=str(x.device)),
                                    progress=False)
        out += result.dictionaries
    return out


def check_dictionary(d: "Dictionary", model: "TransformerBridge") -> None:
    """A one-line error when a dictionary was trained on another model or reads a site this model lacks."""
    known = {str(model.cfg.model_name)}
    directory = getattr(model, "workbench_dir", None)
    if directory is not None:
        known |= {str(directory), directory.name}
    if d.cfg.model and d.cfg.model not in known and d.cfg.model.rstrip("/").split("/")[-1] not in known:
        raise WorkbenchError(f"dictionary {d.cfg.name} was trained on model {d.cfg.model!r}, not on "
                             f"{model.cfg.model_name!r}; train one on this model or load the right model")
    for site in (d.cfg.site, d.cfg.target_site):
        if site and site not in model.hook_dict:
            raise WorkbenchError(f"dictionary {d.cfg.name} reads {site}, which {model.cfg.model_name} does not have")


def feature_circuit(model: "TransformerBridge", prompts: "TaskPrompts", dictionaries: Sequence["Dictionary"],
                    via: str = "relp", steps: int = 5, max_features: int = 200, node_threshold: float = 0.8,
                    edge_threshold: float = 0.98, detach_pattern: bool = False) -> FeatureCircuit:
    """The feature graph of the prompts (see the module docstring), pruned by cumulative influence."""
    if via not in VIA:
        raise WorkbenchError(f"unknown feature scoring {via!r}; choose one of {', '.join(VIA)}")
    if not dictionaries:
        raise WorkbenchError("a feature circuit needs at least one dictionary")
    for d in dictionaries:
        check_dictionary(d, model)
    start = time.perf_counter()
    check_positions(prompts, True)
    prompts = prompts.to(model.cfg.device)
    rules = RelPRules(detach_pattern=detach_pattern) if via == "relp" else None
    clean = _splice_run(model, prompts.clean, dictionaries, "values", prompts)
    total = _splice_run(model, prompts.corrupt, dictionaries, "total", prompts, rules, steps if via == "ig" else 1,
                        clean.embed)
    nodes, scores, deltas = _select_nodes(dictionaries, clean, total, max_features, model.cfg.n_layers)
    adjacency = _direct_edges(model, prompts, dictionaries, nodes, deltas, rules)
    graph = _pruned_graph(model, prompts, nodes, scores, adjacency, deltas, clean, total, node_threshold, edge_threshold,
                          time.perf_counter() - start, via, steps, detach_pattern, dictionaries)
    owners = {d.cfg.name: _owner(d) for d in dictionaries}
    return FeatureCircuit(graph, _component_scores(nodes, scores, total, clean, dictionaries), owners, deltas)


# ---------------------------------------------------------------------------- splicing
class _Splice:
    """Hooks splicing one dictionary into the forward; records inputs, features, errors and leaves."""

    def __init__(self, d: "Dictionary", mode: str):
        self.d, self.mode = d, mode  # mode: values (record only), total (zero leaves added) or direct (leaves replace)
        self.x: Tensor | None = None
        self.pre = self.features = self.errors = self.feature_leaf = self.error_leaf = None

    def hooks(self) -> list:
        d = self.d
        target = d.cfg.target_site or d.cfg.site
        if target == d.cfg.site:
            return [(target, self._write)]
        return [(d.cfg.site, self._read), (target, self._write)]

    def _read(self, x, hook):
        self.x = x

    def _write(self, y, hook):
        d = self.d
        x_in = d.site_input(y if d.cfg.is_sae else self.x)  # [batch, pos, d_in]
        y_flat = d.site_input(y) if d.cfg.is_sae else y  # [batch, pos, d_out]
        pre = d.pre_activations(x_in)
        f = d.activate(pre.detach())
        skip = (x_in @ d.W_skip) if d.W_skip is not None else 0.0
        recon = d.decode(f) + (skip.detach() if torch.is_tensor(skip) else skip)
        self.pre, self.features, self.errors = pre, f.detach(), (y_flat - recon).detach()
        self.x = None
        if self.mode == "values":
            return y
        if self.mode == "total":
            self.feature_leaf = torch.zeros_like(f, requires_grad=True)
            self.error_leaf = torch.zeros_like(y_flat, requires_grad=True)
            new = y_flat + (d.decode(f + self.feature_leaf) - d.decode(f)) + self.error_leaf
        else:  # direct: features and errors are the only ways through
            self.feature_leaf = f.clone().requires_grad_(True)
            self.error_leaf = self.errors.clone().requires_grad_(True)
            live = d.decode(self.feature_leaf) + skip + self.error_leaf
            new = y_flat.detach() + (live - live.detach())
        return d.write_site(new, y) if d.cfg.is_sae else new.reshape(y.shape)


class _SpliceRun(NamedTuple):
    splices: list[_Splice]
    embed: Tensor  # [batch, pos, d_model] hook_embed values (replica 0)
    metric: Tensor  # [replicas, batch]
    grads: dict[str, Tensor] | None  # "f:<name>", "e:<name>", "embed" -> d metric / d leaf (mean over replicas)


def _splice_run(model, tokens: Tensor, dictionaries, mode: str, prompts, rules: RelPRules | None = None,
                replicas: int = 1, clean_embed: Tensor | None = None) -> _SpliceRun:
    """One forward with the dictionaries spliced in; `total` mode also runs the backward from the metric."""
    splices = [_Splice(d, mode) for d in dictionaries]
    state: dict[str, Tensor] = {}
    batch = len(prompts)
    alpha = (torch.arange(replicas, device=tokens.device, dtype=torch.float32) / replicas).repeat_interleave(batch).view(-1, 1, 1)

    def embed_hook(x, hook):
        if replicas > 1:
            x = x + alpha * (clean_embed.repeat(replicas, 1, 1) - x)
        state["embed"] = x.detach()[:batch]
        if mode == "values":
            return x
        state["leaf"] = torch.zeros_like(x, requires_grad=True)
        return x + state["leaf"]

    hooks = [(EMBED, embed_hook)] + [h for s in splices for h in s.hooks()] + (relp_hooks(model, rules) if rules else [])
    grad_ctx = torch.enable_grad() if mode != "values" else torch.no_grad()
    with grad_ctx, model.hooks(fwd_hooks=hooks), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*edited hook_scale.*")
        metric = replica_metric(prompts, model(tokens.repeat(replicas, 1)), replicas)
        grads = None
        if mode == "total":
            leaves = [state["leaf"]] + [t for s in splices for t in (s.feature_leaf, s.error_leaf)]
            raw = torch.autograd.grad(metric.sum(), leaves)
            names = ["embed"] + [f"{k}:{s.d.cfg.name}" for s in splices for k in ("f", "e")]
            grads = {n: g.view(replicas, batch, *g.shape[1:]).mean(0) for n, g in zip(names, raw)}
    for s in splices:  # keep replica 0 (the corrupt run itself)
        s.features, s.errors = s.features[:batch], s.errors[:batch]
    return _SpliceRun(splices, state["embed"], metric.detach(), grads)


# ---------------------------------------------------------------------------- nodes
def _select_nodes(dictionaries, clean: _SpliceRun, total: _SpliceRun, max_features: int, n_layers: int):
    """Nodes (embeddings, the top features, errors, the metric), their scores, and each source's delta [batch, ...]."""
    n_pos = clean.embed.shape[1]
    candidates: list[tuple[float, Node, Tensor]] = []
    fixed: list[tuple[float, Node, Tensor]] = []
    delta_embed = clean.embed - total.embed
    score_embed = (delta_embed * total.grads["embed"]).sum(-1).mean(0)
    fixed += [(float(score_embed[p]), Node("embed", -1, p), delta_embed[:, p]) for p in range(n_pos)]
    for d, sc, st in zip(dictionaries, clean.splices, total.splices):
        layer = _layer(d)
        delta_f = sc.features - st.features  # [batch, pos, d_sae]
        score_f = (delta_f * total.grads[f"f:{d.cfg.name}"]).mean(0)  # [pos, d_sae]
        active = ((sc.features != 0) | (st.features != 0)).any(0)
        for p, j in active.nonzero().tolist():
            candidates.append((float(score_f[p, j]), Node("feature", layer, p, feature=j, dictionary=d.cfg.name), delta_f[:, p, j]))
        delta_e = sc.errors - st.errors
        score_e = (delta_e * total.grads[f"e:{d.cfg.name}"]).sum(-1).mean(0)
        fixed += [(float(score_e[p]), Node("error", layer, p, dictionary=d.cfg.name), delta_e[:, p]) for p in range(n_pos)]
    candidates.sort(key=lambda c: -abs(c[0]))
    chosen = candidates[:max_features] + fixed
    gap = float((clean.metric - total.metric[0]).mean())
    final = Node("logits", n_layers, n_pos - 1)
    nodes = [c[1] for c in chosen] + [final]
    return nodes, torch.tensor([c[0] for c in chosen] + [gap]), [c[2] for c in chosen]


def _layer(d: "Dictionary") -> int:
    from workbench.model import site_layer

    layer = site_layer(d.cfg.target_site or d.cfg.site)
    return -1 if layer is None else layer


# ---------------------------------------------------------------------------- edges
def _direct_edges(model, prompts, dictionaries, nodes: list[Node], deltas: list[Tensor], rules) -> Tensor:
    """A[target, source] = mean_b delta_source . d target / d source, in the direct-effect (leaf) forward."""
    splices = [_Splice(d, "direct") for d in dictionaries]
    by_name = {s.d.cfg.name: s for s in splices}
    state: dict[str, Tensor] = {}

    def embed_hook(x, hook):
        state["leaf"] = x.detach().clone().requires_grad_(True)
        return state["leaf"]

    hooks = [(EMBED, embed_hook)] + [h for s in splices for h in s.hooks()] + (relp_hooks(model, rules) if rules else [])
    n = len(nodes)
    adjacency = torch.zeros(n, n)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*edited hook_scale.*")
        metric = replica_metric(prompts, model(prompts.corrupt), 1)[0]
        leaves = [state["leaf"]] + [t for s in splices for t in (s.feature_leaf, s.error_leaf)]
        groups = _source_groups(nodes[:-1], deltas, splices)
        targets = [(i, node) for i, node in enumerate(nodes) if node.kind in ("feature", "logits")]
        for k, (i, node) in enumerate(targets):
            value = metric.sum() if node.kind == "logits" else by_name[node.dictionary].pre[:, node.pos, node.feature].sum()
            grads = torch.autograd.grad(value, leaves, retain_graph=k < len(targets) - 1, allow_unused=True)
            adjacency[i, :-1] = _edge_row(groups, grads, n - 1, len(prompts))
    return adjacency


class _SourceGroup(NamedTuple):
    """Source nodes that share one leaf: their node indices, positions, features and stacked deltas."""

    leaf: int  # index into the leaves list (0 = embeddings, then features/errors of each dictionary)
    nodes: Tensor  # [n] node indices
    pos: Tensor  # [n]
    feature: Tensor | None  # [n] for feature groups
    delta: Tensor  # [batch, n] (features) or [batch, n, width]


def _source_groups(sources: list[Node], deltas: list[Tensor], splices) -> list[_SourceGroup]:
    leaf_of = {"embed": 0} | {f"f:{s.d.cfg.name}": 1 + 2 * k for k, s in enumerate(splices)} | \
              {f"e:{s.d.cfg.name}": 2 + 2 * k for k, s in enumerate(splices)}
    members: dict[str, list[int]] = {}
    for i, node in enumerate(sources):
        key = "embed" if node.kind == "embed" else f"{'f' if node.kind == 'feature' else 'e'}:{node.dictionary}"
        members.setdefault(key, []).append(i)
    groups = []
    for key, idx in members.items():
        feature = torch.tensor([sources[i].feature for i in idx]) if key.startswith("f:") else None
        groups.append(_SourceGroup(leaf_of[key], torch.tensor(idx), torch.tensor([sources[i].pos for i in idx]), feature,
                                   torch.stack([deltas[i] for i in idx], 1)))
    return groups


def _edge_row(groups: list[_SourceGroup], grads, n_sources: int, batch: int) -> Tensor:
    """One adjacency row: mean over prompts of delta . gradient, for every source at once."""
    row = torch.zeros(n_sources)
    for g in groups:
        grad = grads[g.leaf]
        if grad is None:
            continue
        picked = grad[:, g.pos, g.feature] if g.feature is not None else grad[:, g.pos]
        row[g.nodes] = ((g.delta * picked).reshape(batch, len(g.nodes), -1).sum((0, 2)) / batch).cpu()
    return row


# ---------------------------------------------------------------------------- pruning
def prune_by_influence(adjacency: Tensor, output_weights: Tensor, keep: Tensor, features: Tensor,
                       node_threshold: float = 0.8, edge_threshold: float = 0.98) -> tuple[Tensor, Tensor, Tensor]:
    """circuit-tracer's pruning: (node_mask, edge_mask, cumulative influence) for a rows-are-targets adjacency.

    `output_weights` weights the output nodes (the metric); `keep` marks nodes never
    pruned (embeddings, outputs); `features` marks nodes that also need an incoming edge.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise WorkbenchError(f"{name} must be between 0 and 1, got {value}")
    influence = _influence(_normalise(adjacency), output_weights)
    node_mask = (influence >= _threshold(influence, node_threshold)) | keep
    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalised = _normalise(pruned)
    edge_scores = normalised * (_influence(normalised, output_weights) + output_weights)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)
    edge_mask &= adjacency != 0
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask &= keep | edge_mask.any(0)  # sources need an outgoing edge
        node_mask &= ~features | edge_mask.any(1) | keep  # features need an incoming edge
        if torch.equal(before, node_mask):
            break
    order = influence.argsort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = influence[order].cumsum(0) / influence.sum().clamp_min(1e-12)
    return node_mask, edge_mask, cumulative


def _normalise(matrix: Tensor) -> Tensor:
    a = matrix.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def _influence(a: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    """weights @ (A + A^2 + ...), summed until the series vanishes (the graph is acyclic)."""
    current = weights @ a
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ a
        total += current
    raise WorkbenchError("influence did not converge: the graph has a cycle")


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    ordered = scores.sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return ordered[0] if len(ordered) else torch.tensor(0.0)
    cumulative = ordered.cumsum(0) / total
    index = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), len(ordered) - 1)
    return ordered[index]


def _pruned_graph(model, prompts, nodes, scores, adjacency, deltas, clean, total, node_threshold, edge_threshold,
                  runtime, via, steps, detach_pattern, dictionaries) -> Graph:
    kinds = [n.kind for n in nodes]
    output = torch.tensor([k == "logits" for k in kinds], dtype=torch.float32)
    keep = torch.tensor([k in ("embed", "logits") for k in kinds])
    features = torch.tensor([k == "feature" for k in kinds])
    node_mask, edge_mask, cumulative = prune_by_influence(adjacency, output, keep, features, node_threshold, edge_threshold)
    activations = torch.tensor([float(d.mean()) if n.kind == "feature" else 0.0 for n, d in zip(nodes, deltas + [torch.zeros(1)])])
    info = graph_info(model, prompts, f"features-{via}", "feature", clean.metric[0], total.metric[0], runtime,
                      {"via": via, "steps": steps if via == "ig" else None, "detach_pattern": detach_pattern,
                       "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                       "dictionaries": {d.cfg.name: {"site": d.cfg.site, "target_site": d.cfg.target_site,
                                                     "arch": d.cfg.arch, "component": _owner(d)} for d in dictionaries}})
    return Graph(nodes, scores, adjacency, info, node_mask=node_mask, edge_mask=edge_mask, activations=activations,
                 influence=cumulative)


# ---------------------------------------------------------------------------- components
def _owner(d: "Dictionary") -> str:
    """The component a dictionary reads or replaces: `MLP{l}`, `heads{l}` (hook_z, split per head), `ATTN{l}`, `RESID{l}`."""
    site = d.cfg.target_site or d.cfg.site
    layer = _layer(d)
    if "mlp" in site or "ln2" in d.cfg.site:
        return f"MLP{layer}"
    if site.endswith("attn.hook_z"):
        return f"L{layer}H{d.cfg.head}" if d.cfg.head is not None else f"heads{layer}"
    if "attn" in site:
        return f"ATTN{layer}"
    return f"RESID{layer}"


def _component_scores(nodes, scores, total: _SpliceRun, clean: _SpliceRun, dictionaries) -> dict[str, float]:
    """Sum of |scores| of features and errors per component; hook_z dictionaries are split exactly per head."""
    out: dict[str, float] = {}
    by_name = {d.cfg.name: (d, sc, st) for d, sc, st in zip(dictionaries, clean.splices, total.splices)}
    for node, score in zip(nodes, scores.tolist()):
        if node.kind not in ("feature", "error"):
            continue
        d, sc, st = by_name[node.dictionary]
        owner = _owner(d)
        if not owner.startswith("heads"):
            out[owner] = out.get(owner, 0.0) + abs(score)
            continue
        for head, share in enumerate(_head_split(d, node, sc, st, total).tolist()):
            name = f"L{node.layer}H{head}"
            out[name] = out.get(name, 0.0) + abs(share)
    return out


def _head_split(d: "Dictionary", node: Node, sc: _Splice, st: _Splice, total: _SpliceRun) -> Tensor:
    """A hook_z feature's (or error's) score, split exactly over heads: [n_heads]."""
    n_heads = d.cfg.n_heads
    g_err = total.grads[f"e:{d.cfg.name}"][:, node.pos]  # d metric / d hook_z (flattened) at this position
    if node.kind == "feature":
        delta = (sc.features - st.features)[:, node.pos, node.feature, None] * d.W_dec[node.feature].detach()
    else:
        delta = (sc.errors - st.errors)[:, node.pos]
    return (delta * g_err).view(delta.shape[0], n_heads, -1).sum(-1).mean(0)


# ---------------------------------------------------------------------------- transcoder split
def transcoder_split(model: "TransformerBridge", result: FeatureCircuit, dictionaries: Sequence["Dictionary"],
                     prompts: "TaskPrompts | None" = None) -> list[SplitRow]:
    """Split each same-position edge between two transcoder features (kept by pruning) into its factors.

    sigma (the target's LayerNorm scale) is read on the corrupt prompts when
    given, else taken as 1 (then `input_term` is the bare activation change).
    """
    graph = result.graph
    by_name = {d.cfg.name: d for d in dictionaries if not d.cfg.is_sae}
    sigma = _ln_scales(model, prompts, by_name.values()) if prompts is not None else {}
    rows = []
    mask = graph.edge_mask if graph.edge_mask is not None else graph.adjacency != 0
    for t, s in mask.nonzero().tolist():
        src, dst = graph.nodes[s], graph.nodes[t]
        if not (src.kind == dst.kind == "feature" and src.dictionary in by_name and dst.dictionary in by_name
                and src.pos == dst.pos and src.layer < dst.layer):
            continue
        d_src, d_dst = by_name[src.dictionary], by_name[dst.dictionary]
        weights = float(_virtual_weight(d_src, d_dst, src.feature, dst.feature))
        scale = sigma.get(d_dst.cfg.name)
        delta = result.deltas[s]  # [batch]
        inputs = float(delta.mean()) if scale is None else float((delta / scale[:, dst.pos].to(delta.device)).mean())
        total = float(graph.adjacency[t, s])
        rows.append(SplitRow(src.id, dst.id, total, weights, inputs, weights * inputs, total - weights * inputs))
    return sorted(rows, key=lambda r: -abs(r.total))


def _virtual_weight(d_src: "Dictionary", d_dst: "Dictionary", i: int, j: int) -> Tensor:
    """W_dec[i] . C . W_enc[:, j]; C centres the vector when the target reads a LayerNorm output."""
    write = d_src.W_dec[i].detach().float()
    if d_dst.cfg.site.endswith("hook_normalized"):
        write = write - write.mean()
    return write @ d_dst.W_enc[:, j].detach().float()


def _ln_scales(model, prompts: "TaskPrompts", transcoders) -> dict[str, Tensor]:
    """The LayerNorm scale [batch, pos] each transcoder's input is divided by, on the corrupt prompts."""
    sites = {d.cfg.name: d.cfg.site.replace("hook_normalized", "hook_scale") for d in transcoders
             if d.cfg.site.endswith("hook_normalized")}
    acts, _ = cache_sites(model, prompts.corrupt, list(sites.values()))
    return {name: acts[site][..., 0] for name, site in sites.items()}
