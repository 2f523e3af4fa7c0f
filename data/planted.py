"""Planted-circuit models: GPT-2s whose induction circuit is set by hand, so circuit methods can be scored.

A circuit-discovery method is only as trustworthy as its agreement with a known
answer. These models are built, not trained: every weight of the circuit is
written by `build_planted`, every other weight is small random noise, and the
ground truth is saved as `ground_truth.json` beside the HuggingFace weights.

The circuit (Olsson et al. 2022, "In-context learning and induction heads"):

1. Embeddings write a token code `e_T(x)` (subspace T), a one-hot position code
   `p(t)` (subspace P) and a constant direction (CONST). Every designed
   direction is orthogonal to the all-ones vector, so LayerNorm's centring is a
   no-op on them and its scale is predictable.
2. A previous-token head at `prev_head`: its QK circuit maps `p(t)` to `p(t-1)`,
   so position t attends to t-1; its OV circuit copies T into PREV, so the
   residual at t holds `e_PREV(x[t-1])`.
3. Optionally a relay MLP at `relay_mlp` copies PREV into RELAY exactly, using
   gelu(z) - gelu(-z) = z on paired hidden units (so the MLP is in the circuit).
4. An induction head at `induction_head` (K-composition): its query reads the
   current token's code in T, its key reads PREV (or RELAY), so position t
   attends to the position s whose previous token equals the current token; a
   weaker QK term from CONST to `p(0)` makes BOS the default sink. Its OV circuit
   copies T at the attended position into OUT.
5. The unembedding (untied) reads OUT only: the logit of token v is the scaled
   code `e_OUT(v)`, so the model predicts the token that followed the earlier
   occurrence of the current token.
6. A decoy head beside the induction head attends uniformly and writes a large
   summary of the prefix into JUNK, which nothing reads: its only effect on the
   metric goes through LayerNorm scales, small but not zero. Every other head
   and MLP is small random noise.

Attention temperatures are moderate on purpose (a planted circuit that saturates
every softmax would defeat gradient methods by construction, not by their fault).

Ground truth (`ground_truth.json`): the circuit's heads and MLPs, its edges
(embed -> previous-token head, previous-token head -> [relay MLP ->] induction
head through K, embed -> induction head through Q and V, induction head ->
logits), the decoy, and the task (`induction`) it was built for.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data import MODELS_DIR
from data.tasks import DataError

GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass(frozen=True)
class PlantedSpec:
    """Where the builder puts each part of the circuit, and how big the model is."""

    name: str
    n_layers: int
    prev_head: tuple[int, int]  # (layer, head) of the previous-token head
    induction_head: tuple[int, int]  # (layer, head) of the induction head
    decoy_head: tuple[int, int]  # (layer, head) of a head that is busy but irrelevant
    relay_mlp: int | None = None  # layer of an MLP that relays PREV -> RELAY, or None (K reads PREV directly)
    n_heads: int = 4
    d_model: int = 192
    n_ctx: int = 48
    d_mlp: int = 256
    vocab_size: int = 512
    seed: int = 0
    prev_score: float = 8.0  # attention logit of t -> t-1 in the previous-token head
    match_score: float = 7.0  # attention logit of a full match in the induction head
    sink_score: float = 3.0  # attention logit of BOS in the induction head
    unembed_gain: float = 1.5
    noise: float = 0.02  # std of the random weights in every non-circuit head and MLP


PLANTED = {
    "planted-induction": PlantedSpec("planted-induction", n_layers=2, prev_head=(0, 2), induction_head=(1, 1),
                                     decoy_head=(1, 3), seed=1),
    "planted-induction-mlp": PlantedSpec("planted-induction-mlp", n_layers=3, prev_head=(0, 1), induction_head=(2, 3),
                                         decoy_head=(2, 0), relay_mlp=1, seed=2),
}


@dataclass(frozen=True)
class GroundTruth:
    """The circuit a planted model holds, in workbench node names."""

    model: str
    task: str
    heads: tuple[tuple[int, int], ...]  # (layer, head) in the circuit
    mlps: tuple[int, ...]  # layers whose MLP is in the circuit
    edges: tuple[tuple[str, str], ...]  # (source, target) component names: embed, L{l}H{h}, MLP{l}, logits
    decoys: tuple[tuple[int, int], ...]  # heads that are active but not in the circuit
    n_layers: int
    n_heads: int

    def components(self) -> set[str]:
        """Circuit components as names: `L{layer}H{head}` and `MLP{layer}`."""
        return {f"L{l}H{h}" for l, h in self.heads} | {f"MLP{l}" for l in self.mlps}


def build_planted(spec: PlantedSpec, directory: str | Path) -> Path:
    """Write the planted model `spec` to `directory` (config, safetensors, tokenizer, ground_truth.json)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    tokenizer = planted_tokenizer(spec.vocab_size)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=spec.n_ctx, n_embd=spec.d_model, n_layer=spec.n_layers,
                        n_head=spec.n_heads, n_inner=spec.d_mlp, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    state = _planted_weights(spec, config.vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith("masked_bias")]
    if real_missing or unexpected:
        raise RuntimeError(f"planted weights do not match GPT-2's layout: missing {real_missing}, unexpected {unexpected}")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    truth = _ground_truth(spec)
    (directory / GROUND_TRUTH_FILE).write_text(json.dumps(asdict(truth) | {"spec": asdict(spec)}, indent=1))
    return directory


