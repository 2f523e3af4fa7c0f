"""Training sparse dictionaries: a short `step()`, a loop, checkpoints that resume bit for bit.

One step, for every dictionary sharing the batch (several train on one pass):

1. Inputs are scaled to a fixed norm (E||x||^2 = d_in, E||y||^2 = d_out), with
   scales estimated on the first batches; the scales are folded back into the
   weights when the dictionary is saved, so saved weights are in model units.
2. The loss of the variant (`sae.losses`): FVU, plus the L1 / L0 penalty of
   relu / jumprelu, plus aux-k or aux_zipf once features have gone dead (a
   feature is dead after `dead_tokens` tokens without firing).
3. Dead features can also be resampled (optional; on by default for codebooks):
   they are re-initialised towards badly reconstructed inputs.
4. Adam (fused), then constraints: decoder rows of unit norm (gradient component
   parallel to each row removed before the step), jumprelu thresholds >= 0,
   codebook encoder re-tied to the unit-norm codes.
5. Batch-level variants track an EMA of their selection threshold for the
   per-token inference rule (global for batchtopk/mutual_choice/matryoshka,
   per feature for feature_choice).

The loop (`train_dictionaries`) streams batches, logs metrics as Parquet shards
of the `training_metrics` table (the app plots them live), writes progress to
`jobs/train-<name>.json`, checkpoints every `checkpoint_every` steps (weights,
Adam state, dead-feature counters, EMAs, RNG and the data position, in
safetensors + JSON; `sae.checkpoint`) and resumes from the last checkpoint bit for bit. A
non-finite loss stops the run with the last good checkpoint kept. Under
`torchrun` it runs DistributedDataParallel (gloo on CPU, nccl on GPU), each
process taking every world-th batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from sae.dictionary import K_ARCHS, Dictionary, DictionaryConfig
from sae.checkpoint import CHECKPOINT_DIR, load_checkpoint, read_checkpoint_info, save_checkpoint, train_json
from sae.losses import aux_zipf_weights, dictionary_loss
from workbench.allocator import tune_malloc
from workbench.errors import WorkbenchError

UNIT_NORM_ARCHS = frozenset(K_ARCHS - {"codebook"} | {"jumprelu"})
METRICS_TABLE = "training_metrics"
DICTIONARIES_TABLE = "dictionaries"
Batch = Tensor | tuple[Tensor, Tensor]
BatchSource = Callable[[int], Iterator[Batch]]  # start batch index -> batches from there on


@dataclass(frozen=True)
class TrainConfig:
    """How to train (shared by every dictionary of one pass)."""

    tokens: int = 2_000_000
    """Activations to train on, per dictionary (all processes together)."""
    batch_size: int = 4096
    """Activations per step and process."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(d_sae / 2**14) (the TopK paper's scaling)."""
    warmup_steps: int | None = None
    """Linear warm-up; None = min(1000, 5% of the steps)."""
    decay_fraction: float = 0.2
    """Final fraction of steps over which the learning rate decays linearly to 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 0
    """Seeds initialisation and resampling."""
    normalize: bool = True
    """Scale inputs (and targets) to E||x||^2 = width during training; folded back when saved."""
    dead_tokens: int | None = None
    """A feature is dead after this many tokens without firing; None = min(10M, tokens / 10)."""
    auxk_coef: float = 1 / 32
    """Weight of the aux-k loss (topk, batchtopk, matryoshka)."""
    aux_zipf_coef: float = 1 / 32
    """Weight of the aux_zipf loss (mutual_choice, feature_choice)."""
    l1_coef: float = 0.5
    """relu: weight of the decoder-norm-weighted L1 penalty."""
    l0_coef: float = 3e-2
    """jumprelu: weight of the L0 penalty."""
    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the straight-through rectangle kernel (normalised units)."""
    jumprelu_init: float = 0.1
    """jumprelu without k: initial threshold (normalised units); with k, thresholds start at each feature's
    (1 - k/d_sae) pre-activation quantile on the first batch, so about k features fire per token."""
    threshold_decay: float = 0.99
    """EMA decay of the inference threshold of batch-level variants."""
    resample_every: int | None = None
    """Resample dead features every this many steps (0 = never); None = 200 for codebooks, else 0."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and one at the end)."""
    log_every: int = 20
    """Steps between metric rows."""
    device: str | None = None
    """cuda when present, else cpu."""


