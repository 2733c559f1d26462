"""The training loop: GILL's adapters on caption-image pairs, with checkpoints, logs, validation and exports.

    gill train --checkpoint checkpoints/gill_opt --train-data datasets/cc3m_train.tsv \\
        --image-dir data/cc3m/training --targets-dir data/cc3m/clip_embs \\
        --val-data datasets/cc3m_val.tsv --val-image-dir data/cc3m/validation --out-dir runs/gill
    torchrun --nproc-per-node 2 -m gill.cli train ...     # the same, one process per GPU (DDP)
    gill train ... --resume                                # continue runs/gill from its train_state.pt

``out_dir`` receives ``train_state.pt`` (everything needed to continue exactly), ``metrics.csv`` and
``validation.csv``, TensorBoard logs under ``tensorboard/``, and two serving checkpoints: ``export/`` (written at
every validation and at the end) and ``best/`` (the best text->image recall@1 so far, as the reference keeps
``ckpt_best``). Each optimiser step takes ``batch_size`` pairs in all, split evenly across processes and
``grad_accumulation`` micro-batches; the defaults are the reference's recipe (docs/training.md says where this
loop differs from it and why).
"""

from __future__ import annotations

import csv
import logging
import os
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gill.errors import InputError
from gill.training.batch import Batch
from gill.training.data import (
    DataPosition,
    SampleEncoder,
    SkipCounter,
    TrainLoader,
    is_tsv,
    make_loader,
    open_dataset,
)
from gill.training.export import copy_checkpoint, export_checkpoint
from gill.training.objective import GILLObjective, LossWeights
from gill.training.optim import clip_gradients, make_optimizer, make_scheduler
from gill.training.validation import ValidationMetrics, validate