def ensure_planted(name: str, root: Path | None = None) -> Path:
    """The directory of planted model `name`, building it first if it is missing (deterministic, about a second)."""
    if name not in PLANTED:
        raise DataError(f"unknown planted model {name!r}; choose one of {', '.join(PLANTED)}")
    directory = (root or MODELS_DIR) / name
    if not _is_current(directory, PLANTED[name]):
        build_planted(PLANTED[name], directory)
    return directory


def _is_current(directory: Path, spec: PlantedSpec) -> bool:
    """Built, complete, and from this spec (a changed spec rebuilds the model)."""
    try:
        saved = json.loads((directory / GROUND_TRUTH_FILE).read_text()).get("spec")
    except (OSError, ValueError):
        return False
    return (directory / "model.safetensors").is_file() and saved == json.loads(json.dumps(asdict(spec)))


def build_all(root: Path | None = None) -> list[Path]:
    """Build every planted model under `root` (default data/models/); used by the model zoo."""
    return [build_planted(spec, (root or MODELS_DIR) / name) for name, spec in PLANTED.items()]


def load_ground_truth(name_or_dir: str | Path) -> GroundTruth:
    """The ground truth saved beside a planted model (a planted name or its directory)."""
    directory = ensure_planted(str(name_or_dir)) if str(name_or_dir) in PLANTED else Path(name_or_dir)
    path = directory / GROUND_TRUTH_FILE
    if not path.is_file():
        raise DataError(f"{directory} has no {GROUND_TRUTH_FILE}: it is not a planted-circuit model")
    raw = json.loads(path.read_text())
    return GroundTruth(model=raw["model"], task=raw["task"], heads=tuple(tuple(h) for h in raw["heads"]),
                       mlps=tuple(raw["mlps"]), edges=tuple(tuple(e) for e in raw["edges"]),
                       decoys=tuple(tuple(h) for h in raw["decoys"]), n_layers=raw["n_layers"], n_heads=raw["n_heads"])


