"""Model access: one way in, whatever the model.

`load_model(name_or_path)` resolves a name to a local HuggingFace-format
directory and boots it as a TransformerLens 4.3 `TransformerBridge`:

1. a bundled reference model (`ref-gpt2`, the planted-circuit models) resolves to
   its directory under `data/models/`;
2. an existing directory is used as it is (it must hold a `config.json`);
3. anything else is a hub name (`gpt2`, `EleutherAI/pythia-70m`): it is taken
   from the local Hugging Face cache when present, downloaded when the hub is
   reachable, and refused at once (one line, no retry loop) when it is not.

Every model then goes through `TransformerBridge.boot_transformers` and
`enable_compatibility_mode()`, so hook names and numerics are the familiar
HookedTransformer ones (LayerNorm folded, writing weights centred) whatever the
source. A *site* is a hook name string such as `blocks.0.hook_resid_post`; the
bridge accepts legacy aliases and everything downstream is keyed by the string
the user asked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from data import BUNDLED_MODELS, bundled_model_dir, hub_reachable
from workbench.allocator import tune_malloc
from workbench.errors import WorkbenchError
from workbench.errors import one_line as _one_line

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DEFAULT_MODEL = "ref-gpt2"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "merges.txt", "vocab.*"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    process_weights: bool = True,
) -> "TransformerBridge":
    """Boot `name_or_path` as a TransformerBridge in compatibility mode.

    `device` defaults to the best available accelerator, `dtype` to float32.
    `process_weights=False` keeps the raw HF weights (no LayerNorm folding or
    centring), for code that must write weights back in HF layout.
    The source the model came from is kept as `model.cfg.model_name` and the
    resolved directory as `model.workbench_dir`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    name = str(name_or_path)
    directory = resolve_model_dir(name)
    torch_dtype = resolve_dtype(dtype)
    _quiet_transformers()
    _pass_renamed_kv_cache()
    try:
        model = TransformerBridge.boot_transformers(str(directory), device=resolve_device(device), dtype=torch_dtype)
        model.enable_compatibility_mode(disable_warnings=True, no_processing=not process_weights)
    except Exception as e:  # a corrupt file, an unsupported architecture, mismatched shapes: all the input's fault
        raise WorkbenchError(f"cannot load model {name!r} from {directory}: {_one_line(e)}") from e
    model.eval()
    tune_malloc()  # forward passes reuse their temporaries instead of faulting them in again (workbench/allocator.py)
    model.cfg.model_name = name
    model.workbench_dir = directory
    return model


def resolve_model_dir(name: str) -> Path:
    """The local directory `load_model` would boot for `name`, or a WorkbenchError saying why there is none."""
    if name in BUNDLED_MODELS:
        if not (bundled_model_dir(name) / "config.json").is_file():
            raise WorkbenchError(f"bundled model {name!r} is not built; run `python -m workbench zoo build`")
        return _check_model_dir(bundled_model_dir(name), name)
    path = Path(name).expanduser()
    if path.exists():
        return _check_model_dir(path, name)
    if name.startswith((".", "/", "~")) or name.endswith("/") or os.sep in name.strip("/").replace("/", "", 1):
        raise WorkbenchError(f"model directory {name!r} does not exist")
    return _hub_snapshot(name)


def resolve_device(device: str | torch.device | None = None) -> str:
    """`device` if given, else cuda when present, else cpu."""
    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise WorkbenchError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class SiteInfo(NamedTuple):
    """What a hook site produces per token: its shape after (batch, pos), and the flat width stored."""

    site: str
    shape: tuple[int, ...]  # e.g. (d_model,) or (n_heads, d_head) for attn.hook_z
    width: int  # product of shape


def list_sites(model: "TransformerBridge") -> list[str]:
    """Every hook name the model accepts, legacy aliases included, sorted."""
    return sorted(model.hook_dict.keys())


def check_sites(model: "TransformerBridge", sites: list[str]) -> None:
    """Raise one line naming the unknown sites and listing the valid per-token ones."""
    valid = set(list_sites(model))
    unknown = [s for s in sites if s not in valid]
    if unknown:
        examples = [s for s in list_sites(model) if s.startswith("blocks.0.") and "pattern" not in s and "scores" not in s]
        raise WorkbenchError(
            f"unknown site(s) {', '.join(unknown)} for {model.cfg.model_name} "
            f"({model.cfg.n_layers} layers); valid sites are blocks.<layer>.<name> with <name> one of "
            f"{', '.join(s.removeprefix('blocks.0.') for s in examples)}, or hook_embed, hook_pos_embed, ln_final.hook_normalized"
        )


