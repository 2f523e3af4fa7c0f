"""Per-feature tables of a dictionary, streamed over activations with bounded memory.

For every feature: density, mean activation when active, max activation, the
top-activating contexts (a token window around the max, with the feature's
activation on every token of the window), samples from activation quantiles,
the output tokens its decoder direction promotes and suppresses through the
unembedding, and its most similar features by decoder cosine; for per-head
(attention-output) dictionaries, each feature's share of decoder weight per head.

Streaming in three passes over a source of (seq_ids, positions, acts) chunks:

1. density, sum, max and the running top-`n_top` per feature: each chunk's
   [rows, d_sae] features are merged into an [d_sae, n_top] buffer by one topk;
2. quantile samples: (0, max] of each feature is cut into `n_quantiles` equal
   intervals and each (feature, interval) keeps a uniform sample of `n_samples`
   activations: every active entry draws a random key and the smallest keys per
   group survive (a bottom-k sketch, merged chunk by chunk by one sort);
3. the token windows of the chosen examples and the feature's activation on every
   window position, filled in one more streaming pass (sorted-key lookups per chunk).

Memory is O(d_sae * (n_top + n_quantiles * n_samples)) plus one chunk.
Sources: `model_source` (runs the model on token rows; no cache needed) and
`StoreSource` (the activation store, `workbench/store.py`).
Tables (written with `Workspace.write_db` as `db/features-<dictionary>.duckdb`):
`features` and `feature_examples` (columns in docs/sae.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple, Protocol

import torch
from torch import Tensor

from sae.dictionary import Dictionary
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


class Chunk(NamedTuple):
    seq_ids: Tensor  # [rows] long
    positions: Tensor  # [rows] long
    acts: Tensor  # [rows, width] the site's activations


class ActivationSource(Protocol):
    def scan(self, rows: int) -> Iterator[Chunk]: ...
    def tokens(self, seq_ids: Tensor) -> Tensor: ...  # [m, ctx] token rows


@dataclass(frozen=True)
class FeatureTableConfig:
    n_top: int = 10
    """Top-activating examples kept per feature."""
    n_quantiles: int = 5
    """Equal-width activation intervals of (0, max] sampled per feature."""
    n_samples: int = 3
    """Examples sampled per interval."""
    window_before: int = 8
    """Tokens shown before the example's position."""
    window_after: int = 4
    """Tokens shown after it."""
    n_logits: int = 10
    """Promoted and suppressed output tokens per feature."""
    n_similar: int = 5
    """Most similar features (decoder cosine) per feature."""
    chunk_rows: int = 2048
    """Activations encoded at once (bounds memory)."""
    seed: int = 0


class FeatureTables(NamedTuple):
    features: list[dict]
    examples: list[dict]
    tokens: int


# ====================================================================== the passes
@torch.no_grad()
def feature_tables(d: Dictionary, source: ActivationSource, cfg: FeatureTableConfig = FeatureTableConfig(),
                   model: "TransformerBridge | None" = None, progress: bool = False) -> FeatureTables:
    """Compute both tables for dictionary `d` over `source` (see the module docstring)."""
    stats = _first_pass(d, source, cfg, progress)
    if stats.n == 0:
        raise WorkbenchError(f"no activations to summarise for dictionary {d.cfg.name}")
    samples = _quantile_pass(d, source, cfg, stats.max)
    examples = _examples(d, source, cfg, stats, samples)
    rows = _feature_rows(d, cfg, stats, model)
    return FeatureTables(rows, examples, stats.n)


class _Stats(NamedTuple):
    n: int
    count: Tensor  # [d_sae] tokens active
    total: Tensor  # [d_sae] sum of activations
    max: Tensor  # [d_sae]
    top_vals: Tensor  # [d_sae, n_top]
    top_seq: Tensor
    top_pos: Tensor