def planted_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer (the circuit works on any token ids; text only makes prompts readable)."""
    import random

    from data.tokenizer import train_tokenizer
    from data.words import NAMES

    rng = random.Random(0)
    texts = [" ".join(rng.choice(NAMES) for _ in range(40)) for _ in range(200)]
    return train_tokenizer(texts, vocab_size)


# ---------------------------------------------------------------------------- construction
class _Basis:
    """Named, mutually orthogonal subspaces of the residual stream, all orthogonal to the all-ones vector."""

    def __init__(self, d_model: int, sizes: dict[str, int], generator: torch.Generator):
        need = 1 + sum(sizes.values())
        if need > d_model:
            raise ValueError(f"the planted subspaces need {need} dimensions; d_model is {d_model}")
        raw = torch.randn(d_model, d_model, generator=generator, dtype=torch.float64)
        raw[:, 0] = 1.0  # the first column spans the all-ones direction LayerNorm removes
        q, _ = torch.linalg.qr(raw)
        self.columns: dict[str, torch.Tensor] = {}
        start = 1
        for name, size in sizes.items():
            self.columns[name] = q[:, start:start + size].T.contiguous()  # [size, d_model], orthonormal rows
            start += size

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.columns[name]


def _planted_weights(spec: PlantedSpec, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    D, H, n_ctx = spec.d_model, spec.n_heads, spec.n_ctx
    dh, d_code = D // H, 32
    if dh < n_ctx - 1 or dh < d_code + 1:
        raise ValueError(f"d_head {dh} is too small for n_ctx {n_ctx} and token codes of {d_code} dims")
    B = _Basis(D, {"T": d_code, "P": n_ctx, "PREV": d_code, "RELAY": d_code, "OUT": d_code, "CONST": 1, "JUNK": 8}, g)
    codes = torch.randn(vocab, d_code, generator=g, dtype=torch.float64)
    codes = codes / codes.norm(dim=1, keepdim=True)  # unit token codes
    state: dict[str, torch.Tensor] = {}
    state["transformer.wte.weight"] = codes @ B["T"] + B["CONST"][0]
    state["transformer.wpe.weight"] = B["P"].clone()
    state["lm_head.weight"] = spec.unembed_gain * codes @ B["OUT"]
    for name in ("transformer.ln_f",) + tuple(f"transformer.h.{l}.{ln}" for l in range(spec.n_layers) for ln in ("ln_1", "ln_2")):
        state[f"{name}.weight"] = torch.ones(D, dtype=torch.float64)
        state[f"{name}.bias"] = torch.zeros(D, dtype=torch.float64)
    key_space = "RELAY" if spec.relay_mlp is not None else "PREV"
    for layer in range(spec.n_layers):
        heads = [_random_head(D, dh, spec.noise, g) for _ in range(H)]
        if layer == spec.prev_head[0]:
            heads[spec.prev_head[1]] = _prev_token_head(B, D, dh, n_ctx, spec.prev_score, _ln_gain(D, 3))
        if layer == spec.induction_head[0]:
            scale = _ln_gain(D, 5 if spec.relay_mlp is not None else 4)
            heads[spec.induction_head[1]] = _induction_head(B, D, dh, key_space, spec, scale)
        if layer == spec.decoy_head[0]:
            heads[spec.decoy_head[1]] = _decoy_head(B, D, dh, _ln_gain(D, 4), g)
        w_q, w_k, w_v = (torch.cat([h[i] for h in heads], dim=1) for i in range(3))
        w_o = torch.cat([h[3] for h in heads], dim=0)
        prefix = f"transformer.h.{layer}"
        state[f"{prefix}.attn.c_attn.weight"] = torch.cat([w_q, w_k, w_v], dim=1)  # Conv1D: [d_in, 3 * d_model]
        state[f"{prefix}.attn.c_attn.bias"] = torch.zeros(3 * D, dtype=torch.float64)
        state[f"{prefix}.attn.c_proj.weight"] = w_o
        state[f"{prefix}.attn.c_proj.bias"] = torch.zeros(D, dtype=torch.float64)
        w_in, w_out = _mlp(B, D, spec, layer, g)
        state[f"{prefix}.mlp.c_fc.weight"] = w_in
        state[f"{prefix}.mlp.c_fc.bias"] = torch.zeros(spec.d_mlp, dtype=torch.float64)
        state[f"{prefix}.mlp.c_proj.weight"] = w_out
        state[f"{prefix}.mlp.c_proj.bias"] = torch.zeros(D, dtype=torch.float64)
    return {k: v.float() for k, v in state.items()}


def _ln_gain(d_model: int, n_unit_parts: int) -> float:
    """LayerNorm's scale on a residual made of `n_unit_parts` orthogonal unit vectors (all orthogonal to ones)."""
    return math.sqrt(d_model / n_unit_parts)


