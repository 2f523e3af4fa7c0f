"""The SAELens and sparsify on-disk layouts: bring pretrained dictionaries in, take ours elsewhere.

SAELens (also read by Neuronpedia and SAEBench): `cfg.json` + `sae_weights.safetensors`
with `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_out]`, `b_dec`, and
`threshold` (JumpReLU) or `W_skip [d_out, d_in]` (skip transcoders). The
architectures it knows: standard (ReLU), topk, jumprelu, transcoder,
skip_transcoder, jumprelu_transcoder. Our batch-level variants (batchtopk,
mutual_choice, feature_choice, matryoshka) are per-token JumpReLUs at
inference, so they are written as `jumprelu` with their threshold.

sparsify: `cfg.json` + `sae.safetensors` with `encoder.weight [d_sae, d_in]`,
`encoder.bias`, `W_dec [d_sae, d_in]`, `b_dec`, optional `W_skip [d_out, d_in]`;
TopK only, output width equal to input width.

Both writers also put our full `DictionaryConfig` under the `workbench` key of
`cfg.json` (both libraries ignore unknown keys), so a dictionary written and
read back is the same dictionary, bit for bit. Files are read with
`safetensors` and `json` only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from torch import Tensor

from sae.dictionary import Dictionary, DictionaryConfig, read_safetensors
from workbench.errors import WorkbenchError

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_VERSION = "6.12.1"
_TO_SAELENS_SAE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                   "mutual_choice": "jumprelu", "feature_choice": "jumprelu", "matryoshka": "jumprelu"}
_TO_SAELENS_TRANSCODER = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder",
                          "mutual_choice": "jumprelu_transcoder", "feature_choice": "jumprelu_transcoder",
                          "matryoshka": "jumprelu_transcoder"}


# ====================================================================== writing
def save_saelens(d: Dictionary, directory: str | os.PathLike) -> Path:
    """Write `d` in the SAELens layout (a one-line error for what SAELens cannot express)."""
    cfg = d.cfg
    arch = _saelens_arch(cfg)
    t = d.tensors()
    weights = {"W_enc": t["W_enc"], "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if "threshold" in t and arch != "topk":
        weights["threshold"] = t["threshold"]
    if cfg.skip:
        weights["W_skip"] = t["W_skip"].T.contiguous()
    data = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
            "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input), "normalize_activations": "none",
            "reshape_activations": "hook_z" if cfg.n_heads is not None and cfg.is_sae else "none",
            "sae_lens_version": SAELENS_VERSION, "meta": _saelens_meta(cfg), "workbench": cfg.to_json()}
    if arch == "topk":
        data["k"] = cfg.k
    if not cfg.is_sae:
        data.update({"d_out": cfg.d_out, "hook_name_out": cfg.target_site, "hook_layer_out": _layer(cfg.target_site),
                     "hook_head_index_out": None})
    return _write(directory, SAELENS_WEIGHTS, weights, data)


def save_sparsify(d: Dictionary, directory: str | os.PathLike) -> Path:
    """Write a TopK dictionary in sparsify's layout."""
    cfg = d.cfg
    if cfg.arch != "topk":
        raise WorkbenchError(f"sparsify stores TopK dictionaries only; {cfg.name} is {cfg.arch} (use the SAELens layout)")
    if cfg.d_out != cfg.d_in:
        raise WorkbenchError(f"sparsify needs output width = input width; {cfg.name} maps {cfg.d_in} -> {cfg.d_out}")
    if bool(cfg.apply_b_dec_to_input) != cfg.is_sae:
        raise WorkbenchError(f"sparsify subtracts b_dec from the input exactly for SAEs; {cfg.name} does not follow that rule")
    t = d.tensors()
    weights = {"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if cfg.skip:
        weights["W_skip"] = t["W_skip"].T.contiguous()
    data = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in), "normalize_decoder": True,
            "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": cfg.skip,
            "transcode": not cfg.is_sae, "d_in": cfg.d_in, "workbench": cfg.to_json()}
    return _write(directory, SPARSIFY_WEIGHTS, weights, data)


def export_dictionary(d: Dictionary, directory: str | os.PathLike, layout: str) -> Path:
    """Write `d` as `layout` ("saelens", "sparsify" or "workbench")."""
    if layout == "saelens":
        return save_saelens(d, directory)
    if layout == "sparsify":
        return save_sparsify(d, directory)
    if layout == "workbench":
        return d.save(directory)
    raise WorkbenchError(f"unknown layout {layout!r}; choose saelens, sparsify or workbench")


# ====================================================================== reading
def load_foreign(directory: Path, data: dict[str, Any], device="cpu", **overrides) -> Dictionary:
    """Load a folder in the SAELens or sparsify layout (called by `Dictionary.load`)."""
    if (directory / SAELENS_WEIGHTS).exists() or "architecture" in data or "d_sae" in data:
        return load_saelens(directory, data, device, **overrides)
    if (directory / SPARSIFY_WEIGHTS).exists() or "num_latents" in data:
        return load_sparsify(directory, data, device, **overrides)
    raise WorkbenchError(f"{directory} holds neither a workbench, SAELens ({SAELENS_WEIGHTS}) nor sparsify ({SPARSIFY_WEIGHTS}) dictionary")