class StepMetrics(NamedTuple):
    name: str
    step: int
    tokens: int
    loss: float
    fvu: float
    l0: float
    aux_loss: float
    dead_fraction: float
    lr: float


class TrainResult(NamedTuple):
    dictionaries: list[Dictionary]  # in model units
    metrics: list[StepMetrics]  # the last step's, one per dictionary
    steps: int
    tokens: int
    seconds: float
    resumed_from: int  # step of the checkpoint the run started from (0 = fresh)


# ====================================================================== one dictionary's training state
class _Objective(nn.Module):
    """The module DistributedDataParallel wraps: forward = the loss."""

    def __init__(self, dictionary: Dictionary):
        super().__init__()
        self.dictionary = dictionary

    def forward(self, x, y, cfg, aux_weights):
        return dictionary_loss(self.dictionary, x, y, cfg, aux_weights)


class Slot:
    """Everything that evolves while one dictionary trains (all of it is checkpointed)."""

    def __init__(self, dictionary: Dictionary, cfg: TrainConfig, lr: float):
        self.dictionary = dictionary
        device = dictionary.W_dec.device
        if dictionary.cfg.arch == "codebook":  # selection is tied to the codes; nothing trains the encoder
            for p in (dictionary.W_enc, dictionary.b_enc):
                p.requires_grad_(False)
        params = [p for p in dictionary.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=cfg.betas, fused=True)
        self.scale_in = 1.0
        self.scale_out = 1.0
        self.since_fired = torch.zeros(dictionary.cfg.d_sae, dtype=torch.long, device=device)
        self.density = torch.zeros(dictionary.cfg.d_sae, dtype=torch.float64, device=device)
        self.threshold_ema = torch.zeros(dictionary.cfg.d_sae, dtype=torch.float64, device=device)
        self.ema_steps = 0
        self.objective: nn.Module = _Objective(dictionary)

    @property
    def name(self) -> str:
        return self.dictionary.cfg.name