__all__ = ["TrainConfig", "TrainResult", "export_checkpoint", "train"]

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.csv"
VALIDATION_FILE = "validation.csv"
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"
BEST_DIR = "best"
STATE_FORMAT = 1
# Rank 0 alone exports (re-embedding a local retrieval corpus) while the other ranks wait in their next collective.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)
# Settings a resumed run must share with the run it continues: they fix the data order, the batches and the
# optimisation. The others (steps, logging and validation cadence, workers for a TSV, device) may change.
RESUME_FIXED = ("checkpoint", "train_data", "image_dir", "targets_dir", "batch_size", "grad_accumulation", "lr",
                "beta1", "beta2", "weight_decay", "warmup_steps", "lr_step_size", "lr_gamma", "grad_clip", "max_len",
                "concat_captions_prob", "cap_loss_scale", "ret_loss_scale", "gen_loss_scale", "precision", "seed",
                "fresh_adapters", "shuffle_buffer", "group_size")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the reference's recipe (``main.py`` of kohjingyu/gill)."""

    # Base checkpoint directory: model_args.json and the frozen LM, CLIP and SD it names (and its adapters when
    # fresh_adapters is off). Exports refer to its base models, so it must stay in place.
    checkpoint: str
    # Training pairs: a CC3M-format TSV (caption, image) or webdataset shards (a brace pattern).
    train_data: str
    # Where train_state.pt, the logs and the exports go.
    out_dir: str
    # Validation pairs (TSV or shards); None: no validation, and no best/ export.
    val_data: str | None = None
    # Folder the train TSV's image paths are relative to (default: the TSV's folder); TSV only.
    image_dir: str | None = None
    # The same for the validation TSV (default: image_dir when given, else the TSV's folder).
    val_image_dir: str | None = None
    # Precomputed SD targets (gill preprocess-sd-targets); None: no generation loss.
    targets_dir: str | None = None
    # Targets of the validation pairs (default: targets_dir; keys of the two splits differ, so one folder serves).
    val_targets_dir: str | None = None
    # 10 epochs x 2000 steps in the reference.
    steps: int = 20_000
    # Pairs per optimiser step over all processes and micro-batches (the reference's -b 200, over 2 GPUs).
    batch_size: int = 200
    # Micro-batches per optimiser step; each process sees batch_size / (world_size * grad_accumulation) at once.
    grad_accumulation: int = 1
    # AdamW as the reference: lr 1e-3, betas (0.9, 0.95) (beta2 below the usual 0.999: the adapters start from
    # scratch at a high rate), decoupled weight decay 0.01 on weight matrices only (gill.training.optim).
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01
    # Linear warm-up over the first 2000 steps (one epoch), then x0.1 every 10000 steps (5 epochs).
    warmup_steps: int = 2000
    lr_step_size: int = 10_000
    lr_gamma: float = 0.1
    # Total gradient norm is clipped to this (the reference's 1.0).
    grad_clip: float = 1.0
    # Tokens per caption, BOS and the 8 [IMG] tokens included.
    max_len: int = 32
    # Probability that a batch's captioning view pairs two captions in one sequence (FROMAGe's scheme).
    concat_captions_prob: float = 0.5
    # Loss weights (the reference's --cap/ret/gen-loss-scale).
    cap_loss_scale: float = 1.0
    ret_loss_scale: float = 1.0
    gen_loss_scale: float = 1.0
    # auto: bf16 frozen models under bf16 autocast on a GPU that has bf16, fp32 otherwise. The adapters, their
    # gradients and AdamW's state stay fp32 either way (the reference casts everything to bf16).
    precision: str = "auto"
    # Recompute the frozen LM's activations in the backward pass: less memory, about a third more compute.
    gradient_checkpointing: bool = False
    # DataLoader workers per process (the reference's -j 4); decoding and CLIP preprocessing run there.
    num_workers: int = 4
    # Seeds the fresh adapters, the data order and the caption-concatenation draws.
    seed: int = 0
    # Steps between log rows (metrics.csv, TensorBoard, the progress bar); each row averages its steps.
    log_every: int = 10
    # Steps between validations (and exports); the reference validates once an epoch.
    val_every: int = 2000
    # Steps between train_state.pt saves; the reference saves once an epoch, but a preempted job loses less.
    save_every: int = 1000
    # Validate on the first this many pairs only (None: all, as the reference); recall@k depends on the count.
    val_max_samples: int | None = None
    # Validation pairs per forward on each process (default: the per-process micro-batch).
    val_batch_size: int | None = None
    # cpu, cuda, cuda:1 ... (default: CUDA when present, the process's LOCAL_RANK device under torchrun).
    device: str | None = None
    # Start from randomly initialised adapters, as a new run does; off: fine-tune the checkpoint's adapters.
    fresh_adapters: bool = True
    # Continue out_dir's train_state.pt when there is one (else start afresh).
    resume: bool = False
    # Shard datasets only: samples in the shuffle buffer of each loader worker (0: shard order only).
    shuffle_buffer: int = 0
    # TSV datasets only: consecutive rows shuffled as one group, so rows written side by side (hard negatives for
    # the contrastive loss) share a batch; make the per-process batch a multiple of it.
    group_size: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        positive = ("steps", "batch_size", "grad_accumulation", "log_every", "val_every", "save_every", "group_size")
        problems += [f"{name} must be at least 1, got {getattr(self, name)}" for name in positive
                     if getattr(self, name) < 1]
        for name in ("val_max_samples", "val_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1 or unset, got {value}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 0.0 <= self.concat_captions_prob <= 1.0:
            problems.append(f"concat_captions_prob must lie in [0, 1], got {self.concat_captions_prob}")
        if not (self.lr > 0 and self.grad_clip > 0):
            problems.append(f"lr and grad_clip must be positive, got {self.lr} and {self.grad_clip}")
        if self.num_workers < 0 or self.shuffle_buffer < 0 or self.warmup_steps < 0:
            problems.append("num_workers, shuffle_buffer and warmup_steps must be 0 or more")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def loss_weights(self) -> LossWeights:
        return LossWeights(self.cap_loss_scale, self.ret_loss_scale, self.gen_loss_scale)

    def loss_names(self) -> list[str]:
        """The losses every step reports (metrics.csv columns), ``loss`` first."""
        names = ["loss"]
        if self.cap_loss_scale > 0:
            names.append("caption_ce")
        if self.ret_loss_scale > 0 or self.gen_loss_scale > 0:
            names.append("img_token_ce")
        if self.ret_loss_scale > 0:
            names.append("contrastive")
        if self.gen_loss_scale > 0 and self.targets_dir is not None:
            names.append("generation_l2")
        return names


@dataclass(frozen=True)
class TrainResult:
    """What a run did. ``losses``: the last log row's means; ``validation``: the last validation (None without a
    validation set); ``best_*``: the best text->image recall@1 and its step. Counters cover the whole run, resumed
    parts included; ``samples_per_second`` covers this process's part only (logging and validation excluded)."""

    steps: int
    start_step: int
    losses: dict[str, float]
    validation: dict[str, Any] | None
    best_step: int | None
    best_text_to_image_top1: float | None
    skipped_samples: int
    skipped_by_reason: dict[str, int]
    skipped_batches: int
    trimmed_samples: int
    nonfinite_steps: int
    samples_per_second: float
    world_size: int
    out_dir: Path
    state_path: Path
    export_dir: Path
    best_dir: Path | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v) for f in fields(self)}


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # this module started the process group and ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def start_processes(device: str | None) -> Processes:
    """Join the torchrun group when ``WORLD_SIZE`` > 1 (gloo on the CPU, NCCL on CUDA); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        chosen = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
        torch.cuda.set_device(chosen)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT)
        owns = True
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Processes(rank, world_size, local_rank, chosen, owns)


def _frozen_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or (precision == "auto" and not (device.type == "cuda" and torch.cuda.is_bf16_supported())):
        return torch.float32
    return torch.bfloat16


def _wrap(objective: GILLObjective, config: TrainConfig, processes: Processes) -> torch.nn.Module:
    """DDP around the objective; the frozen models are kept out of DDP's start-up broadcast (they are loaded from
    the same files everywhere, and OPT-6.7B would be 13 GB of traffic)."""
    if not processes.distributed:
        return objective
    frozen = [name for name, p in objective.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in objective.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    weights = config.loss_weights
    # A trainable parameter outside every loss of a step would stall DDP's reducer: the mapper without SD
    # targets, or any module whose loss weight is 0. Searching for them costs a graph walk a step, so only then.
    unused = (config.targets_dir is None or 0.0 in (weights.cap_loss_scale, weights.ret_loss_scale,
                                                     weights.gen_loss_scale))
    return DistributedDataParallel(objective, device_ids=None, forward_sync_buffers=False,
                                   find_unused_parameters=unused)


# ------------------------------------------------------------------------------------------------ state


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG this process has, as lists of ints and other primitives: ``torch.load(weights_only=True)`` reads
    them, and ``all_gather_object`` carries them (it fails on some tensors' storages)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(gauss)],
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """A ``train_state.pt`` (tensors and primitive containers only: nothing is unpickled beyond them)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{path}: no training state to resume") from None
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise InputError(f"{path}: not a readable training state ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{path}: not a train_state.pt of this version (format {STATE_FORMAT})")
    return state