def _random_head(D: int, dh: int, noise: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(W_Q, W_K, W_V [D, dh], W_O [dh, D]) of a distractor head: small random weights (output norm about 0.2)."""
    w_q, w_k = (noise * torch.randn(D, dh, generator=g, dtype=torch.float64) for _ in range(2))
    w_v = 0.5 * noise * torch.randn(D, dh, generator=g, dtype=torch.float64)
    w_o = 0.5 * noise * torch.randn(dh, D, generator=g, dtype=torch.float64)
    return w_q, w_k, w_v, w_o


def _zero_head(D: int, dh: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(D, dh, dtype=torch.float64) for _ in range(3)) + (torch.zeros(dh, D, dtype=torch.float64),)


def _prev_token_head(B: _Basis, D: int, dh: int, n_ctx: int, score: float, scale: float) -> tuple[torch.Tensor, ...]:
    """Query at t carries p(t) shifted to slot t-1, key at s carries p(s): the logit is `score` exactly when s = t-1."""
    w_q, w_k, w_v, w_o = _zero_head(D, dh)
    gain = score * math.sqrt(dh) / scale**2  # GPT-2 divides scores by sqrt(d_head); LayerNorm multiplies u by `scale`
    P = B["P"]
    for slot in range(n_ctx - 1):
        w_q[:, slot] = gain * P[slot + 1]
        w_k[:, slot] = P[slot]
    d_code = B["T"].shape[0]
    w_v[:, :d_code] = B["T"].T
    w_o[:d_code] = B["PREV"] / scale
    return w_q, w_k, w_v, w_o


def _induction_head(B: _Basis, D: int, dh: int, key_space: str, spec: PlantedSpec, scale: float) -> tuple[torch.Tensor, ...]:
    """Query = current token code, key = previous-token code (K-composition), value = token code -> OUT."""
    w_q, w_k, w_v, w_o = _zero_head(D, dh)
    d_code = B["T"].shape[0]
    w_q[:, :d_code] = (spec.match_score * math.sqrt(dh) / scale**2) * B["T"].T
    w_k[:, :d_code] = B[key_space].T
    w_q[:, d_code] = (spec.sink_score * math.sqrt(dh) / scale**2) * B["CONST"][0]  # every query looks a little at BOS
    w_k[:, d_code] = B["P"][0]
    w_v[:, :d_code] = B["T"].T
    w_o[:d_code] = B["OUT"] / scale
    return w_q, w_k, w_v, w_o


def _decoy_head(B: _Basis, D: int, dh: int, scale: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Uniform attention, a large summary of the prefix's token codes written into JUNK (read by nothing)."""
    w_q, w_k, w_v, w_o = _zero_head(D, dh)
    d_code, d_junk = B["T"].shape[0], B["JUNK"].shape[0]
    mix = torch.randn(d_code, d_junk, generator=g, dtype=torch.float64) / math.sqrt(d_code)
    w_v[:, :d_junk] = B["T"].T @ mix
    w_o[:d_junk] = 3.0 * B["JUNK"] / scale
    return w_q, w_k, w_v, w_o


def _mlp(B: _Basis, D: int, spec: PlantedSpec, layer: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_fc [D, d_mlp], c_proj [d_mlp, D]): small random, or the exact PREV -> RELAY relay on paired hidden units."""
    w_in = spec.noise * torch.randn(D, spec.d_mlp, generator=g, dtype=torch.float64)
    w_out = 0.2 * spec.noise * torch.randn(spec.d_mlp, D, generator=g, dtype=torch.float64)
    if layer != spec.relay_mlp:
        return w_in, w_out
    d_code = B["PREV"].shape[0]
    scale = _ln_gain(D, 4)
    w_in[:, : 2 * d_code] = 0.0
    w_out[: 2 * d_code] = 0.0
    for i in range(d_code):  # gelu(z) - gelu(-z) = z, exactly, for gelu_new as for gelu
        w_in[:, 2 * i] = B["PREV"][i]
        w_in[:, 2 * i + 1] = -B["PREV"][i]
        w_out[2 * i] = B["RELAY"][i] / scale
        w_out[2 * i + 1] = -B["RELAY"][i] / scale
    return w_in, w_out


def _ground_truth(spec: PlantedSpec) -> GroundTruth:
    prev, ind = f"L{spec.prev_head[0]}H{spec.prev_head[1]}", f"L{spec.induction_head[0]}H{spec.induction_head[1]}"
    edges = [("embed", prev), ("embed", ind), (ind, "logits")]
    if spec.relay_mlp is not None:
        edges += [(prev, f"MLP{spec.relay_mlp}"), (f"MLP{spec.relay_mlp}", ind)]
    else:
        edges.append((prev, ind))
    return GroundTruth(model=spec.name, task="induction", heads=(spec.prev_head, spec.induction_head),
                       mlps=(spec.relay_mlp,) if spec.relay_mlp is not None else (), edges=tuple(edges),
                       decoys=(spec.decoy_head,), n_layers=spec.n_layers, n_heads=spec.n_heads)