def load_saelens(directory: Path, data: dict[str, Any], device="cpu", **overrides) -> Dictionary:
    tensors = read_safetensors(directory / SAELENS_WEIGHTS)
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()
    cfg = _ours(data, overrides) or _from_saelens(directory, data, tensors, overrides)
    return _build(cfg, tensors, directory / SAELENS_WEIGHTS, device)


def load_sparsify(directory: Path, data: dict[str, Any], device="cpu", **overrides) -> Dictionary:
    raw = read_safetensors(directory / SPARSIFY_WEIGHTS)
    if "encoder.weight" not in raw:
        raise WorkbenchError(f"{directory / SPARSIFY_WEIGHTS} has no encoder.weight: not a sparsify dictionary")
    tensors = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw.get("W_dec"),
               "b_dec": raw.get("b_dec")}
    if raw.get("W_dec") is None:
        raise WorkbenchError(f"{directory / SPARSIFY_WEIGHTS} has no decoder (W_dec); it cannot reconstruct")
    if "W_skip" in raw:
        tensors["W_skip"] = raw["W_skip"].T.contiguous()
    cfg = _ours(data, overrides) or _from_sparsify(directory, data, tensors, overrides)
    return _build(cfg, tensors, directory / SPARSIFY_WEIGHTS, device)


def import_dictionary(path: str | os.PathLike, workspace, name: str, *, overwrite: bool = False, **overrides) -> Dictionary:
    """Load a dictionary folder of any layout and save it into the workspace as `name` (model/site overrides allowed)."""
    from workbench.workspace import check_name

    check_name(name, "dictionary name")
    directory = Path(path)
    data = json.loads((directory / "cfg.json").read_text()) if (directory / "cfg.json").is_file() else None
    if data is None:
        raise WorkbenchError(f"{directory} is not a dictionary folder: it has no cfg.json")
    d = Dictionary.load(directory)
    if overrides:
        d = d.with_config(**overrides)
    target = workspace.dictionaries_dir / name
    if (target / "cfg.json").exists() and not overwrite:
        raise WorkbenchError(f"dictionary {name!r} already exists in {workspace.root}; pass overwrite to replace it")
    d = d.with_config(name=name) if d.cfg.name != name else d
    d.save(target)
    return d


# ====================================================================== helpers
def _saelens_arch(cfg: DictionaryConfig) -> str:
    table = _TO_SAELENS_SAE if cfg.is_sae else _TO_SAELENS_TRANSCODER
    if cfg.arch not in table:
        kind = "SAE" if cfg.is_sae else "transcoder"
        raise WorkbenchError(f"SAELens has no layout for a {cfg.arch} {kind} ({cfg.name}); "
                             f"{'use the sparsify layout' if cfg.arch == 'topk' else 'keep the workbench layout'}")
    arch = table[cfg.arch]
    if cfg.skip:
        if arch != "transcoder":
            raise WorkbenchError(f"SAELens has skip connections only for ReLU transcoders; {cfg.name} is {cfg.arch} with a skip")
        arch = "skip_transcoder"
    return arch