def _check_resumable(saved: dict[str, Any], config: TrainConfig, world_size: int, path: Path) -> None:
    differences = [f"{name} {saved['config'].get(name)!r} -> {getattr(config, name)!r}" for name in RESUME_FIXED
                   if saved["config"].get(name) != getattr(config, name)]
    if saved["world_size"] != world_size:
        differences.append(f"world size {saved['world_size']} -> {world_size}")
    if differences:
        raise InputError(f"{path}: cannot resume exactly with changed settings ({'; '.join(differences)}); resume "
                         "with the saved ones, or start a new run in another out_dir")


# ------------------------------------------------------------------------------------------------ logs


class _Table:
    """An append-only CSV (rank 0); on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, columns: list[str], keep_through: int | None) -> None:
        self.path, self.columns = path, columns
        rows: list[dict[str, str]] = []
        if keep_through is not None and path.exists():
            with open(path, newline="") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= keep_through]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})


def _tensorboard(directory: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is optional; metrics.csv has everything
        logger.warning("tensorboard is not installed: logging to %s only (pip install tensorboard)", METRICS_FILE)
        return None
    return SummaryWriter(str(directory), purge_step=purge_step)


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class _Counters:
    """Run-wide counts: batches skipped on every rank at once (one had no usable sample), samples trimmed so that
    every rank contrasts equally many, and steps whose gradient norm was not finite (no optimiser step taken)."""

    skipped_batches: int = 0
    trimmed_samples: int = 0
    nonfinite_steps: int = 0


@dataclass
class _Interval:
    """Sums over the steps since the last log row (device tensors, so logging costs one sync per row)."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


