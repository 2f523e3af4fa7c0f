"""Exact interventions: activation patching for nodes, path patching for edges, ablation runs.

Activation patching (Meng et al. 2022; Wang et al. 2022), denoising form:

1. Run the clean prompts once and cache every site the nodes read.
2. For each node, run the *corrupt* prompts with that node's activation (one
   head at one position, one MLP output at every position, ...) replaced by its
   clean value, and read the task metric.
3. The node's score is `metric(patched) - metric(corrupt)`, averaged over prompts:
   how much of the clean behaviour that node alone restores.

Path patching for edges (Wang et al. 2022; `transformer_lens.patching`'s direct
path patch, extended to every writer/reader pair): run the corrupt prompts and
add the writer's clean-minus-corrupt output to *one* reader's input only (one
head's query, key or value input, one MLP's input, or the logits' input),
leaving every other reader on the corrupt value. The edge's score is the
metric change.

Every forward is a batch of replicas: `patch_groups` packs many interventions
into one forward (the prompts repeated once per intervention), so exhaustive
patching costs one forward per intervention in FLOPs but far fewer calls.
Hooks live only inside the bridge's `hooks()` context and never leak.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from circuits.components import (DEFAULT_FAMILIES, EdgeLayout, check_additive, check_positions, component_nodes,
                                 edge_hooks, edge_layout, node_site, reader_site, writer_slice)
from circuits.graph import Graph, GraphInfo, Node

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge

LOGIT_BUDGET = 2**26  # floats of logits one packed forward may hold (256 MB in float32)


class Patch(NamedTuple):
    """Replace `site` at `pos` (-1 = every position) and `head` (-1 = the whole site) by a given value."""

    site: str
    pos: int = -1
    head: int = -1


def cache_sites(model: "TransformerBridge", tokens: Tensor, sites: Sequence[str],
                metric=None) -> tuple[dict[str, Tensor], Tensor | None]:
    """One no-grad forward: detached activations at `sites` (keyed as asked), and `metric(logits)` if given."""
    acts: dict[str, Tensor] = {}

    def keep(site):
        def hook(x, hook):
            acts[site] = x.detach().clone()
        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(s, keep(s)) for s in dict.fromkeys(sites)]):
        logits = model(tokens.to(model.cfg.device))
        value = metric(logits) if metric is not None else None
    return acts, value


def activation_patch(model: "TransformerBridge", prompts: "TaskPrompts", families=DEFAULT_FAMILIES,
                     per_position: bool = True, nodes: list[Node] | None = None) -> Graph:
    """Exact denoising activation patching of every node of `families` (or of `nodes`).

    One forward per node (packed); score = mean over prompts of metric(patched) - metric(corrupt).
    """
    start = time.perf_counter()
    check_positions(prompts, per_position)
    prompts = prompts.to(model.cfg.device)
    n_pos = prompts.clean.shape[1]
    nodes = nodes if nodes is not None else component_nodes(model, families, n_pos, per_position)
    sites = list(dict.fromkeys(node_site(model, n) for n in nodes))
    clean, clean_metric = cache_sites(model, prompts.clean, sites, prompts.metric)
    _, corrupt_metric = cache_sites(model, prompts.corrupt, [], prompts.metric)
    groups = [[Patch(node_site(model, n), n.pos, n.head)] for n in nodes]
    patched = patch_groups(model, prompts.corrupt, groups, clean, prompts)
    scores = (patched - corrupt_metric[None]).mean(1).cpu()
    info = graph_info(model, prompts, "activation", "position" if per_position else "component",
                      clean_metric, corrupt_metric, time.perf_counter() - start, {"families": list(families)})
    return Graph(nodes, scores, torch.zeros(len(nodes), len(nodes)), info)


def patch_groups(model: "TransformerBridge", tokens: Tensor, groups: Sequence[Sequence[Patch]],
                 values: dict[str, Tensor], prompts: "TaskPrompts", chunk: int | None = None) -> Tensor:
    """[n_groups, batch]: the task metric with each group's patches applied together (one replica per group).

    `values[site]` is `[batch or 1, pos, ...]`, broadcast over replicas. Groups are
    packed `chunk` at a time (default: as many as fit `LOGIT_BUDGET`).
    """
    batch, n_pos = tokens.shape
    chunk = chunk or max(1, LOGIT_BUDGET // (batch * n_pos * model.cfg.d_vocab))
    out = []
    for start in range(0, len(groups), chunk):
        part = groups[start:start + chunk]
        hooks = [(site, _replace_hook(mask, values[site], len(part))) for site, mask in
                 _group_masks(model, part, values, n_pos).items()]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens.to(model.cfg.device).repeat(len(part), 1))
        out.append(replica_metric(prompts, logits, len(part)))
    return torch.cat(out) if out else torch.zeros(0, batch)


def replica_metric(prompts: "TaskPrompts", logits: Tensor, replicas: int) -> Tensor:
    """[replicas, batch] task metric of a forward over the prompts repeated `replicas` times."""
    batch = len(prompts)
    shaped = logits.view(replicas, batch, *logits.shape[1:])
    final = shaped[:, torch.arange(batch, device=logits.device), prompts.final_pos.to(logits.device)]  # [replica, batch, vocab]
    return torch.stack([prompts.metric(f) for f in final])


def _group_masks(model, groups: Sequence[Sequence[Patch]], values: dict[str, Tensor], n_pos: int) -> dict[str, Tensor]:
    """site -> bool mask [replica, pos(, head)] of what each replica replaces."""
    masks: dict[str, Tensor] = {}
    for k, group in enumerate(groups):
        for patch in group:
            per_token = values[patch.site].shape[2:]
            if patch.site not in masks:
                heads = per_token[0] if len(per_token) == 2 else None
                masks[patch.site] = torch.zeros((len(groups), n_pos) + ((heads,) if heads else ()), dtype=torch.bool)
            mask = masks[patch.site]
            where = (k, slice(None) if patch.pos < 0 else patch.pos)
            if mask.ndim == 3:
                where += (slice(None) if patch.head < 0 else patch.head,)
            mask[where] = True
    return {site: m.to(model.cfg.device) for site, m in masks.items()}


def _replace_hook(mask: Tensor, value: Tensor, replicas: int) -> Callable:
    def hook(x, hook):
        shaped = x.view(replicas, -1, *x.shape[1:])  # [replica, batch, pos, ...]
        m = mask.view(replicas, 1, *mask.shape[1:], *([1] * (x.ndim - mask.ndim)))
        return torch.where(m, value.to(x.dtype)[None], shaped).view_as(x)
    return hook


# ---------------------------------------------------------------------------- edges
class EdgeRun(NamedTuple):
    """Caches a clean and a corrupt run of every writer and reader site (edge hooks on)."""

    layout: EdgeLayout
    clean: dict[str, Tensor]
    corrupt: dict[str, Tensor]
    clean_metric: Tensor  # [batch]
    corrupt_metric: Tensor


def edge_run(model: "TransformerBridge", prompts: "TaskPrompts") -> EdgeRun:
    """Clean and corrupt caches of the residual-stream graph, checked to be additive."""
    layout = edge_layout(model)
    n = model.cfg.n_layers
    sites = layout.writer_sites() + layout.reader_sites()
    with edge_hooks(model):
        clean, clean_metric = cache_sites(model, prompts.clean, sites, prompts.metric)
        corrupt, corrupt_metric = cache_sites(model, prompts.corrupt, sites, prompts.metric)
    final = reader_site(Node("logits", n), -1, n)
    check_additive(model, layout, clean, corrupt, (clean[final], corrupt[final]))
    return EdgeRun(layout, clean, corrupt, clean_metric, corrupt_metric)


def path_patch(model: "TransformerBridge", prompts: "TaskPrompts", per_position: bool = False,
               edges: Sequence[tuple[int, int]] | None = None) -> Graph:
    """Exact path patching of every writer -> reader edge (or of `edges`, as (reader, writer) layout indices).

    Score of an edge: metric(corrupt run, reader's input += writer's clean - corrupt output) - metric(corrupt).
    Per position (`per_position=True`) the patch is at one position; otherwise at every position.
    The result is a graph over embed/head/MLP/logits nodes whose edges into heads keep q/k/v parts.
    """
    from circuits.attribution import edge_graph

    start = time.perf_counter()
    check_positions(prompts, per_position)
    prompts = prompts.to(model.cfg.device)
    run = edge_run(model, prompts)
    n_pos = prompts.clean.shape[1]
    pairs = edges if edges is not None else [tuple(rw) for rw in run.layout.upstream.nonzero().tolist()]
    positions = range(n_pos) if per_position else [-1]
    jobs = [(r, w, p) for r, w in pairs for p in positions]
    deltas = {w: writer_slice(run.clean, run.layout.writers[w])
              - writer_slice(run.corrupt, run.layout.writers[w]) for w in {w for _, w in pairs}}
    with edge_hooks(model):
        metrics = _path_metrics(model, prompts, run.layout, jobs, deltas)
    effect = (metrics - run.corrupt_metric[None]).mean(1).cpu()
    table = torch.zeros(len(positions), len(run.layout.readers), len(run.layout.writers))
    for (r, w, p), value in zip(jobs, effect.tolist()):
        table[max(p, 0), r, w] = value
    info = graph_info(model, prompts, "path", "edge", run.clean_metric, run.corrupt_metric, time.perf_counter() - start,
                      {"per_position": per_position})
    return edge_graph(model, run.layout, table, info, per_position)


def _path_metrics(model, prompts, layout: EdgeLayout, jobs, deltas: dict[int, Tensor]) -> Tensor:
    """[n_jobs, batch] metric with each (reader, writer, pos) job's writer delta added to that reader's input."""
    batch, n_pos = prompts.corrupt.shape
    n = model.cfg.n_layers
    chunk = max(1, LOGIT_BUDGET // (batch * n_pos * model.cfg.d_vocab))
    out = []
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        adds: dict[str, list] = {}
        for k, (r, w, p) in enumerate(part):
            node, channel = layout.readers[r]
            adds.setdefault(reader_site(node, channel, n), []).append((k, node.head, p, deltas[w]))
        hooks = [(site, _add_hook(items, len(part))) for site, items in adds.items()]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(prompts.corrupt.repeat(len(part), 1))
        out.append(replica_metric(prompts, logits, len(part)))
    return torch.cat(out)


def _add_hook(items, replicas: int) -> Callable:
    def hook(x, hook):
        shaped = x.view(replicas, -1, *x.shape[1:]).clone()
        for k, head, pos, delta in items:
            where = (k, slice(None), slice(None) if pos < 0 else pos) + ((head,) if head >= 0 else ())
            shaped[where] += delta[:, :] if pos < 0 else delta[:, pos]
        return shaped.view_as(x)
    return hook


def ablated_logits(model: "TransformerBridge", prompts: "TaskPrompts", run: EdgeRun,
                   removed_sets: Sequence[Sequence[tuple[int, int]]]) -> Tensor:
    """[n_sets, batch, vocab]: final logits on the clean prompts with each set of (reader, writer) edges ablated.

    An ablated edge feeds its reader the writer's *corrupt* output instead of its
    live one, at every position: reader input += corrupt_w - live_w, with live_w
    read in the same forward (ACDC's convention, and TransformerLens 4.3's
    `faithfulness` with corrupt replacements).
    """
    n = model.cfg.n_layers
    out = []
    with edge_hooks(model):
        for removed in removed_sets:
            live: dict[str, Tensor] = {}
            by_reader: dict[int, list[int]] = {}
            for r, w in removed:
                by_reader.setdefault(r, []).append(w)
            hooks = [(site, _capture_hook(site, live)) for site in run.layout.writer_sites()]
            hooks += [(reader_site(*run.layout.readers[r], n), _ablate_hook(run, r, ws, live, n)) for r, ws in by_reader.items()]
            with torch.no_grad(), model.hooks(fwd_hooks=hooks):
                out.append(prompts.final_logits(model(prompts.clean)))
    return torch.stack(out)


def _capture_hook(site: str, live: dict[str, Tensor]) -> Callable:
    def hook(x, hook):
        live[site] = x.detach()
    return hook


def _ablate_hook(run: EdgeRun, reader: int, writers: list[int], live: dict[str, Tensor], n: int) -> Callable:
    node, _ = run.layout.readers[reader]

    def hook(x, hook):
        change = sum(writer_slice(run.corrupt, run.layout.writers[w]) - writer_slice(live, run.layout.writers[w])
                     for w in writers)
        x = x.clone()
        if node.kind == "head":
            x[:, :, node.head] += change
        else:
            x += change
        return x
    return hook


def graph_info(model, prompts: "TaskPrompts", method: str, granularity: str, clean_metric: Tensor,
               corrupt_metric: Tensor, runtime: float, params: dict) -> GraphInfo:
    """The GraphInfo shared by every method: model, task, metric means, the first prompt's tokens."""
    first = prompts.clean[0, : int(prompts.final_pos[0]) + 1].tolist()
    tokenizer = model.tokenizer
    return GraphInfo(model=str(model.cfg.model_name), task=prompts.task, method=method, metric=prompts.metric_kind,
                     granularity=granularity, n_prompts=len(prompts), clean_metric=float(clean_metric.mean()),
                     corrupt_metric=float(corrupt_metric.mean()), runtime_s=runtime,
                     prompt=tokenizer.decode(first) if tokenizer is not None else "",
                     prompt_tokens=tuple(tokenizer.decode([t]) for t in first) if tokenizer is not None else (),
                     params=params)