# ====================================================================== the trainer
class Trainer:
    """Trains one or more dictionaries on the same batches; `step(batch)` is one optimizer step for each."""

    def __init__(self, configs: list[DictionaryConfig], cfg: TrainConfig, *, world: "World | None" = None):
        if not configs:
            raise WorkbenchError("nothing to train: give at least one dictionary")
        self.cfg = cfg
        self.world = world or World.single(cfg.device)
        self.total_steps = max(1, math.ceil(cfg.tokens / (cfg.batch_size * self.world.size)))
        self.dead_tokens = cfg.dead_tokens or int(min(10_000_000, max(cfg.tokens // 10, 1)))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.slots = [Slot(Dictionary(c, device=self.world.device, seed=cfg.seed + _name_seed(c.name)), cfg, self._base_lr(c))
                      for c in configs]
        self.step_count = 0
        self.tokens = 0
        self.initialized = False

    # ---------------------------------------------------------------- one step
    def step(self, batch: Batch) -> list[StepMetrics]:
        """One optimizer step on `batch` (x, or (x, y) for transcoders) for every dictionary."""
        x_raw, y_raw = _split(batch, self.world.device)
        if not self.initialized:
            self.initialize(x_raw, y_raw)
        lr_scale = self._lr_scale(self.step_count)
        out = [self._step_slot(slot, x_raw, y_raw, lr_scale) for slot in self.slots]
        self.step_count += 1
        self.tokens += x_raw.shape[0] * self.world.size
        return out

    def _step_slot(self, slot: Slot, x_raw: Tensor, y_raw: Tensor, lr_scale: float) -> StepMetrics:
        d, cfg = slot.dictionary, self.cfg
        x, y = self._inputs(slot, x_raw, y_raw)
        parts = slot.objective(x, y, cfg, self._aux_weights(slot))
        finite = torch.isfinite(parts.total.detach()).reshape(1).double()
        if float(self.world.all_reduce_sum(finite)) < self.world.size:  # every process stops together
            raise NonFiniteLoss(slot.name, self.step_count + 1)
        slot.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        if d.cfg.arch in UNIT_NORM_ARCHS:
            _remove_parallel_grad(d.W_dec)
        for group in slot.optimizer.param_groups:
            group["lr"] = self._base_lr(d.cfg) * lr_scale
        slot.optimizer.step()
        self._constrain(d)
        fired = self.world.all_reduce_sum(parts.fired)
        self._track(slot, fired, parts.threshold_stat, x.shape[0] * self.world.size)
        if self._resample_due():
            self._resample(slot, x, y)
        dead = float((slot.since_fired >= self.dead_tokens).float().mean())
        return StepMetrics(slot.name, self.step_count + 1, self.tokens + x.shape[0] * self.world.size,
                           float(parts.total.detach()), float(parts.fvu), float(parts.l0), float(parts.aux), dead,
                           self._base_lr(d.cfg) * lr_scale)

    # ---------------------------------------------------------------- set-up from the first batch
    @torch.no_grad()
    def initialize(self, x_raw: Tensor, y_raw: Tensor) -> None:
        """Input scales, b_dec at the data mean, codebooks seeded with data (the same on every process)."""
        for slot in self.slots:
            d = slot.dictionary
            x, y = d.site_input(x_raw).float(), y_raw.float() if not d.cfg.is_sae else None
            if self.cfg.normalize:
                slot.scale_in = self.world.mean(math.sqrt(d.cfg.d_in / x.pow(2).sum(-1).mean().clamp_min(1e-12).item()))
                slot.scale_out = slot.scale_in if y is None else self.world.mean(
                    math.sqrt(d.cfg.d_out / y.pow(2).sum(-1).mean().clamp_min(1e-12).item()))
            target = (x if y is None else y) * slot.scale_out
            d.b_dec.copy_(self.world.broadcast(target.mean(0)))
            if d.cfg.arch == "codebook":  # codes start as centred data points
                rows = torch.randint(0, x.shape[0], (d.cfg.d_sae,), generator=self.generator).to(x.device)
                noise = 0.01 * torch.randn(d.W_dec.shape, generator=self.generator).to(x.device)
                d.W_dec.copy_(self.world.broadcast((target[rows] - d.b_dec) / d.cfg.k + noise))
                d.tie_codebook_()
            if d.cfg.arch == "jumprelu":
                d.threshold.copy_(self.world.broadcast(self._initial_thresholds(d, x * slot.scale_in)))
        self.initialized = True

    def _initial_thresholds(self, d: Dictionary, x: Tensor) -> Tensor:
        """JumpReLU thresholds: the (1 - k/d_sae) quantile of each feature's pre-activation, so the first steps fire
        about k features per token; `jumprelu_init` everywhere when no k is given."""
        if not d.cfg.k:
            return torch.full_like(d.threshold, self.cfg.jumprelu_init)
        pre = d.pre_activations(x[:8192]).float()
        rank = max(1, min(pre.shape[0], round(pre.shape[0] * (1.0 - d.cfg.k / d.cfg.d_sae))))
        return pre.kthvalue(rank, dim=0).values.clamp_min(0.0).to(d.threshold.dtype)

    # ---------------------------------------------------------------- helpers
    def _inputs(self, slot: Slot, x_raw: Tensor, y_raw: Tensor) -> tuple[Tensor, Tensor]:
        x = slot.dictionary.site_input(x_raw).float() * slot.scale_in
        if slot.dictionary.cfg.is_sae:
            return x, x
        return x, y_raw.float() * slot.scale_out

    def _aux_weights(self, slot: Slot) -> Tensor | None:
        arch = slot.dictionary.cfg.arch
        dead = slot.since_fired >= self.dead_tokens
        if arch in ("mutual_choice", "feature_choice"):
            if self.tokens < self.dead_tokens:
                return None  # densities are not yet measured
            return aux_zipf_weights(slot.density)
        if arch in ("topk", "batchtopk", "matryoshka") and bool(dead.any()):
            return dead.float()
        return None

    @torch.no_grad()
    def _track(self, slot: Slot, fired: Tensor, threshold_stat: Tensor | None, n_tokens: int) -> None:
        slot.since_fired += n_tokens
        slot.since_fired[fired > 0] = 0
        beta = min(1.0, n_tokens / self.dead_tokens)
        slot.density.mul_(1 - beta).add_(fired.double() / n_tokens, alpha=beta)
        if threshold_stat is not None:
            stat = self.world.mean_tensor(threshold_stat.double())
            decay = self.cfg.threshold_decay
            slot.threshold_ema.mul_(decay).add_(stat, alpha=1 - decay)
            slot.ema_steps += 1
            slot.dictionary.threshold.copy_(slot.threshold_ema / (1 - decay ** slot.ema_steps))

    @torch.no_grad()
    def _constrain(self, d: Dictionary) -> None:
        if d.cfg.arch in UNIT_NORM_ARCHS:
            d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if d.cfg.arch == "jumprelu":
            d.threshold.clamp_(min=0.0)
        if d.cfg.arch == "codebook":
            d.tie_codebook_()

    def _resample_due(self) -> bool:
        every = self.resample_every
        return every > 0 and (self.step_count + 1) % every == 0

    @property
    def resample_every(self) -> int:
        if self.cfg.resample_every is not None:
            return self.cfg.resample_every
        return 200 if any(s.dictionary.cfg.arch == "codebook" for s in self.slots) else 0

    @torch.no_grad()
    def _resample(self, slot: Slot, x: Tensor, y: Tensor) -> None:
        """Point dead features at the worst-reconstructed inputs of this batch (the same choice on every process).

        Inputs are drawn with probability proportional to their squared error; a dead
        feature's decoder row takes the direction of that input's residual, its encoder
        column the input's direction scaled to 0.2 x the mean live encoder norm, and its
        Adam moments are reset. A dead code of a codebook becomes that target itself.
        """
        d = slot.dictionary
        dead = (slot.since_fired >= self.dead_tokens).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        residual = y - d(x).output.float()
        weights = residual.pow(2).sum(-1).cpu() + 1e-12
        picks = torch.multinomial(weights, dead.numel(), replacement=True, generator=self.generator).to(x.device)
        if d.cfg.arch == "codebook":  # a dead code becomes the residual of a badly reconstructed input
            d.W_dec[dead] = self.world.broadcast(residual[picks].contiguous()).to(d.W_dec.dtype)
            d.tie_codebook_()
        else:
            x_in = x - d.b_dec if d.cfg.apply_b_dec_to_input else x
            dec_dir = _unit(self.world.broadcast(residual[picks].contiguous()))
            enc_dir = _unit(self.world.broadcast(x_in[picks].contiguous()))
            alive = slot.since_fired < self.dead_tokens
            enc_norm = d.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
            scale = d.W_dec[dead].norm(dim=1, keepdim=True) if d.cfg.arch == "relu" else 1.0
            d.W_dec[dead] = (dec_dir * scale).to(d.W_dec.dtype)
            d.W_enc[:, dead] = (enc_dir.T * 0.2 * enc_norm).to(d.W_enc.dtype)
            d.b_enc[dead] = 0.0
        _reset_adam_rows(slot.optimizer, d, dead)
        slot.since_fired[dead] = 0

    def _base_lr(self, c: DictionaryConfig) -> float:
        return self.cfg.lr if self.cfg.lr is not None else 2e-4 / math.sqrt(c.d_sae / 2**14)

    def _lr_scale(self, step: int) -> float:
        warmup = self.cfg.warmup_steps if self.cfg.warmup_steps is not None else min(1000, max(1, self.total_steps // 20))
        decay_start = int(self.total_steps * (1 - self.cfg.decay_fraction))
        scale = min(1.0, (step + 1) / max(1, warmup))
        if step >= decay_start and self.cfg.decay_fraction > 0:
            scale *= max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_start))
        return scale

    # ---------------------------------------------------------------- results in model units
    def model_unit_dictionaries(self, metadata: dict | None = None) -> list[Dictionary]:
        """Copies of the dictionaries with the input scaling folded into the weights."""
        out = []
        for slot in self.slots:
            d = slot.dictionary
            meta = {**d.cfg.metadata, **(metadata or {}), "input_scale": slot.scale_in, "target_scale": slot.scale_out}
            folded = d.with_config(input_scale=slot.scale_in, metadata=meta)
            folded.fold_scale(slot.scale_in, slot.scale_out)
            out.append(folded.eval())
        return out


def _name_seed(name: str) -> int:
    """A stable per-name seed offset, so a dictionary starts the same whether it trains alone or beside others."""
    import zlib

    return zlib.crc32(name.encode()) % 100_003


class NonFiniteLoss(Exception):
    def __init__(self, name: str, step: int):
        super().__init__(f"loss of {name} is not finite at step {step}")
        self.name, self.step = name, step


@torch.no_grad()
def _remove_parallel_grad(W_dec: nn.Parameter) -> None:
    """Keep unit-norm decoder rows on the sphere: drop the gradient component along each row."""
    if W_dec.grad is None:
        return
    parallel = (W_dec.grad * W_dec).sum(dim=1, keepdim=True)
    W_dec.grad.sub_(parallel * W_dec)


def _reset_adam_rows(optimizer: torch.optim.Optimizer, d: Dictionary, dead: Tensor) -> None:
    slices = {id(d.W_dec): (0,), id(d.b_enc): (0,), id(d.W_enc): (1,)}
    for p, state in optimizer.state.items():
        if id(p) in slices and "exp_avg" in state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].index_fill_(slices[id(p)][0], dead.to(state[key].device), 0.0)


def _split(batch: Batch, device) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)):
        x, y = batch
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x = batch.to(device, non_blocking=True)
    return x, x