def _first_pass(d: Dictionary, source, cfg: FeatureTableConfig, progress: bool) -> _Stats:
    f = d.cfg.d_sae
    count, total = torch.zeros(f, dtype=torch.float64), torch.zeros(f, dtype=torch.float64)
    top_vals = torch.full((f, cfg.n_top), -float("inf"))
    top_seq = torch.zeros((f, cfg.n_top), dtype=torch.long)
    top_pos = torch.zeros((f, cfg.n_top), dtype=torch.long)
    n = 0
    for chunk in _progress(source.scan(cfg.chunk_rows), progress, f"features {d.cfg.name}"):
        feats = _encode(d, chunk.acts)  # [rows, d_sae]
        n += feats.shape[0]
        count += (feats > 0).sum(0).double()
        total += feats.sum(0).double()
        merged = torch.cat([top_vals, feats.T], 1)
        seqs = torch.cat([top_seq, chunk.seq_ids.expand(f, -1)], 1)
        poss = torch.cat([top_pos, chunk.positions.expand(f, -1)], 1)
        top_vals, idx = merged.topk(cfg.n_top, dim=1)
        top_seq, top_pos = seqs.gather(1, idx), poss.gather(1, idx)
    mx = top_vals[:, 0].clamp_min(0)
    return _Stats(n, count, total, mx, top_vals, top_seq, top_pos)


def _quantile_pass(d: Dictionary, source, cfg: FeatureTableConfig, mx: Tensor) -> dict[str, Tensor]:
    """Uniform samples per (feature, activation interval) by keeping the smallest random keys per group."""
    q, s = cfg.n_quantiles, cfg.n_samples
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = {"group": torch.zeros(0, dtype=torch.long), "key": torch.zeros(0), "value": torch.zeros(0),
            "seq": torch.zeros(0, dtype=torch.long), "pos": torch.zeros(0, dtype=torch.long)}
    for chunk in source.scan(cfg.chunk_rows):
        feats = _encode(d, chunk.acts)
        rows, cols = (feats > 0).nonzero(as_tuple=True)
        values = feats[rows, cols]
        interval = (values / mx[cols].clamp_min(1e-12) * q).ceil().long().clamp(1, q) - 1
        new = {"group": cols * q + interval, "key": torch.rand(values.shape, generator=gen), "value": values,
               "seq": chunk.seq_ids[rows], "pos": chunk.positions[rows]}
        keep = _bottom_k({k: torch.cat([keep[k], new[k]]) for k in keep}, s)
    return keep


def _bottom_k(entries: dict[str, Tensor], s: int) -> dict[str, Tensor]:
    """The `s` entries with the smallest keys in each group (returned sorted by group, then key)."""
    order = entries["key"].argsort()
    order = order[entries["group"][order].argsort(stable=True)]
    chosen = order[_rank_in_group(entries["group"][order]) < s]
    return {k: v[chosen] for k, v in entries.items()}


def _rank_in_group(group: Tensor) -> Tensor:
    """Position of each entry within its run of equal group ids (the input is sorted by group)."""
    if group.numel() == 0:
        return group
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    starts = torch.cummax(torch.where(first, torch.arange(group.numel()), 0), 0).values
    return torch.arange(group.numel()) - starts