class _Trainer:
    """One process's part of a run: built from the config (resuming when asked), then :meth:`run`."""

    def __init__(self, config: TrainConfig, processes: Processes) -> None:
        self.config, self.processes = config, processes
        self.device = processes.device
        self.out_dir = Path(config.out_dir)
        self.state_path = self.out_dir / STATE_FILE
        saved = self._saved_state()
        self.micro_batch = self._micro_batch()

        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)  # the fresh adapters: the same on every rank
        self.encoder = SampleEncoder.from_checkpoint(config.checkpoint, config.max_len)
        self.train_set = open_dataset(config.train_data, self.encoder, image_dir=config.image_dir,
                                      targets_dir=config.targets_dir)
        self.val_set = None
        if config.val_data is not None:
            # The train TSV's image folder is the validation TSV's default, never a shard set's (shards hold images).
            val_images = config.val_image_dir or (config.image_dir if is_tsv(config.val_data) else None)
            self.val_set = open_dataset(config.val_data, self.encoder, image_dir=val_images,
                                        targets_dir=config.val_targets_dir or config.targets_dir)
        self.objective = GILLObjective.from_checkpoint(
            config.checkpoint, self.device, _frozen_dtype(config.precision, self.device), config.loss_weights,
            config.concat_captions_prob, config.gradient_checkpointing, config.fresh_adapters).train()
        self.model = _wrap(self.objective, config, processes)
        self._full_infonce()
        self.optimizer = make_optimizer(self.objective, config.lr, (config.beta1, config.beta2), config.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, config.warmup_steps, config.lr_step_size, config.lr_gamma)
        self.concat_generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.counters = _Counters()
        self.best: tuple[int, float] | None = None
        self.last_validation: ValidationMetrics | None = None
        self.last_losses: dict[str, float] = {}
        position, skips = DataPosition(), SkipCounter()
        if saved is not None:
            position, skips = self._restore(saved)
        self.start_step = self.step
        self.loader: TrainLoader = make_loader(
            self.train_set, self.micro_batch, seed=config.seed, start=position, num_workers=config.num_workers,
            rank=processes.rank, world_size=processes.world_size, shuffle_buffer=config.shuffle_buffer, skips=skips,
            group_size=config.group_size)
        self.batches = self.loader.forever()
        self.loss_names = config.loss_names()
        self.interval = _Interval()
        self.trained_samples, self.trained_seconds = 0, 0.0
        self._open_logs(resumed=saved is not None)

    # ---------------------------------------------------------------------------------------- set-up

    def _saved_state(self) -> dict[str, Any] | None:
        exists = self.state_path.is_file()
        if exists and not self.config.resume:
            raise InputError(f"{self.out_dir} already holds a run ({STATE_FILE}); pass --resume to continue it, or "
                             "choose another out_dir")
        if not exists:
            if self.config.resume:
                logger.info("nothing to resume in %s: starting a new run", self.out_dir)
            return None
        saved = load_state(self.state_path)
        _check_resumable(saved, self.config, self.processes.world_size, self.state_path)
        return saved

    def _micro_batch(self) -> int:
        config, world = self.config, self.processes.world_size
        share = world * config.grad_accumulation
        if config.batch_size % share:
            raise InputError(f"batch_size {config.batch_size} does not split evenly over {world} processes x "
                             f"{config.grad_accumulation} accumulation steps; use a multiple of {share}")
        return config.batch_size // share

    def _full_infonce(self) -> None:
        """Under DDP, make the contrastive loss's gradient that of one process on the whole batch.

        Each rank back-propagates the global InfoNCE through its own shard of the embeddings only
        (``gill.training.losses.gather_with_local_grad``) and DDP averages, so the embedding side gets 1/world of
        the gradient, while ``logit_scale``, which every rank applies to the whole similarity matrix, gets all of
        it. The step adds ``(world - 1) x ret_loss_scale x contrastive`` to the loss (world times the embedding
        side) and this hook divides ``logit_scale``'s gradient by world again. Then a run's updates do not depend
        on how many processes share its batch. (The reference's 2-GPU run had the halved embedding gradient.)
        """
        world = self.processes.world_size
        if world > 1 and self.config.ret_loss_scale > 0:
            self.objective.adapters.logit_scale.register_hook(lambda grad: grad / world)

    def _restore(self, saved: dict[str, Any]) -> tuple[DataPosition, SkipCounter]:
        self.objective.adapters.load_state_dict(saved["adapters"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.concat_generator.set_state(saved["concat_generator"])
        self.step = int(saved["step"])
        self.counters = _Counters(**saved["counters"])
        if saved["best"] is not None:
            self.best = (int(saved["best"][0]), float(saved["best"][1]))
        mine = saved["ranks"][self.processes.rank]
        _set_rng_state(mine["rng"], self.device)
        skips = SkipCounter()
        skips.by_reason.update(mine["skips"])
        self.counters.trimmed_samples = int(mine["trimmed_samples"])
        logger.info("resumed %s at step %d", self.out_dir, self.step)
        return DataPosition.from_dict(mine["data_position"]), skips

    def _open_logs(self, resumed: bool) -> None:
        self.metrics = self.validation_table = self.writer = None
        if not self.processes.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        keep = self.step if resumed else None
        columns = ["step", *self.loss_names, "lr", "grad_norm", "samples_per_s", "skipped_samples",
                   "skipped_batches"]
        self.metrics = _Table(self.out_dir / METRICS_FILE, columns, keep)
        if self.val_set is not None:
            val_columns = ["step", *(f.name for f in fields(ValidationMetrics))]
            self.validation_table = _Table(self.out_dir / VALIDATION_FILE, val_columns, keep)
        if self.config.tensorboard:
            self.writer = _tensorboard(self.out_dir / TENSORBOARD_DIR, self.step + 1 if resumed else None)

    # ---------------------------------------------------------------------------------------- steps

    def _all_reduce(self, values: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        if self.processes.distributed:
            dist.all_reduce(values, op=op)
        return values

    def _next_batch(self) -> Batch:
        """The next micro-batch, of equal size on every rank (the contrastive loss gathers equal shards).

        A batch that lost every sample is skipped on all ranks at once (the others' batches too: counted in
        skipped_batches); otherwise each rank keeps as many samples as the smallest batch.
        """
        while True:
            batch = next(self.batches)
            size = 0 if batch is None else len(batch)
            common = size
            if self.processes.distributed:
                common = int(self._all_reduce(torch.tensor([size], device=self.device), dist.ReduceOp.MIN))
            if common == 0:
                self.counters.skipped_batches += 1
                continue
            if size > common:
                self.counters.trimmed_samples += size - common
                batch = Batch(batch.pixel_values[:common], batch.input_ids[:common], batch.attention_mask[:common],
                              None if batch.sd_targets is None else batch.sd_targets[:common], batch.keys[:common])
            return batch.to(self.device)

    def _train_step(self) -> None:
        config, world = self.config, self.processes.world_size
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        samples = 0
        for micro in range(config.grad_accumulation):
            batch = self._next_batch()
            final = micro == config.grad_accumulation - 1
            with nullcontext() if final or not self.processes.distributed else self.model.no_sync():
                losses = self.model(batch, self.concat_generator)
                total = losses["loss"]
                if world > 1 and "contrastive" in losses:
                    total = total + (world - 1) * config.ret_loss_scale * losses["contrastive"]  # see _full_infonce
                (total / config.grad_accumulation).backward()
            for name in self.loss_names:
                value = losses[name].detach() / config.grad_accumulation
                self.interval.sums[name] = self.interval.sums.get(name, 0.0) + value
            samples += len(batch) * world
        norm = clip_gradients(self.objective, config.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        if bool(torch.isfinite(norm)):
            self.optimizer.step()
        else:
            self.counters.nonfinite_steps += 1
            logger.warning("step %d: gradient norm %s; the step was skipped", self.step + 1, float(norm))
        self.scheduler.step()
        self.objective.renormalise_img_rows()
        self.step += 1
        self.interval.sums["grad_norm"] = self.interval.sums.get("grad_norm", 0.0) + norm.detach().float()
        self.interval.sums["lr"] = self.interval.sums.get("lr", 0.0) + torch.tensor(lr, device=self.device)
        self.interval.steps += 1
        self.interval.samples += samples
        self.interval.seconds += time.perf_counter() - started

    def _log(self, bar: tqdm) -> None:
        interval = self.interval
        names = [*self.loss_names, "grad_norm", "lr"]
        values = torch.stack([torch.as_tensor(interval.sums[n], device=self.device).float() for n in names])
        skipped = torch.tensor([self.loader.skips.total], device=self.device, dtype=torch.float32)
        reduced = self._all_reduce(torch.cat([values / self.processes.world_size, skipped]))
        means = {name: float(value) / interval.steps for name, value in zip(names, reduced[:-1], strict=True)}
        rate = interval.samples / interval.seconds if interval.seconds > 0 else 0.0
        self.trained_samples += interval.samples
        self.trained_seconds += interval.seconds
        self.last_losses = {name: means[name] for name in self.loss_names}
        self.interval = _Interval()
        if not self.processes.is_main:
            return
        row = {"step": self.step, **means, "samples_per_s": rate, "skipped_samples": int(reduced[-1]),
               "skipped_batches": self.counters.skipped_batches}
        self.metrics.append(row)
        if self.writer is not None:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, self.step)
            self.writer.add_scalar("train/samples_per_s", rate, self.step)
            self.writer.add_scalar("train/skipped_samples", int(reduced[-1]), self.step)
        bar.set_postfix(loss=f"{means['loss']:.4f}", samples_s=f"{rate:.1f}", refresh=False)

    # ---------------------------------------------------------------------------------------- checkpoints

    def _save(self) -> None:
        """Write train_state.pt (rank 0), with every rank's data position, RNG states and skip counts."""
        mine = {"data_position": self.loader.position.to_dict(), "rng": _rng_state(self.device),
                "skips": dict(self.loader.skips.by_reason), "trimmed_samples": self.counters.trimmed_samples}
        ranks: list[Any] = [mine]
        if self.processes.distributed:
            ranks = [None] * self.processes.world_size
            dist.all_gather_object(ranks, mine)
        if not self.processes.is_main:
            return
        counters = asdict(self.counters)
        counters.pop("trimmed_samples")  # per rank, in ranks
        payload = {
            "format": STATE_FORMAT, "step": self.step, "world_size": self.processes.world_size,
            "config": asdict(self.config),
            "adapters": {k: v.detach().to("cpu", torch.float32).clone()
                         for k, v in self.objective.adapters.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "concat_generator": self.concat_generator.get_state(), "ranks": ranks, "counters": counters,
            "best": list(self.best) if self.best is not None else None,
        }
        _save_atomic(payload, self.state_path)

    def _training_info(self, metrics: ValidationMetrics | None) -> dict[str, Any]:
        return {"step": self.step, "validation": metrics.as_dict() if metrics else None,
                "config": asdict(self.config)}

    def _validate_and_export(self) -> None:
        """Validate (every rank its share), then rank 0 writes export/ and, on a new best, best/."""
        metrics = None
        if self.val_set is not None:
            metrics = validate(self.objective, self.val_set, self.encoder.tokenizer,
                               max_samples=self.config.val_max_samples,
                               batch_size=self.config.val_batch_size or self.micro_batch,
                               num_workers=min(self.config.num_workers, 2), rank=self.processes.rank,
                               world_size=self.processes.world_size)
            self.last_validation = metrics
        if not self.processes.is_main:
            return
        info = self._training_info(metrics)
        export_checkpoint(self.objective, self.config.checkpoint, self.out_dir / EXPORT_DIR, info)
        if metrics is None:
            return
        self.validation_table.append({"step": self.step, **metrics.as_dict()})
        if self.writer is not None:
            for name, value in metrics.as_dict().items():
                if value is not None:
                    self.writer.add_scalar(f"val/{name}", value, self.step)
        if self.best is None or metrics.text_to_image_top1 > self.best[1]:
            self.best = (self.step, metrics.text_to_image_top1)
            copy_checkpoint(self.out_dir / EXPORT_DIR, self.out_dir / BEST_DIR)
        logger.info("step %d: text->image R@1 %.3f R@5 %.3f, image->text R@1 %.3f R@5 %.3f, caption CE %.4f, "
                    "generation L2 %s, BLEU-4 %.4f (%d pairs)", self.step, metrics.text_to_image_top1,
                    metrics.text_to_image_top5, metrics.image_to_text_top1, metrics.image_to_text_top5,
                    metrics.caption_ce, "n/a" if metrics.generation_l2 is None else f"{metrics.generation_l2:.4f}",
                    metrics.bleu4, metrics.samples)

    def _sync_best(self) -> None:
        """Every rank's ``best`` equals rank 0's (they validate alike; this keeps it so under float noise)."""
        if self.processes.distributed:
            holder = [self.best]
            dist.broadcast_object_list(holder, src=0)
            self.best = holder[0]

    # ---------------------------------------------------------------------------------------- the run

    def run(self) -> TrainResult:
        config = self.config
        bar = tqdm(total=config.steps, initial=min(self.step, config.steps), unit="step", desc="train",
                   disable=not (config.progress and self.processes.is_main), dynamic_ncols=True)
        try:
            while self.step < config.steps:
                self._train_step()
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self._log(bar)
                if self.step < config.steps:
                    if self.step % config.val_every == 0:
                        self._validate_and_export()
                        self._sync_best()
                    if self.step % config.save_every == 0:
                        self._save()
            if self.interval.steps:
                self._log(bar)
            self._validate_and_export()
            self._sync_best()
            self._save()
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        return self._result()

    def _result(self) -> TrainResult:
        by_reason: Counter[str] = Counter(self.loader.skips.by_reason)
        trimmed = self.counters.trimmed_samples
        if self.processes.distributed:
            everyone: list[Any] = [None] * self.processes.world_size
            dist.all_gather_object(everyone, (dict(by_reason), trimmed))
            by_reason = sum((Counter(reasons) for reasons, _ in everyone), Counter())
            trimmed = sum(count for _, count in everyone)
        has_best = self.best is not None and self.val_set is not None
        return TrainResult(
            steps=self.step, start_step=self.start_step, losses=self.last_losses,
            validation=self.last_validation.as_dict() if self.last_validation else None,
            best_step=self.best[0] if self.best else None,
            best_text_to_image_top1=self.best[1] if self.best else None,
            skipped_samples=sum(by_reason.values()), skipped_by_reason=dict(by_reason),
            skipped_batches=self.counters.skipped_batches, trimmed_samples=trimmed,
            nonfinite_steps=self.counters.nonfinite_steps,
            samples_per_second=self.trained_samples / self.trained_seconds if self.trained_seconds else 0.0,
            world_size=self.processes.world_size, out_dir=self.out_dir, state_path=self.state_path,
            export_dir=self.out_dir / EXPORT_DIR, best_dir=self.out_dir / BEST_DIR if has_best else None)


def train(config: TrainConfig) -> TrainResult:
    """Run (or, with ``config.resume``, continue) a training run; returns what it did on every process.

    Under torchrun (``WORLD_SIZE`` > 1) each process joins the group and trains its share of every batch; a
    plain ``python``/``gill train`` is one process. Raises :class:`~gill.errors.InputError` for settings that
    cannot work (a batch that does not split over the processes, an out_dir holding another run, a resume with
    changed settings), before any weights load where it can.
    """
    processes = start_processes(config.device)
    try:
        return _Trainer(config, processes).run()
    finally:
        processes.close()