def _unit(m: Tensor) -> Tensor:
    return m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ====================================================================== processes
class World:
    """This process's place in a torchrun job (or a job of one)."""

    def __init__(self, rank: int, size: int, device: torch.device):
        self.rank, self.size, self.device = rank, size, device

    @classmethod
    def single(cls, device: str | None = None) -> "World":
        from workbench.model import resolve_device

        return cls(0, 1, torch.device(resolve_device(device)))

    @classmethod
    def from_env(cls, device: str | None = None) -> "World":
        """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls.single(device)
        import torch.distributed as dist

        from workbench.model import resolve_device

        local = int(os.environ.get("LOCAL_RANK", "0"))
        name = resolve_device(device)
        dev = torch.device(f"cuda:{local}") if name.startswith("cuda") else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, slot: Slot) -> None:
        if self.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            slot.objective = DistributedDataParallel(_Objective(slot.dictionary), broadcast_buffers=False)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        if self.size > 1:
            import torch.distributed as dist

            t = t.clone()
            dist.all_reduce(t)
        return t

    def mean_tensor(self, t: Tensor) -> Tensor:
        return self.all_reduce_sum(t) / self.size if self.size > 1 else t

    def mean(self, value: float) -> float:
        return float(self.mean_tensor(torch.tensor([value], dtype=torch.float64, device=self.device))) if self.size > 1 else value

    def broadcast(self, t: Tensor) -> Tensor:
        if self.size > 1:
            import torch.distributed as dist

            t = t.contiguous()
            dist.broadcast(t, 0)
        return t

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


# ====================================================================== the loop
class Run:
    """Orchestrates one training pass: workspace files, progress, metrics, checkpoints, resume."""

    def __init__(self, trainer: Trainer, workspace=None, *, overwrite: bool = False, progress: bool = True,
                 on_step: Callable[[list[StepMetrics]], None] | None = None):
        self.trainer, self.workspace, self.overwrite = trainer, workspace, overwrite
        self.progress, self.on_step = progress, on_step
        self.world = trainer.world
        self.batches = 0
        self.last_checkpoint = 0
        self.pending_rows: list[dict] = []
        self.started = time.time()

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.trainer.slots]

    def directory(self, name: str) -> Path:
        return self.workspace.dictionaries_dir / name

    def prepare(self) -> int:
        """Resume from checkpoints made with the same settings; refuse to clobber anything else without overwrite."""
        if self.workspace is None:
            return 0
        infos = []
        for slot in self.trainer.slots:
            directory = self.directory(slot.name)
            info = read_checkpoint_info(directory)
            if info is not None and not self._matches(slot, info):
                if not self.overwrite:
                    raise WorkbenchError(f"a checkpoint of {slot.name!r} (step {info['step']}) was made with different settings; "
                                         "pass --overwrite to start over, or rerun with the same settings to resume")
                info = None
            if info is None and (directory / "cfg.json").is_file() and not self.overwrite:
                raise WorkbenchError(f"dictionary {slot.name!r} already exists in {self.workspace.root}; "
                                     "pass --overwrite to replace it or choose another --name")
            infos.append(info)
        return self._resume(infos)

    def _matches(self, slot: Slot, info: dict) -> bool:
        expected = {"train": train_json(self.trainer.cfg), "dictionary": slot.dictionary.cfg.to_json(), "world": self.world.size}
        return json.loads(json.dumps(expected)) == {k: info.get(k) for k in expected}

    def _resume(self, infos: list[dict | None]) -> int:
        present = [i for i in infos if i is not None]
        if not present:
            return 0
        if len(present) != len(infos) or len({(i["step"], i["batches"]) for i in present}) != 1:
            raise WorkbenchError(f"checkpoints of {', '.join(self.names)} are from different runs; pass --overwrite to start over")
        for slot, info in zip(self.trainer.slots, infos):
            load_checkpoint(self.trainer, slot, info)
        self.batches = present[0]["batches"]
        self.last_checkpoint = self.trainer.step_count
        self._drop_metrics_after(self.trainer.step_count)
        return self.trainer.step_count

    def fit(self, source: BatchSource) -> TrainResult:
        resumed = self.prepare()
        for slot in self.trainer.slots:
            self.world.wrap(slot)
        bar = self._bar(resumed)
        metrics: list[StepMetrics] = []
        try:
            for batch in _shard(source(self.batches), self.world):
                if self.trainer.step_count >= self.trainer.total_steps:
                    break
                metrics = self._one_step(batch)
                bar.update(1)
                bar.set_postfix_str(", ".join(f"{m.name}: fvu {m.fvu:.3f} l0 {m.l0:.1f} dead {m.dead_fraction:.2f}" for m in metrics)[:160])
            self._finish_log()
            if self.trainer.step_count < self.trainer.total_steps:
                raise WorkbenchError(f"the activations ran out after {self.trainer.tokens:,} tokens "
                                     f"(step {self.trainer.step_count} of {self.trainer.total_steps}); cache more or pass fewer --tokens")
        except NonFiniteLoss as e:
            self._write_progress("failed", error=str(e))
            raise WorkbenchError(f"{e}; training stopped and the last good checkpoint (step {self.last_checkpoint}) is kept"
                                 f"{' in ' + str(self.directory(e.name) / CHECKPOINT_DIR) if self.workspace and self.last_checkpoint else ''}"
                                 "; try a lower --lr or check the activations for NaN/inf") from None
        except KeyboardInterrupt:
            self._finish_log()
            self._write_progress("interrupted")
            raise
        finally:
            bar.close()
        return self._complete(metrics, resumed)

    def _one_step(self, batch: Batch) -> list[StepMetrics]:
        metrics = self.trainer.step(batch)
        self.batches += self.world.size
        step = self.trainer.step_count
        self.pending_rows += [self._row(m) for m in metrics]
        if self.on_step is not None:
            self.on_step(metrics)
        if step % self.trainer.cfg.log_every == 0:
            self._flush_metrics()
            self._write_progress("running", metrics)
        if self.workspace is not None and step % self.trainer.cfg.checkpoint_every == 0 and step < self.trainer.total_steps:
            self._checkpoint()
        return metrics

    def _checkpoint(self) -> None:
        self._check_finite_weights()
        self._flush_metrics()
        if self.world.is_main:
            for slot in self.trainer.slots:
                save_checkpoint(self.trainer, slot, self.directory(slot.name), self.batches)
        self.world.barrier()
        self.last_checkpoint = self.trainer.step_count

    def _check_finite_weights(self) -> None:
        for slot in self.trainer.slots:
            if not all(bool(torch.isfinite(p).all()) for p in slot.dictionary.parameters()):
                raise NonFiniteLoss(slot.name, self.trainer.step_count)
        self._check_replicas()

    def _check_replicas(self) -> None:
        """Under DDP every process must hold the same weights; a mismatch is a bug worth stopping for."""
        if self.world.size == 1:
            return
        local = torch.stack([p.detach().double().sum() for s in self.trainer.slots for p in s.dictionary.parameters()]).to(self.world.device)
        lo, hi = local.clone(), local.clone()
        import torch.distributed as dist

        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise WorkbenchError(f"the {self.world.size} processes hold different weights at step {self.trainer.step_count}; "
                                 "distributed training diverged (a bug: please report it)")

    def _complete(self, metrics: list[StepMetrics], resumed: int) -> TrainResult:
        self._check_finite_weights()
        meta = {"trained_tokens": self.trainer.tokens, "steps": self.trainer.step_count, "train": train_json(self.trainer.cfg),
                "final": {m.name: m._asdict() for m in metrics}}
        dictionaries = self.trainer.model_unit_dictionaries(meta)
        for d in dictionaries:
            final = {k: v for k, v in meta["final"].get(d.cfg.name, {}).items() if k not in ("name",)}
            d.cfg.metadata["final"] = final
        if self.workspace is not None and self.world.is_main:
            for d in dictionaries:
                d.save(self.directory(d.cfg.name))
                shutil.rmtree(self.directory(d.cfg.name) / CHECKPOINT_DIR, ignore_errors=True)
                self.workspace.append_rows(DICTIONARIES_TABLE, [_dictionary_row(d)], shard=d.cfg.name)
            self._write_progress("done", metrics)
        self.world.barrier()
        return TrainResult(dictionaries, metrics, self.trainer.step_count, self.trainer.tokens,
                           time.time() - self.started, resumed)

    # ---------------------------------------------------------------- metrics and progress
    def _row(self, m: StepMetrics) -> dict:
        elapsed = time.time() - self.started
        return {**m._asdict(), "dictionary": m.name, "elapsed_s": elapsed}

    def _flush_metrics(self) -> None:
        rows, self.pending_rows = self.pending_rows, []
        if not rows or self.workspace is None or not self.world.is_main:
            return
        for name in self.names:
            mine = [r for r in rows if r["dictionary"] == name]
            if mine:
                shard = f"{name}-{mine[0]['step']:09d}-{mine[-1]['step']:09d}"
                self.workspace.append_rows(METRICS_TABLE, [{k: v for k, v in r.items() if k != "name"} for r in mine], shard=shard)

    def _finish_log(self) -> None:
        self._flush_metrics()

    def _drop_metrics_after(self, step: int) -> None:
        """Rows logged after the checkpoint a run resumes from would be logged again: remove their shards."""
        if self.workspace is None or not self.world.is_main:
            return
        folder = self.workspace.tables_dir / METRICS_TABLE
        for name in self.names:
            for shard in folder.glob(f"{name}-*.parquet"):
                first = shard.stem[len(name) + 1:].split("-")[0]
                if first.isdigit() and int(first) > step:
                    shard.unlink(missing_ok=True)

    def _write_progress(self, status: str, metrics: list[StepMetrics] | None = None, error: str | None = None) -> None:
        if self.workspace is None or not self.world.is_main:
            return
        elapsed = time.time() - self.started
        t = self.trainer
        rate = t.tokens / elapsed if elapsed > 0 else 0.0
        remaining = (t.total_steps - t.step_count) * t.cfg.batch_size * self.world.size
        doc = {"job": "train", "dictionaries": self.names, "status": status, "step": t.step_count, "total_steps": t.total_steps,
               "tokens": t.tokens, "tokens_per_s": rate, "eta_s": remaining / rate if rate else None, "pid": os.getpid(),
               "updated": time.time(), "error": error, "metrics": [m._asdict() for m in metrics or []]}
        for name in self.names:
            self.workspace.write_json(f"jobs/train-{name}.json", doc)

    def _bar(self, initial: int):
        from tqdm import tqdm

        return tqdm(total=self.trainer.total_steps, initial=initial, desc=f"train {', '.join(self.names)}"[:60], unit="step",
                    file=sys.stderr, disable=None if (self.progress and self.world.is_main) else True, leave=False)


def _shard(batches: Iterable[Batch], world: World) -> Iterator[Batch]:
    """Every world-th batch, starting at this process's rank (the source already starts at the resume position)."""
    for i, batch in enumerate(batches):
        if i % world.size == world.rank:
            yield batch


