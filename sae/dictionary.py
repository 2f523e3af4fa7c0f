"""One dictionary type for every sparse dictionary: SAEs, transcoders, codebooks, attention-output SAEs.

A dictionary reads activations `x` at `site` and writes a prediction of the
activations at `target_site` (the same site for an SAE, another one for a
transcoder) through `d_sae` sparse features:

    x_in  = x - b_dec            (SAEs only: `apply_b_dec_to_input`)
    pre   = x_in @ W_enc + b_enc                          # [..., d_sae]
    f     = activation(pre)      (the variant: `cfg.arch`)
    y_hat = f @ W_dec + b_dec  [+ x @ W_skip]             # [..., d_out]

Variants are data (`cfg.arch`), not subclasses. At inference every variant is
a per-token rule, so a feature's value never depends on the rest of the batch:

| arch           | training selection                                | inference rule                 |
|----------------|---------------------------------------------------|--------------------------------|
| relu           | ReLU, L1 penalty weighted by decoder norms        | ReLU                           |
| topk           | k largest per token                               | the same                       |
| batchtopk      | k*batch largest over the batch                    | pre > threshold (global)       |
| mutual_choice  | k*batch largest over the batch (+ aux_zipf_loss)  | pre > threshold (global)       |
| feature_choice | each feature takes its k*batch/d_sae best tokens  | pre > threshold[feature]       |
| matryoshka     | BatchTopK, loss summed over nested prefixes       | pre > threshold (global)       |
| jumprelu       | pre * H(pre - threshold), STE, L0 penalty         | the same                       |
| codebook       | k codes with the largest cosine, each weight 1    | the same                       |

`threshold` is a raw float32 vector (never a log), kept in float32 whatever the
weights' dtype. A codebook's `W_dec` is the codebook; `W_enc` is the unit-norm
codebook transposed (selection by cosine similarity with the centred input
x - b_dec) and a feature's value is 1 when its code is chosen, so
`decode(encode(x))` is b_dec plus the sum of the chosen codes.

Attention-output SAEs read `blocks.L.attn.hook_z` flattened over heads
(`site_shape = (n_heads, d_head)`, `d_in = n_heads * d_head`);
`head_attribution()` splits each feature's decoder weight over heads and
`head_contributions(x)` splits each pre-activation exactly into per-head terms.
`cfg.head` restricts a dictionary to one head's slice of `hook_z` (per-head codebooks).

Weights are saved in the model's own units: the fixed-norm input scaling used
in training is folded in (see `fold_scale`). Files: `cfg.json` (this config as
JSON) + `dictionary.safetensors`; `Dictionary.load` also reads the SAELens and
sparsify layouts (see `sae.interop`). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import einops
import torch
from torch import Tensor, nn

from workbench.errors import WorkbenchError

ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka", "feature_choice", "mutual_choice", "codebook")
K_ARCHS = frozenset({"topk", "batchtopk", "matryoshka", "feature_choice", "mutual_choice", "codebook"})
THRESHOLD_ARCHS = frozenset({"jumprelu", "batchtopk", "matryoshka", "feature_choice", "mutual_choice"})
FORMAT = "workbench-dictionary/1"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "dictionary.safetensors"


@dataclass(frozen=True)
class DictionaryConfig:
    """What a dictionary is, where it reads and writes, and how it activates."""

    name: str
    """Name in the workspace (`dictionaries/<name>/`)."""
    arch: str
    """Variant: one of ARCHS."""
    d_in: int
    """Width of the input (the site's flat width, or d_head when `head` is set)."""
    d_sae: int
    """Number of features (codes, for a codebook)."""
    d_out: int = 0
    """Width of the output; 0 means d_in (an SAE)."""
    k: int | None = None
    """Active features per token: exact for topk/codebook, the average for the batch-level variants; for
    jumprelu, the L0 its thresholds start at (optional)."""
    model: str | None = None
    """Model the activations came from."""
    site: str | None = None
    """Hook name read (e.g. `blocks.1.ln2.hook_normalized`)."""
    target_site: str | None = None
    """Hook name predicted; None for an SAE (target = site)."""
    site_shape: tuple[int, ...] | None = None
    """Per-token shape of `site` (e.g. (n_heads, d_head) for attn.hook_z); None when flat."""
    head: int | None = None
    """Read only this head's slice of a hook_z site."""
    skip: bool = False
    """Linear skip connection x @ W_skip (transcoders)."""
    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec before encoding; defaults to True for SAEs, False otherwise."""
    prefixes: tuple[int, ...] | None = None
    """Matryoshka nested dictionary sizes, increasing, the last equal to d_sae."""
    input_scale: float = 1.0
    """The fixed-norm scale training used (already folded into the saved weights; kept as a record)."""
    dtype: str = "float32"
    """Weights dtype (the threshold is always float32)."""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)
    """Provenance: training tokens, corpus, training config, final metrics."""

    def __post_init__(self):
        if not self.d_out:
            object.__setattr__(self, "d_out", self.d_in)
        if self.apply_b_dec_to_input is None:
            object.__setattr__(self, "apply_b_dec_to_input", self.is_sae)
        if self.arch == "matryoshka" and not self.prefixes:
            object.__setattr__(self, "prefixes", default_prefixes(self.d_sae))
        for name in ("site_shape", "prefixes"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        check_config(self)

    @property
    def is_sae(self) -> bool:
        return self.target_site is None or self.target_site == self.site

    @property
    def n_heads(self) -> int | None:
        """Heads of a hook_z input read whole (attention-output SAE), else None."""
        if self.site_shape is not None and len(self.site_shape) == 2 and self.head is None:
            return self.site_shape[0]
        return None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "DictionaryConfig":
        known = {f.name for f in fields(cls)}
        if data.get("arch") not in ARCHS:
            raise WorkbenchError(f"unknown architecture {data.get('arch')!r}; choose one of {', '.join(ARCHS)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def check_config(cfg: DictionaryConfig) -> None:
    """Raise one line for a config that cannot describe a working dictionary."""
    if cfg.arch not in ARCHS:
        raise WorkbenchError(f"unknown architecture {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
    if cfg.d_in <= 0 or cfg.d_sae <= 0 or cfg.d_out <= 0:
        raise WorkbenchError(f"dictionary widths must be positive (d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out})")
    if cfg.arch in K_ARCHS and (cfg.k is None or cfg.k < 1):
        raise WorkbenchError(f"architecture {cfg.arch} needs k >= 1 (active features per token); pass --k")
    if cfg.k is not None and cfg.arch in K_ARCHS | {"jumprelu"}:
        if cfg.k < 1:
            raise WorkbenchError(f"k must be at least 1, got {cfg.k}")
        if cfg.k > cfg.d_sae:
            raise WorkbenchError(f"k={cfg.k} is larger than d_sae={cfg.d_sae}: a token cannot use more features than exist")
    if cfg.prefixes is not None:
        p = list(cfg.prefixes)
        if any(b <= a for a, b in zip(p, p[1:])) or p[0] < 1 or p[-1] != cfg.d_sae:
            raise WorkbenchError(f"matryoshka prefixes {p} must increase and end at d_sae={cfg.d_sae}")
    if cfg.apply_b_dec_to_input and cfg.d_out != cfg.d_in:
        raise WorkbenchError("apply_b_dec_to_input needs d_out == d_in (only SAEs subtract b_dec from their input)")
    if cfg.head is not None:
        if cfg.site_shape is None or len(cfg.site_shape) != 2:
            raise WorkbenchError(f"head {cfg.head} needs a per-head site (shape (n_heads, d_head)), got shape {cfg.site_shape}")
        if not 0 <= cfg.head < cfg.site_shape[0]:
            raise WorkbenchError(f"head {cfg.head} is out of range: the site has {cfg.site_shape[0]} heads")
        if cfg.d_in != cfg.site_shape[1]:
            raise WorkbenchError(f"a single-head dictionary reads d_head={cfg.site_shape[1]} values, not d_in={cfg.d_in}")
    elif cfg.site_shape is not None and math.prod(cfg.site_shape) != cfg.d_in:
        raise WorkbenchError(f"d_in={cfg.d_in} does not match the site's width {math.prod(cfg.site_shape)} (shape {cfg.site_shape})")


def default_prefixes(d_sae: int, levels: int = 5) -> tuple[int, ...]:
    """Nested sizes doubling up to d_sae: d_sae/16, /8, /4, /2, d_sae (fewer when d_sae is small)."""
    sizes = sorted({max(1, d_sae >> i) for i in range(levels)})
    return tuple(sizes)


class DictionaryOutput(NamedTuple):
    output: Tensor  # [..., d_out] the reconstruction / prediction (skip term included)
    features: Tensor  # [..., d_sae] feature activations


class Dictionary(nn.Module):
    """A sparse dictionary; see the module docstring for the maths and the variants."""

    def __init__(self, cfg: DictionaryConfig, *, device: str | torch.device = "cpu", seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        dtype = _dtype(cfg.dtype)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if cfg.arch == "relu":
            W_dec *= 0.1  # Anthropic's April 2024 recipe: small decoder, L1 weighted by its norms
        W_enc = W_dec.T.clone() if cfg.d_in == cfg.d_out else torch.randn(cfg.d_in, cfg.d_sae, generator=gen) / math.sqrt(cfg.d_in)
        self.W_enc = nn.Parameter(W_enc.contiguous().to(device, dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.contiguous().to(device, dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, device=device, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_out, device=device, dtype=dtype)) if cfg.skip else None
        threshold = torch.zeros(cfg.d_sae, device=device, dtype=torch.float32)
        if cfg.arch == "jumprelu":
            self.threshold = nn.Parameter(threshold)
        else:
            self.register_buffer("threshold", threshold if cfg.arch in THRESHOLD_ARCHS else None)
        if cfg.arch == "codebook":
            self.tie_codebook_()

    # ------------------------------------------------------------------ maths
    def pre_activations(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae]: x_in @ W_enc + b_enc."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae] feature activations (the per-token inference rule; differentiable)."""
        return self.activate(self.pre_activations(x))

    def activate(self, pre: Tensor) -> Tensor:
        """The variant's per-token activation applied to pre-activations."""
        arch = self.cfg.arch
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            values, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
        if arch == "codebook":
            idx = pre.topk(self.cfg.k, dim=-1).indices
            return torch.zeros_like(pre).scatter(-1, idx, 1.0)
        threshold = self.threshold.to(pre.dtype)
        return torch.relu(pre) * (pre > threshold)  # = pre * (pre > threshold) for the non-negative thresholds we train

    def decode(self, features: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_out]: features @ W_dec + b_dec (the skip term needs x: see forward)."""
        return features.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> DictionaryOutput:
        features = self.encode(x)
        output = self.decode(features)
        if self.W_skip is not None:
            output = output + x.to(self.W_skip.dtype) @ self.W_skip
        return DictionaryOutput(output, features)

    def codes(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., k] indices of the chosen codes (codebooks), or of the k largest features."""
        k = self.cfg.k or 1
        return self.pre_activations(x).topk(k, dim=-1).indices

    # ------------------------------------------------------------------ attention-output SAEs
    @torch.no_grad()
    def head_attribution(self) -> Tensor:
        """[d_sae, n_heads]: each feature's share of decoder weight norm per head (rows sum to 1).

        Uses the decoder when the output is the per-head site (attention-output SAE), the
        encoder otherwise (a transcoder reading hook_z).
        """
        n_heads = self._require_heads()
        if self.cfg.is_sae:
            per_head = einops.rearrange(self.W_dec, "f (h d) -> f h d", h=n_heads)
        else:
            per_head = einops.rearrange(self.W_enc, "(h d) f -> f h d", h=n_heads)
        norms = per_head.float().norm(dim=-1)
        return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)

    def head_contributions(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., n_heads, d_sae]: per-head terms of the pre-activations.

        Exact split: `head_contributions(x).sum(-2) + b_enc == pre_activations(x)`.
        """
        n_heads = self._require_heads()
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        x_heads = einops.rearrange(x, "... (h d) -> ... h d", h=n_heads)
        W_heads = einops.rearrange(self.W_enc, "(h d) f -> h d f", h=n_heads)
        return einops.einsum(x_heads, W_heads, "... h d, h d f -> ... h f")

    def _require_heads(self) -> int:
        if self.cfg.n_heads is None:
            raise WorkbenchError(f"dictionary {self.cfg.name} does not read a per-head site (site shape {self.cfg.site_shape})")
        return self.cfg.n_heads

    # ------------------------------------------------------------------ site plumbing
    def site_input(self, activation: Tensor) -> Tensor:
        """A site activation [..., *site_shape] or [..., width] -> this dictionary's input [..., d_in]."""
        cfg = self.cfg
        if cfg.site_shape is not None and tuple(activation.shape[-len(cfg.site_shape):]) == cfg.site_shape and len(cfg.site_shape) > 1:
            flat = activation.flatten(-len(cfg.site_shape))
        else:
            flat = activation
        width = math.prod(cfg.site_shape) if cfg.site_shape is not None else cfg.d_in
        if flat.shape[-1] != width:
            raise WorkbenchError(f"dictionary {cfg.name} expects width {width} at {cfg.site}, got activations of width {flat.shape[-1]}")
        if cfg.head is not None:
            n_heads, d_head = cfg.site_shape
            return flat.reshape(*flat.shape[:-1], n_heads, d_head)[..., cfg.head, :]
        return flat

    def write_site(self, prediction: Tensor, original: Tensor) -> Tensor:
        """Place a prediction [..., d_out] into a tensor shaped like the target site's `original`."""
        if self.cfg.head is not None and self.cfg.is_sae:
            out = original.clone()
            out[..., self.cfg.head, :] = prediction.to(original.dtype)
            return out
        return prediction.to(original.dtype).reshape(original.shape)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def tie_codebook_(self) -> None:
        """A codebook selects by cosine: W_enc = unit-norm codes, transposed; no encoder bias."""
        codes = self.W_dec.float()
        self.W_enc.copy_((codes / codes.norm(dim=1, keepdim=True).clamp_min(1e-12)).T.to(self.W_enc.dtype))
        self.b_enc.zero_()

    @torch.no_grad()
    def fold_scale(self, scale_in: float, scale_out: float) -> None:
        """Turn weights trained on (x * scale_in -> y * scale_out) into weights on the model's own units.

        Features are rescaled by 1/scale_out so the decoder rows keep their norms:
        W_enc *= scale_in/scale_out, b_enc /= scale_out, threshold /= scale_out,
        b_dec /= scale_out, W_skip *= scale_in/scale_out. A codebook keeps unit
        feature values and scales its codes instead (W_dec /= scale_out).
        """
        if self.cfg.arch == "codebook":
            self.W_dec.div_(scale_out)
            self.b_dec.div_(scale_out)
            return
        self.W_enc.mul_(scale_in / scale_out)
        self.b_enc.div_(scale_out)
        self.b_dec.div_(scale_out)
        if self.threshold is not None:
            self.threshold.div_(scale_out)
        if self.W_skip is not None:
            self.W_skip.mul_(scale_in / scale_out)

    def tensors(self) -> dict[str, Tensor]:
        """The weights by their canonical names (contiguous, on CPU)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.W_skip is not None:
            out["W_skip"] = self.W_skip
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, Tensor], source: str = "") -> None:
        """Copy named weights in, checking names and shapes (one line per problem)."""
        expected = {k: v.shape for k, v in self.tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise WorkbenchError(f"weights {source} lack {', '.join(missing)} for a {self.cfg.arch} dictionary")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != tuple(shape):
                raise WorkbenchError(f"weights {source}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
            getattr(self, key).copy_(tensors[key])

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write cfg.json + dictionary.safetensors (weights first, each atomically; cfg.json marks it complete)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_FILE}.{uuid.uuid4().hex[:8]}.tmp"
        save_file(self.tensors(), str(tmp), metadata={"format": FORMAT, "name": self.cfg.name})
        os.replace(tmp, directory / WEIGHTS_FILE)
        _atomic_json(directory / CFG_FILE, self.cfg.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "Dictionary":
        """Load a dictionary folder: the workbench layout, or an SAELens or sparsify one."""
        directory = Path(directory)
        cfg_path = directory / CFG_FILE
        if not cfg_path.is_file():
            raise WorkbenchError(f"{directory} is not a dictionary: it has no {CFG_FILE}")
        try:
            data = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise WorkbenchError(f"{cfg_path} is not valid JSON: {' '.join(str(e).split())}") from e
        if data.get("format") != FORMAT:
            from sae import interop

            return interop.load_foreign(directory, data, device=device)
        cfg = DictionaryConfig.from_json(data)
        dictionary = cls(cfg, device=device, seed=None)
        dictionary.load_tensors(read_safetensors(directory / WEIGHTS_FILE), source=str(directory / WEIGHTS_FILE))
        return dictionary.eval()

    def with_config(self, **changes) -> "Dictionary":
        """A copy with config fields changed (same weights)."""
        other = Dictionary(replace(self.cfg, **changes), device=self.W_enc.device, seed=None)
        other.load_tensors(self.tensors())
        return other


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file, or one line saying why not (missing, truncated, corrupt)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise WorkbenchError(f"weights file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WorkbenchError(f"weights file {path} is truncated or corrupt ({' '.join(str(e).split())[:160]})") from e


def load_dictionary(workspace, name: str, device: str | torch.device = "cpu") -> Dictionary:
    """The dictionary `name` of a workspace (`dictionaries/<name>/`), or a one-line error listing those there are."""
    from workbench.workspace import check_name

    check_name(name, "dictionary name")
    directory = workspace.dictionaries_dir / name
    if not (directory / CFG_FILE).is_file():
        available = workspace.dictionary_names()
        hint = f"; the workspace has {', '.join(available)}" if available else "; the workspace has none (train one with `python -m workbench train`)"
        raise WorkbenchError(f"no dictionary {name!r} in {workspace.root}{hint}")
    return Dictionary.load(directory, device=device)


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise WorkbenchError(f"unknown dictionary dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def _atomic_json(path: Path, data: dict) -> None:
    from workbench.workspace import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1))