def _examples(d: Dictionary, source, cfg: FeatureTableConfig, stats: _Stats, samples: dict[str, Tensor]) -> list[dict]:
    """Rows of feature_examples: top and quantile examples with their token windows and window activations."""
    top = (stats.top_vals > 0).nonzero()
    q = cfg.n_quantiles
    feat = torch.cat([top[:, 0], samples["group"] // q])
    seq = torch.cat([stats.top_seq[top[:, 0], top[:, 1]], samples["seq"]])
    pos = torch.cat([stats.top_pos[top[:, 0], top[:, 1]], samples["pos"]])
    value = torch.cat([stats.top_vals[top[:, 0], top[:, 1]], samples["value"]])
    if feat.numel() == 0:
        return []
    seqs, row_of = torch.unique(seq, return_inverse=True)
    token_rows = source.tokens(seqs)
    lo = (pos - cfg.window_before).clamp_min(0)
    hi = (pos + cfg.window_after + 1).clamp_max(token_rows.shape[1])
    windows = _window_activations(d, source, cfg, feat, seq, lo, hi)
    n_top = top.shape[0]
    sample_rank = _rank_in_group(samples["group"])
    out = []
    for i in range(feat.numel()):
        is_top = i < n_top
        a, b = int(lo[i]), int(hi[i])
        out.append({"dictionary": d.cfg.name, "feature": int(feat[i]), "kind": "top" if is_top else "quantile",
                    "rank": int(top[i, 1]) if is_top else int(sample_rank[i - n_top]), "quantile": None if is_top else int(samples["group"][i - n_top] % q),
                    "activation": float(value[i]), "seq_id": int(seq[i]), "pos": int(pos[i]), "center": int(pos[i]) - a,
                    "window_tokens": token_rows[row_of[i], a:b].tolist(), "window_activations": windows[i]})
    return out


def _window_activations(d: Dictionary, source, cfg: FeatureTableConfig, feat: Tensor, seq: Tensor, lo: Tensor,
                        hi: Tensor) -> list[list[float]]:
    """Each example's feature activation on every token of its window, filled in one streaming pass.

    Every (example, window position) pair gets a key seq * 2^20 + pos; each chunk's
    keys are sorted once and the pairs found in it are encoded and filled in.
    """
    lengths = hi - lo
    example = torch.repeat_interleave(torch.arange(feat.numel()), lengths)
    offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    pair_pos = lo[example] + offsets
    pair_key = seq[example] * 2**20 + pair_pos
    pair_feat = feat[example]
    values = torch.zeros(pair_key.numel())
    for chunk in source.scan(cfg.chunk_rows):
        keys, order = (chunk.seq_ids * 2**20 + chunk.positions).sort()
        at = torch.searchsorted(keys, pair_key).clamp_max(keys.numel() - 1)
        hit = keys[at] == pair_key
        if not bool(hit.any()):
            continue
        rows = order[at[hit]]
        needed, local = torch.unique(rows, return_inverse=True)
        feats = _encode(d, chunk.acts[needed])
        values[hit] = feats[local, pair_feat[hit]]
    return [part.tolist() for part in values.split(lengths.tolist())]


def _feature_rows(d: Dictionary, cfg: FeatureTableConfig, stats: _Stats, model) -> list[dict]:
    density = (stats.count / stats.n).float()
    mean_active = (stats.total / stats.count.clamp_min(1)).float()
    similar_idx, similar_cos = similar_features(d, cfg.n_similar)
    logit_lists = _logit_lists(d, model, cfg.n_logits)
    heads = d.head_attribution().tolist() if d.cfg.n_heads is not None else None
    rows = []
    for f in range(d.cfg.d_sae):
        row = {"dictionary": d.cfg.name, "feature": f, "density": float(density[f]), "mean_activation": float(mean_active[f]),
               "max_activation": float(stats.max[f]), "tokens": stats.n,
               "similar_features": similar_idx[f].tolist(), "similar_cosines": similar_cos[f].tolist(),
               "head_attribution": heads[f] if heads is not None else None}
        row.update({k: v[f] for k, v in logit_lists.items()})
        rows.append(row)
    return rows


# ====================================================================== decoder geometry
@torch.no_grad()
def similar_features(d: Dictionary, n: int = 5, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each feature, the `n` other features with the highest decoder cosine: (indices, cosines) [d_sae, n]."""
    w = d.W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = min(n, d.cfg.d_sae - 1)
    idx, cos = [], []
    for start in range(0, w.shape[0], chunk):
        sims = w[start:start + chunk] @ w.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -float("inf")
        top = sims.topk(n, dim=1)
        idx.append(top.indices)
        cos.append(top.values)
    return torch.cat(idx), torch.cat(cos)


@torch.no_grad()
def residual_directions(d: Dictionary, model: "TransformerBridge") -> Tensor | None:
    """Each feature's decoder direction written into the residual stream [d_sae, d_model], or None if it has none.

    Residual-width sites (resid, attn_out, mlp_out, normalized inputs) use W_dec as is;
    attention hook_z goes through W_O; MLP hidden sites go through W_out.
    """
    from workbench.model import site_layer

    cfg = d.cfg
    site = cfg.target_site or cfg.site
    if site is None:
        return None
    w = d.W_dec.detach().float()
    layer = site_layer(site)
    if site.endswith("attn.hook_z") and layer is not None:
        W_O = model.blocks[layer].attn.W_O.detach().float().to(w.device)  # [n_heads, d_head, d_model]
        if cfg.head is not None:
            return w @ W_O[cfg.head]
        return torch.einsum("fhd,hdm->fm", w.reshape(cfg.d_sae, W_O.shape[0], W_O.shape[1]), W_O)
    if site.endswith("mlp.hook_post") and layer is not None:
        return w @ model.blocks[layer].mlp.W_out.detach().float().to(w.device)
    if w.shape[1] == model.cfg.d_model:
        return w
    return None


def _logit_lists(d: Dictionary, model, n: int) -> dict[str, list]:
    names = ("promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits")
    directions = residual_directions(d, model) if model is not None else None
    if directions is None:
        return {k: [None] * d.cfg.d_sae for k in names}
    W_U = model.W_U.detach().float().to(directions.device)
    out = {k: [] for k in names}
    for start in range(0, directions.shape[0], 1024):
        logits = directions[start:start + 1024] @ W_U
        for sign, key in ((1, "promoted"), (-1, "suppressed")):
            top = (sign * logits).topk(min(n, logits.shape[1]), dim=1)
            out[f"{key}_tokens"] += [[_token_text(model, t) for t in row] for row in top.indices.tolist()]
            out[f"{key}_logits"] += (sign * top.values).tolist()
    return out


def _token_text(model, token: int) -> str:
    return model.tokenizer.decode([token])


def _encode(d: Dictionary, acts: Tensor) -> Tensor:
    w = d.W_enc
    return d.encode(d.site_input(acts.to(w.device))).float().cpu()


def _progress(it, progress: bool, desc: str):
    import sys

    from tqdm import tqdm

    return tqdm(it, desc=desc, file=sys.stderr, disable=None if progress else True, leave=False, unit="chunk")


# ====================================================================== sources
class ModelSource:
    """Activations computed on the fly: the model run over token rows [n, ctx] (seq_id = row index)."""

    def __init__(self, model: "TransformerBridge", site: str, token_rows: Tensor, batch_size: int = 8):
        from workbench.model import stop_layer

        self.model, self.site, self.rows, self.batch_size = model, site, token_rows, batch_size
        self.stop = stop_layer(model, [site])

    def scan(self, rows: int) -> Iterator[Chunk]:
        for start in range(0, self.rows.shape[0], self.batch_size):
            seq = torch.arange(start, min(start + self.batch_size, self.rows.shape[0]))
            acts = self._acts(seq)  # [b, ctx, width]
            ctx = acts.shape[1]
            yield Chunk(seq.repeat_interleave(ctx), torch.arange(ctx).repeat(seq.numel()), acts.flatten(0, 1))

    def tokens(self, seq_ids: Tensor) -> Tensor:
        return self.rows[seq_ids]

    @torch.no_grad()
    def _acts(self, seq_ids: Tensor) -> Tensor:
        store = {}

        def grab(x, hook):
            store["x"] = x.flatten(2).float().cpu()
            return x

        device = next(self.model.parameters()).device
        self.model.run_with_hooks(self.rows[seq_ids].to(device), fwd_hooks=[(self.site, grab)], stop_at_layer=self.stop)
        return store["x"]


class StoreSource:
    """The activation store's cached activations of `site` (workbench/store.py) as an ActivationSource."""

    def __init__(self, store, model_name: str, site: str, run: str | None = None, max_rows: int | None = None):
        self.store, self.model_name, self.site, self.run, self.max_rows = store, model_name, site, run, max_rows

    def scan(self, rows: int) -> Iterator[Chunk]:
        for seq_ids, positions, acts in self.store.scan(self.model_name, self.site, rows, run=self.run, max_rows=self.max_rows):
            yield Chunk(seq_ids.long(), positions.long(), acts.float())

    def tokens(self, seq_ids: Tensor) -> Tensor:
        return self.store.tokens(self.model_name, seq_ids, run=self.run, site=self.site).long()


# ====================================================================== writing
def write_feature_tables(workspace, tables: FeatureTables, model) -> None:
    """Publish `db/features-<dictionary>.duckdb` with tables features and feature_examples."""
    import pyarrow as pa

    if not tables.features:
        return
    name = tables.features[0]["dictionary"]
    created = time.time()
    examples = [dict(e, window_text=[_token_text(model, t) for t in e["window_tokens"]] if model is not None else None,
                     created=created) for e in tables.examples]
    features = [dict(r, created=created) for r in tables.features]
    with workspace.write_db(f"features-{name}") as con:
        con.register("features_t", pa.Table.from_pylist(features))
        con.execute("CREATE TABLE features AS SELECT * FROM features_t")
        if examples:
            con.register("examples_t", pa.Table.from_pylist(examples))
            con.execute("CREATE TABLE feature_examples AS SELECT * FROM examples_t")