def _dictionary_row(d: Dictionary) -> dict:
    c = d.cfg
    final = c.metadata.get("final", {})
    return {"dictionary": c.name, "arch": c.arch, "model": c.model, "site": c.site, "target_site": c.target_site,
            "head": c.head, "d_in": c.d_in, "d_sae": c.d_sae, "d_out": c.d_out, "k": c.k,
            "trained_tokens": c.metadata.get("trained_tokens"), "fvu": final.get("fvu"), "l0": final.get("l0"),
            "dead_fraction": final.get("dead_fraction"), "created": time.time()}


def train_dictionaries(configs: list[DictionaryConfig], source: BatchSource, cfg: TrainConfig, workspace=None, *,
                       overwrite: bool = False, progress: bool = True, world: World | None = None,
                       on_step: Callable[[list[StepMetrics]], None] | None = None) -> TrainResult:
    """Train dictionaries on one pass over `source` (a function: start batch index -> batches of x or (x, y)).

    With a workspace, each dictionary is saved to `dictionaries/<name>/` (model units),
    checkpoints live in `dictionaries/<name>/checkpoint/` until it finishes, and a rerun
    with the same settings resumes from them. Without one, nothing touches the disk.
    """
    tune_malloc()  # training steps reuse their temporaries instead of faulting them in again (workbench/allocator.py)
    world = world or World.from_env(cfg.device)
    trainer = Trainer(configs, cfg, world=world)
    with contextlib.ExitStack() as stack:
        if workspace is not None and world.is_main:
            for c in configs:
                stack.enter_context(workspace.job_lock(f"train-{c.name}"))
        return Run(trainer, workspace, overwrite=overwrite, progress=progress, on_step=on_step).fit(source)


# ====================================================================== batch sources
def tensor_source(x: Tensor, y: Tensor | None = None, *, batch_size: int, seed: int = 0) -> BatchSource:
    """Batches from in-memory activations, reshuffled each epoch by a seeded permutation (resumable)."""
    n = x.shape[0]
    if n < batch_size:
        raise WorkbenchError(f"{n} activations are fewer than one batch of {batch_size}")
    per_epoch = n // batch_size

    def source(start: int) -> Iterator[Batch]:
        index = start
        while True:
            epoch, offset = divmod(index, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            rows = perm[offset * batch_size:(offset + 1) * batch_size]
            yield x[rows] if y is None else (x[rows], y[rows])
            index += 1

    return source


def toy_source(toy, batch_size: int) -> BatchSource:
    """Batches of the superposition toy (batch i is a fixed function of i)."""
    return lambda start: toy.batches(batch_size, start=start)


def iterator_source(make: Callable[[], Iterable[Batch]]) -> BatchSource:
    """A source from a function that restarts an iterable; resuming skips the batches already used."""

    def source(start: int) -> Iterator[Batch]:
        it = iter(make())
        for _ in range(start):
            next(it, None)
        yield from it

    return source
