"""Discrete-code circuit identification (O'Neill & Bui 2024, "Sparse Autoencoders Enable Scalable and
Reliable Circuit Identification in Language Models").

The idea: a head that takes part in a task's computation writes something on
the examples where the model can do the task that it never writes where it
cannot. Discrete codes make "something" countable.

1. Positive examples are the clean prompts the model gets right (metric > 0);
   negative examples are their corrupt partners, on which it cannot predict
   the answer. A handful of each is enough (the paper uses 5-10).
2. Cache every head's output (`blocks.L.attn.hook_z`, one head's slice) on both
   sets, at every position.
3. Train one small codebook per head (the `sae` package's `codebook` variant
   with k = 1 and `head` set: the code is the codebook entry of largest cosine)
   on that head's outputs from both sets.
4. Discretise: each example's code for a head is its chosen entry at the final
   position (`positions="final"`, the paper's setting) or the tuple of entries
   over every position (`"all"`).
5. A head's score is the fraction of positive examples whose code never occurs
   among the negative examples' codes. Heads are ranked by it; the circuit is
   the heads scoring at least `threshold`. An edge between two heads in
   different layers is weighted by how often both emit such a unique code on
   the same positive example.

Sign: scores are fractions in [0, 1], higher = more involved; they are not
patching effects and carry no direction.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from circuits.graph import Graph, Node
from circuits.patching import cache_sites, graph_info
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from data.tasks import TaskPrompts
    from transformer_lens.model_bridge import TransformerBridge


class HeadCodes(NamedTuple):
    layer: int
    head: int
    score: float  # fraction of positive examples with a code unique to positives
    positive_codes: int  # distinct codes on positive examples
    negative_codes: int
    unique_codes: int  # distinct codes seen on positives only


class CodeCircuit(NamedTuple):
    graph: Graph  # head nodes (pos = -1) scored by unique-code fraction; co-occurrence edges; mask = circuit
    heads: list[HeadCodes]  # ranked, best first
    n_positive: int
    n_negative: int


def code_circuit(model: "TransformerBridge", prompts: "TaskPrompts", positions: str = "final", code_size: int = 32,
                 threshold: float = 0.5, train_tokens: int = 20_000, seed: int = 0) -> CodeCircuit:
    """Rank heads by codes unique to positive examples; see the module docstring."""
    if positions not in ("final", "all"):
        raise WorkbenchError(f"code positions must be final or all, not {positions!r}")
    start = time.perf_counter()
    prompts = prompts.to(model.cfg.device)
    sites = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    clean, clean_metric = cache_sites(model, prompts.clean, sites, prompts.metric)
    corrupt, corrupt_metric = cache_sites(model, prompts.corrupt, sites, prompts.metric)
    positive = clean_metric > 0
    if int(positive.sum()) < 2:
        raise WorkbenchError(f"the model gets only {int(positive.sum())} of {len(prompts)} prompts right; the codes "
                             "method needs at least 2 positive examples (more prompts, or a model that does the task)")
    unique: dict[tuple[int, int], Tensor] = {}
    heads: list[HeadCodes] = []
    for layer, site in enumerate(sites):
        codebooks = _train_codebooks(model, site, clean[site][positive], corrupt[site], code_size, train_tokens, seed)
        for head, book in enumerate(codebooks):
            row, flags = _head_codes(book, clean[site][positive], corrupt[site], prompts.final_pos[positive],
                                     prompts.final_pos, positions, layer, head)
            heads.append(row)
            unique[(layer, head)] = flags
    heads.sort(key=lambda h: -h.score)
    graph = _code_graph(model, prompts, heads, unique, threshold, clean_metric, corrupt_metric,
                        time.perf_counter() - start, positions, code_size)
    return CodeCircuit(graph, heads, int(positive.sum()), len(prompts))


def _train_codebooks(model, site: str, positive: Tensor, negative: Tensor, code_size: int, tokens: int, seed: int):
    """One k=1 codebook per head on that head's outputs, every position of both sets (the sae trainer)."""
    from sae.dictionary import DictionaryConfig
    from sae.train import TrainConfig, tensor_source, train_dictionaries

    n_heads, d_head = positive.shape[-2:]
    x = torch.cat([positive.flatten(0, 1), negative.flatten(0, 1)]).flatten(1).float()  # [samples, n_heads * d_head]
    batch = min(256, x.shape[0])
    size = min(code_size, x.shape[0])
    configs = [DictionaryConfig(name=f"codes-{site}-h{h}", arch="codebook", d_in=d_head, d_sae=size, k=1,
                                model=str(model.cfg.model_name), site=site, site_shape=(n_heads, d_head), head=h)
               for h in range(n_heads)]
    result = train_dictionaries(configs, tensor_source(x, batch_size=batch, seed=seed),
                                TrainConfig(tokens=max(tokens, batch), batch_size=batch, seed=seed, device=str(x.device)),
                                progress=False)
    return result.dictionaries


def _head_codes(book, positive: Tensor, negative: Tensor, pos_final: Tensor, neg_final: Tensor, positions: str,
                layer: int, head: int) -> tuple[HeadCodes, Tensor]:
    """A head's codes per example (final position, or the tuple over positions) and which positives are unique."""
    with torch.no_grad():
        pos_codes = book.codes(book.site_input(positive.flatten(2)))[..., 0]  # [n_pos_examples, pos]
        neg_codes = book.codes(book.site_input(negative.flatten(2)))[..., 0]
    pos_keys = _keys(pos_codes, pos_final, positions)
    neg_keys = set(_keys(neg_codes, neg_final, positions))
    flags = torch.tensor([k not in neg_keys for k in pos_keys])
    unique = {k for k in pos_keys if k not in neg_keys}
    return HeadCodes(layer, head, float(flags.float().mean()), len(set(pos_keys)), len(neg_keys), len(unique)), flags


def _keys(codes: Tensor, final: Tensor, positions: str) -> list[tuple[int, ...]]:
    if positions == "final":
        return [(int(codes[i, final[i]]),) for i in range(codes.shape[0])]
    return [tuple(codes[i, : int(final[i]) + 1].tolist()) for i in range(codes.shape[0])]


def _code_graph(model, prompts, heads: list[HeadCodes], unique: dict, threshold: float, clean_metric, corrupt_metric,
                runtime: float, positions: str, code_size: int) -> Graph:
    nodes = [Node("head", h.layer, -1, h.head) for h in sorted(heads, key=lambda h: (h.layer, h.head))]
    score = {(h.layer, h.head): h.score for h in heads}
    n = len(nodes)
    adjacency = torch.zeros(n, n)
    for t, target in enumerate(nodes):
        for s, source in enumerate(nodes):
            if source.layer < target.layer:
                both = unique[(source.layer, source.head)] & unique[(target.layer, target.head)]
                adjacency[t, s] = float(both.float().mean())
    scores = torch.tensor([score[(node.layer, node.head)] for node in nodes])
    node_mask = scores >= threshold
    info = graph_info(model, prompts, "codes", "code", clean_metric, corrupt_metric, runtime,
                      {"positions": positions, "code_size": code_size, "threshold": threshold})
    return Graph(nodes, scores, adjacency, info, node_mask=node_mask, edge_mask=(adjacency > 0) & node_mask[:, None] & node_mask[None])
