"""Checkpoints: everything a training run needs to continue bit for bit, in safetensors + JSON.

`dictionaries/<name>/checkpoint/` holds `state.safetensors` (the weights in training
units, Adam's moments and step counts, the dead-feature counters, the density and
threshold EMAs, the RNG state) and `state.json` (step, tokens, batches consumed,
input scales, the training and dictionary configs, the number of processes).
A new checkpoint is written to a temporary folder and renamed into place (the
previous one is moved aside first and removed last), so a process killed at any
moment leaves a complete checkpoint: `checkpoint/`, or `checkpoint.old/` while the
swap is half done. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae.train import Slot, TrainConfig, Trainer

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(trainer: "Trainer", slot: "Slot", directory: Path, batches: int) -> None:
    """Write slot + trainer state under directory/checkpoint atomically (a new folder renamed into place)."""
    from safetensors.torch import save_file

    tensors = {}
    names = {id(p): n for n, p in slot.dictionary.named_parameters()}
    for n, t in slot.dictionary.tensors().items():
        tensors[f"param.{n}"] = t
    for p, state in slot.optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            tensors[f"adam.{names[id(p)]}.{key}"] = state[key].detach().cpu().contiguous().reshape(state[key].shape)
    for key in ("since_fired", "density", "threshold_ema"):
        tensors[f"state.{key}"] = getattr(slot, key).cpu()
    tensors["state.rng"] = trainer.generator.get_state()
    info = {"step": trainer.step_count, "tokens": trainer.tokens, "batches": batches, "scale_in": slot.scale_in,
            "scale_out": slot.scale_out, "ema_steps": slot.ema_steps, "initialized": trainer.initialized,
            "train": train_json(trainer.cfg), "dictionary": slot.dictionary.cfg.to_json(), "world": trainer.world.size}
    for leftover in directory.glob(f".{CHECKPOINT_DIR}.*.tmp"):  # from a process killed while writing
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = directory / f".{CHECKPOINT_DIR}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(info, indent=1))
    final, old = directory / CHECKPOINT_DIR, directory / f"{CHECKPOINT_DIR}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_info(directory: Path) -> dict | None:
    """The JSON part of the last good checkpoint under `directory`, or None."""
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        path = directory / name / "state.json"
        if path.is_file() and (directory / name / "state.safetensors").is_file():
            info = json.loads(path.read_text())
            info["path"] = str(directory / name)
            return info
    return None


def load_checkpoint(trainer: "Trainer", slot: "Slot", info: dict) -> None:
    """Restore a slot (and the trainer's counters) from `read_checkpoint_info`'s result."""
    from sae.dictionary import read_safetensors

    tensors = read_safetensors(Path(info["path"]) / "state.safetensors")
    d = slot.dictionary
    d.load_tensors({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}, source=info["path"])
    state = {}
    for i, (n, p) in enumerate((n, p) for n, p in d.named_parameters() if p.requires_grad):
        if f"adam.{n}.exp_avg" in tensors:
            state[i] = {key: tensors[f"adam.{n}.{key}"].to(p.device) for key in ("exp_avg", "exp_avg_sq", "step")}
    slot.optimizer.load_state_dict({"state": state, "param_groups": slot.optimizer.state_dict()["param_groups"]})
    for key in ("since_fired", "density", "threshold_ema"):
        getattr(slot, key).copy_(tensors[f"state.{key}"])
    slot.scale_in, slot.scale_out, slot.ema_steps = info["scale_in"], info["scale_out"], info["ema_steps"]
    trainer.generator.set_state(tensors["state.rng"])
    trainer.step_count, trainer.tokens, trainer.initialized = info["step"], info["tokens"], info["initialized"]


def train_json(cfg: "TrainConfig") -> dict:
    """The training config as JSON (device left out: a run may resume on another device)."""
    data = asdict(cfg)
    data.pop("device")
    data["betas"] = list(cfg.betas)
    return data