def site_info(model: "TransformerBridge", sites: list[str]) -> dict[str, SiteInfo]:
    """Per-token shape of each site, found by one forward pass over two tokens.

    Sites whose output is not per token (attention patterns and scores, which
    carry a key axis) are refused: they cannot be stored row-aligned with tokens.
    """
    check_sites(model, sites)
    shapes: dict[str, tuple[int, ...]] = {}

    def grab(site: str):
        def hook(x, hook):
            shapes[site] = tuple(x.shape)
            return x

        return hook

    tokens = torch.zeros((1, 2), dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(s, grab(s)) for s in sites], stop_at_layer=stop_layer(model, sites))
    infos = {}
    for site in sites:
        shape = shapes.get(site)
        if shape is None or shape[:2] != (1, 2) or ("pattern" in site or "attn_scores" in site):
            raise WorkbenchError(f"site {site} is not a per-token activation (shape {shape}); pick a residual, MLP or attention-output site")
        per_token = shape[2:]
        width = 1
        for d in per_token:
            width *= d
        infos[site] = SiteInfo(site, per_token, width)
    return infos


def site_layer(site: str) -> int | None:
    """The block index a site lives in (`blocks.3.…` -> 3), None for embedding and final sites."""
    parts = site.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def stop_layer(model: "TransformerBridge", sites: list[str]) -> int | None:
    """The `stop_at_layer` that still runs every block the sites need (None when a final site is asked for)."""
    deepest = -1
    for site in sites:
        layer = site_layer(site)
        if layer is None:
            if site.startswith(("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")):
                continue
            return None
        deepest = max(deepest, layer)
    return deepest + 1 if deepest + 1 < model.cfg.n_layers else None


def _check_model_dir(path: Path, name: str) -> Path:
    if not path.is_dir():
        raise WorkbenchError(f"model path {name!r} is not a directory; pass a HuggingFace-format model directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise WorkbenchError(f"model directory {name!r} is not readable (check its permissions)")
    config = path / "config.json"
    if not config.is_file():
        raise WorkbenchError(f"{name!r} is not a HuggingFace model directory: it has no config.json")
    if not os.access(config, os.R_OK):
        raise WorkbenchError(f"{config} is not readable (check its permissions)")
    return path


def _hub_snapshot(name: str) -> Path:
    """The local snapshot of hub model `name`: from the cache, else downloaded if the hub answers."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    hint = (
        f"model {name!r} is not a bundled model ({', '.join(BUNDLED_MODELS)}), not a local directory, "
        "and not in the Hugging Face cache"
    )
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except HFValidationError as e:
        raise WorkbenchError(f"{hint}; {_one_line(e)}") from e
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise WorkbenchError(
            f"{hint}, and the hub cannot be reached from this machine; pass a local HuggingFace-format "
            "directory (e.g. --model ./my-model, made with save_pretrained) or fill the cache (HF_HOME) on a machine online"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # the hub answered but refused: unknown repo, gated, network cut mid-way
        raise WorkbenchError(f"cannot download model {name!r} from the hub: {_one_line(e)}") from e


def _pass_renamed_kv_cache() -> None:
    """Let TransformerLens's attention bridges find the KV cache under the name transformers 5.24 gives it.

    transformers 5.24 renamed the cache argument a decoder layer hands its attention module from
    `past_key_values` to `cache` (GPT-2, Llama, Qwen2, Gemma2, ...; GPT-NeoX still says `layer_past`).
    TransformerLens 4.3 replaces that attention module with its own, whose `_update_kv_cache` looks only
    for `past_key_values` and `layer_past`: it finds no cache, so the cache is never filled and a cached
    decode step sees only its own token, at position 0. Passing `cache` on under the old name restores
    cached decoding; under transformers < 5.24 no `cache` argument arrives and this changes nothing.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    update = AttentionBridge._update_kv_cache
    if getattr(update, "_workbench_cache_alias", False):
        return

    def _update_kv_cache(self, k, v, **kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None:
            kwargs["past_key_values"] = kwargs["cache"]
        return update(self, k, v, **kwargs)

    _update_kv_cache._workbench_cache_alias = True
    AttentionBridge._update_kv_cache = _update_kv_cache


def _quiet_transformers() -> None:
    """Keep stderr for our own messages: no per-load weight-loading bars or advisory warnings from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