def _saelens_meta(cfg: DictionaryConfig) -> dict:
    head = cfg.head
    return {"model_name": cfg.model, "hook_name": cfg.site, "hook_layer": _layer(cfg.site), "hook_head_index": head,
            "model_class_name": "HookedTransformer", "prepend_bos": True, "context_size": cfg.metadata.get("context"),
            "dataset_path": cfg.metadata.get("corpus"), "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION}


def _ours(data: dict, overrides: dict) -> DictionaryConfig | None:
    """Our own config when a file we wrote comes back (the `workbench` key), with overrides applied."""
    mine = data.get("workbench")
    if not isinstance(mine, dict):
        return None
    return DictionaryConfig.from_json({**mine, **overrides})


def _from_saelens(directory: Path, data: dict, tensors: dict[str, Tensor], overrides: dict) -> DictionaryConfig:
    meta = data.get("meta") or data.get("metadata") or {}
    arch_name = data.get("architecture", "standard")
    activation = data.get("activation_fn_str") or data.get("activation_fn") or "relu"
    norm = data.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise WorkbenchError(f"{directory}: normalize_activations={norm!r} needs a runtime scaling this loader does not apply; "
                             "fold the scaling factor into the weights first (SAELens: fold_activation_norm_scaling_factor)")
    table = {"standard": "relu", "transcoder": "relu", "skip_transcoder": "relu", "topk": "topk", "jumprelu": "jumprelu",
             "jumprelu_transcoder": "jumprelu", "batchtopk": "batchtopk"}
    if arch_name not in table:
        raise WorkbenchError(f"{directory}: SAELens architecture {arch_name!r} is not supported; supported: {', '.join(table)}")
    arch = "topk" if arch_name == "standard" and activation == "topk" else table[arch_name]
    k = data.get("k") or (data.get("activation_fn_kwargs") or {}).get("k")
    site = meta.get("hook_name", data.get("hook_name"))
    head = meta.get("hook_head_index", data.get("hook_head_index"))
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    n_heads_shape = None
    if data.get("reshape_activations") == "hook_z" and "n_heads" in data:
        n_heads_shape = (int(data["n_heads"]), d_in // int(data["n_heads"]))
    cfg = dict(name=directory.name, arch=arch, d_in=d_in, d_sae=d_sae, d_out=d_out, k=int(k) if k else None,
               model=meta.get("model_name", data.get("model_name")), site=site,
               target_site=data.get("hook_name_out") if arch_name.endswith("transcoder") else None,
               site_shape=n_heads_shape, skip="W_skip" in tensors,
               apply_b_dec_to_input=bool(data.get("apply_b_dec_to_input", arch_name in ("standard", "topk", "jumprelu", "batchtopk"))),
               dtype=_dtype_name(data.get("dtype", "float32")), metadata={"imported_from": "saelens", "source": str(directory)})
    if head is not None:
        cfg["metadata"]["hook_head_index"] = head
    cfg.update(overrides)
    return DictionaryConfig(**cfg)


def _from_sparsify(directory: Path, data: dict, tensors: dict[str, Tensor], overrides: dict) -> DictionaryConfig:
    if data.get("activation", "topk") != "topk":
        raise WorkbenchError(f"{directory}: sparsify activation {data.get('activation')!r} is not supported (only topk)")
    if data.get("multi_topk"):
        raise WorkbenchError(f"{directory}: sparsify multi_topk dictionaries are not supported")
    d_in, d_sae = tensors["W_enc"].shape
    transcode = bool(data.get("transcode", False))
    site, target = sparsify_sites(directory.name, transcode)
    cfg = dict(name=directory.name, arch="topk", d_in=d_in, d_sae=d_sae, d_out=tensors["W_dec"].shape[1], k=int(data["k"]),
               skip="W_skip" in tensors, apply_b_dec_to_input=not transcode, site=site, target_site=target,
               dtype=_dtype_name(str(tensors["W_enc"].dtype).removeprefix("torch.")),
               metadata={"imported_from": "sparsify", "source": str(directory), "hookpoint": directory.name})
    cfg.update(overrides)
    return DictionaryConfig(**cfg)


def sparsify_sites(hookpoint: str, transcode: bool) -> tuple[str | None, str | None]:
    """TransformerLens site names for a sparsify hookpoint (its folder name, a HF module path).

    `layers.L` (or `*.layers.L`, `h.L`) is the block's output: blocks.L.hook_resid_post.
    `layers.L.mlp` is the MLP: an SAE reads its output (blocks.L.hook_mlp_out); a
    transcoder reads its input (blocks.L.ln2.hook_normalized) and predicts its output.
    `layers.L.self_attn` / `attn` is the attention output. Anything else: (None, None),
    to be given explicitly; a transcoder then gets the placeholder target `<hookpoint>:output`.
    """
    import re

    m = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$", hookpoint)
    if m is None:
        return None, (f"{hookpoint}:output" if transcode else None)
    layer, part = m.group(1), m.group(2)
    if part is None:
        return f"blocks.{layer}.hook_resid_post", (f"{hookpoint}:output" if transcode else None)
    if part == "mlp":
        return (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out") if transcode else (f"blocks.{layer}.hook_mlp_out", None)
    return (f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.hook_attn_out") if transcode else (f"blocks.{layer}.hook_attn_out", None)


def _build(cfg: DictionaryConfig, tensors: dict[str, Tensor], path: Path, device) -> Dictionary:
    d = Dictionary(cfg, device=device, seed=None)
    if cfg.arch in ("batchtopk", "mutual_choice", "feature_choice", "matryoshka", "jumprelu") and "threshold" not in tensors:
        raise WorkbenchError(f"weights {path} lack the threshold a {cfg.arch} dictionary needs")
    wanted = d.tensors().keys()
    d.load_tensors({k: v for k, v in tensors.items() if k in wanted}, source=str(path))
    return d.eval()


def _write(directory, weights_name: str, weights: dict[str, Tensor], data: dict) -> Path:
    from safetensors.torch import save_file

    from workbench.workspace import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{weights_name}.{uuid.uuid4().hex[:8]}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
    os.replace(tmp, directory / weights_name)
    atomic_write_text(directory / "cfg.json", json.dumps(data, indent=1, default=str))
    return directory


def _layer(site: str | None) -> int | None:
    from workbench.model import site_layer

    return site_layer(site) if site else None


def _dtype_name(name: str) -> str:
    name = str(name).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"
