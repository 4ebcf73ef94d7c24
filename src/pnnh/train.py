"""The training engine: ``pnnh.train(config) -> summary``. Short and direct, nothing hidden.

One epoch = a seeded permutation of the training set cut into batches (the permutation and
the augmentation draw from generators seeded by ``(seed, epoch)``, so an epoch is the same
whether the run was resumed or not), forward, cross-entropy (+ any ``extra_loss()`` of a
submodule), backward, optional clipping, optimizer step, then ``after_optimizer_step()`` on
every submodule that defines it (weight projections), then the per-step LR schedule.

Files in ``config.out``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (a line per
epoch), ``summary.json``, ``checkpoints/last.pt`` and ``checkpoints/best.pt`` (atomic).
Under ``torchrun`` the run is data-parallel (gloo on CPU, nccl on GPU); ``batch_size`` is the
global batch, each rank takes its share, and only rank 0 writes files. Each rank's loss is its
shard's mean scaled by ``world * len(shard) / len(batch)``, so DDP's gradient average is the
gradient of the global batch's mean loss even when the shards differ in size: a DDP run follows
the single-process run with the same global batch (up to float rounding).

Crash safety. Files are written atomically; a metrics line is appended before the epoch's
checkpoint, and ``--resume`` drops lines newer than ``last.pt``, so a run killed at any moment
(SIGKILL included) resumes from the last saved epoch and replays the lost work identically.
SIGINT / SIGTERM stop the run at the next optimizer step and save ``last.pt`` *mid-epoch*
(position in the epoch, partial metric sums, RNG and augmentation generator states), from which
``--resume`` continues exactly; then :class:`TrainingInterrupted` is raised (exit code 130/143).
``checkpoint_steps: N`` also saves such a mid-epoch ``last.pt`` every N steps, so a SIGKILL in a
long epoch loses at most N steps. Each save keeps the one before as ``prev.pt``, the fallback
when ``last.pt`` is damaged. ``resume: auto`` (the default under torchrun) continues only a
checkpoint of the same configuration, so an elastic restart continues by itself.

Reading order. :func:`train` → ``_train``, which runs the phases over one :class:`Run`:
``_setup`` (validate and build; nothing written), ``_resume``, ``_prepare_out_dir`` (rank 0
starts writing), ``_wrap_for_training``, then per epoch ``_train_one_epoch`` (calling
``_train_step``, the forward/backward/step core), :func:`evaluate` and ``_end_epoch``
(metrics, checkpoints), and finally ``_summary``. The unusual ends have their own helpers:
``_interrupted``, ``_diverged``, ``_record_failure``.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pnnh import config as config_mod
from pnnh.checkpoint import load_latest, rng_state, save_checkpoint, set_rng_state
from pnnh.data import TensorData, augment_batch, get_dataset
from pnnh.device import (  # also re-exported from here
    Distributed,
    pick_device,
    seed_everything,
    under_torchrun,
)
from pnnh.errors import CollectiveTimeout, ConfigError, PnnhError, TrainingDiverged
from pnnh.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, rewrite_jsonl
from pnnh.models import count_parameters, create_model

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                 "images_per_s", "time_s")


# ----------------------------------------------------------------------------- helpers
def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (linear warmup, then the schedule)."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = cfg.epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _in_module(name: str, key: str) -> bool:
    """Whether parameter ``name`` lies in a module matching the (``fnmatch``) path ``key``."""
    return fnmatch.fnmatchcase(name, key + ".*")


def module_lr_factor(name: str, multipliers: dict) -> float:
    """The lr factor of parameter ``name``: that of the most specific key (most dotted parts)
    naming a module it lies in; a key is a module path whose parts may be ``fnmatch``
    patterns (``blocks``, ``head``, ``blocks.*.enc``); 1 when none matches."""
    best, parts = 1.0, -1
    for key, factor in multipliers.items():
        if _in_module(name, key) and key.count(".") > parts:
            best, parts = float(factor), key.count(".")
    return best


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation parameters (1-D tensors); the
    parameters of a module named in ``cfg.lr_multipliers`` (a top-level name such as
    ``blocks``, or a dotted path with patterns such as ``blocks.*.enc``: :func:`module_lr_factor`)
    at ``lr * factor``."""
    mult = dict(getattr(cfg, "lr_multipliers", None) or {})
    names = [n for n, _ in model.named_parameters()]
    for key in mult:
        if not any(_in_module(n, key) for n in names):
            raise ConfigError(f"lr_multipliers: {cfg.model} has no submodule {key!r} "
                              f"(it has {', '.join(dict(model.named_children()))})",
                              field="lr_multipliers")
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = module_lr_factor(name, mult)
            groups.setdefault((p.ndim > 1, factor), []).append(p)
    groups = [{"params": ps, "lr": cfg.lr * factor,
               "weight_decay": cfg.weight_decay if decay else 0.0}
              for (decay, factor), ps in sorted(groups.items(),  # the base lr's groups first
                                                key=lambda kv: (kv[0][1] != 1.0, kv[0][1],
                                                                not kv[0][0]))]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def module_methods(model: nn.Module, name: str) -> list:
    """The bound ``name`` methods of every submodule that defines one (found once, not per step)."""
    return [getattr(m, name) for m in model.modules() if callable(getattr(m, name, None))]


def extra_losses(loss_terms: list) -> torch.Tensor | None:
    """Sum of the ``extra_loss()`` terms (penalties); a module may return None for nothing."""
    terms = [t for t in (f() for f in loss_terms) if t is not None]
    return sum(terms) if terms else None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """``(shard, global_batch_len)`` pairs of one epoch: a (seed, epoch)-seeded permutation cut
    into global batches, each split across ranks. A trailing batch with fewer than
    ``max(2, world)`` samples is dropped (BatchNorm needs two; every rank needs one)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) < max(2, world):
            continue
        yield idx[rank::world], len(idx)


def batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1):
    """This rank's index tensors of one epoch (see :func:`epoch_batches`)."""
    for shard, _ in epoch_batches(n, batch_size, seed, epoch, rank, world):
        yield shard


def shard_loss_scale(shard: int, batch: int, world: int) -> float:
    """Factor on a rank's mean loss so that DDP's gradient *average* over ranks is the gradient
    of the global batch's mean loss: ``(1/W) sum_r (W n_r / N) mean_r = (1/N) sum_i loss_i``."""
    return shard * world / batch


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after saving ``last.pt``; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextmanager
def _stop_on_signals(state: dict):
    """SIGINT/SIGTERM set ``state["signal"]`` (the loop stops at the next step and saves); a
    second SIGINT interrupts at once. Only the main thread can own signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if state.get("signal") == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        state["signal"] = signum

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _fetch(dataset, idx: torch.Tensor, device=None):
    if isinstance(dataset, TensorData):
        return dataset.batch(idx, device)
    items = [dataset[i] for i in idx.tolist()]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


def _progress_enabled(cfg) -> bool:
    if cfg.progress is not None:
        return cfg.progress
    return sys.stderr.isatty()


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device, dist: Distributed | None = None,
             channels_last: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``dataset`` (sharded across ranks under DDP)."""
    model.eval()
    n = len(dataset)
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    loss_sum = correct = count = 0.0
    order = torch.arange(n)[rank::world]
    for i in range(0, len(order), batch_size):
        x, y = _fetch(dataset, order[i:i + batch_size], device)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    if dist:
        loss_sum, correct, count = dist.all_sum([loss_sum, correct, count], device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- train
def train(config=None, callbacks: list | None = None, **overrides) -> dict:
    """Train a model; returns the summary dict (also written to ``out/summary.json``).

    ``config`` is a :class:`pnnh.config.TrainConfig`, a dict of its fields, or a YAML path;
    keyword ``overrides`` win over it. ``callbacks`` are objects with an
    ``on_step(step, epoch, model, inputs, targets, loss_fn)`` method, called after each
    optimizer step.

    Every check a user's input can fail (config values, dataset, model options, memory,
    resume checkpoint, output directory) runs before anything is written to ``out``.
    """
    cfg = config_mod.resolve(config, overrides)
    _check_out_dir(Path(cfg.out))
    dist = Distributed(cfg.device, cfg.dist_timeout)
    state: dict = {}
    agreed = False  # every rank reached the same end (finished, interrupted, diverged)
    try:
        with _stop_on_signals(state):
            summary = _train(cfg, dist, list(callbacks or []), state)
        agreed = True
        return summary
    except (TrainingInterrupted, TrainingDiverged):
        agreed = True
        raise
    except RuntimeError as e:
        if dist.enabled and "timed out" in str(e).lower():
            waited = f"{cfg.dist_timeout:g} s" if cfg.dist_timeout else "torch's default"
            raise CollectiveTimeout(
                f"rank {dist.rank}: a collective waited longer than dist_timeout ({waited}): "
                "another rank hung or died; under torchrun --max-restarts N the job restarts "
                "and resumes from its last checkpoint", field="dist_timeout") from e
        raise
    finally:
        dist.close(agreed)


def train_or_reuse(config: dict) -> dict:
    """:func:`train` ``config`` into ``config["out"]``, or return the summary of the finished run
    already there when the configuration it stored (``config.yaml``) equals this one in every
    field that changes the numbers (the rule of ``--resume auto``:
    :func:`pnnh.config.config_differences`). An unfinished run of the same configuration
    continues from its last checkpoint; a run of another configuration is started over in its
    folder, never returned. Experiments and benchmarks that keep their runs use it."""
    import json

    import yaml

    cfg = {**config, "resume": True}  # an interrupted run continues from its last epoch
    out = Path(cfg["out"])
    summary_path, stored_path = out / "summary.json", out / "config.yaml"
    if summary_path.exists() and stored_path.exists():
        stored = yaml.safe_load(stored_path.read_text()) or {}
        differences = config_mod.config_differences(stored, config_mod.resolve(cfg))
        summary = json.loads(summary_path.read_text())
        if summary.get("status") == "finished" and not differences:
            return summary
        if differences:
            cfg["resume"] = False
    return train(cfg)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} exists and is not a directory", field="out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"out: cannot write to {parent}", field="out")


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _build_model(cfg, model_kwargs: dict) -> nn.Module:
    """``create_model``, refusing a model whose training state cannot fit in memory.

    The model is first built on the ``meta`` device (no memory) to count its parameters;
    weights, gradients and two optimizer moments need ~16 bytes per parameter.
    """
    kwargs = {**model_kwargs, "in_shape": tuple(model_kwargs["in_shape"])}
    limit = _memory_bytes()
    if limit:
        try:
            with torch.device("meta"):
                n = count_parameters(create_model(cfg.model, **kwargs))
        except Exception:  # a factory that cannot run on meta: the real build decides
            n = 0
        seed_everything(cfg.seed)  # whatever the meta build drew, the real one starts afresh
        if n * 16 > limit:
            field = "width" if cfg.width else "depth" if cfg.depth else "model_args"
            raise ConfigError(f"{field}: model {cfg.model!r} would have {n:,} parameters, "
                              f"too many to train in {limit / 2**30:.0f} GiB of memory",
                              field=field)
    try:
        return create_model(cfg.model, **kwargs)
    except PnnhError:
        raise
    except Exception as e:  # e.g. a negative size in model_args, or no memory left
        field = "model_args" if cfg.model_args else "model"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ConfigError(f"{field}: cannot build model {cfg.model!r} with depth={cfg.depth} "
                          f"width={cfg.width} model_args={cfg.model_args}: "
                          f"{type(e).__name__}: {first}", field=field) from None


# ----------------------------------------------------------------------------- the run
@dataclass
class Run:
    """The state of one training run, shared by the phases below.

    Set up once (``_setup``): the config, the processes, device, data, model, optimizer and
    schedule. Moved by the loop: ``step`` (optimizer steps taken), ``best_acc`` /
    ``best_epoch``, ``history`` (rank 0's metrics records), ``partial`` (a mid-epoch position
    to continue from, consumed by the first epoch).
    """

    cfg: config_mod.TrainConfig
    dist: Distributed
    device: torch.device
    callbacks: list
    stop: dict  # {"signal": signum} once SIGINT/SIGTERM arrived
    train_ds: object
    val_ds: object
    augment: bool
    model: nn.Module
    model_kwargs: dict
    params: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    channels_last: bool = False  # batches and weights in channels-last (NHWC) memory format
    train_model: nn.Module | None = None  # model, compiled and/or wrapped in DDP
    scaler: torch.amp.GradScaler | None = None
    hooks: list = field(default_factory=list)  # after_optimizer_step methods
    loss_terms: list = field(default_factory=list)  # extra_loss methods
    start_epoch: int = 1
    step: int = 0
    start_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    resumed_from: int | None = None
    partial: dict | None = None
    ckpt_path: Path | None = None  # the checkpoint resumed from
    history: list = field(default_factory=list)
    writer: object = None
    bar: object = None
    run_start: float = 0.0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.out) / "checkpoints"

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.cfg.label_smoothing)

    def payload(self, epoch: int, val_acc: float | None, mid: dict | None = None) -> dict:
        """Checkpoint content after ``epoch`` complete epochs (+ ``mid``: a partial one).
        Collective under DDP: every rank calls it, rank 0 writes."""
        dist = self.dist
        rank_rng = dist.gather(torch.get_rng_state(), self.device) if dist.enabled else None
        p = {
            "epoch": epoch, "step": self.step, "model_name": self.cfg.model,
            "model_kwargs": self.model_kwargs, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(), "rng": rng_state(), "best_val_acc": self.best_acc,
            "best_epoch": self.best_epoch, "val_acc": val_acc, "world_size": dist.world,
        }
        if rank_rng is not None:
            p["rank_torch_rng"] = rank_rng
        if mid is not None:
            p["partial_epoch"] = mid
        return p

    def save_last(self, payload: dict) -> None:
        if self.main:
            save_checkpoint(self.ckpt_dir / "last.pt", payload, keep_previous="prev.pt")

    def close_bar(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None


def _train(cfg, dist: Distributed, callbacks: list, stop: dict) -> dict:
    """The phases of a run, in order (see the module docstring)."""
    run = _setup(cfg, dist, callbacks, stop)  # validates everything, writes nothing
    _resume(run)
    _prepare_out_dir(run)  # from here on, rank 0 writes
    _wrap_for_training(run)
    if run.main:
        _log(f"training {cfg.model} ({run.params:,} params) on {cfg.dataset} "
             f"[{len(run.train_ds)} train / {len(run.val_ds)} val] for {cfg.epochs} epochs on "
             f"{run.device}" + (f" x{dist.world} ranks" if dist.enabled else ""))
    run.history = read_jsonl(run.out / "metrics.jsonl") if run.resumed_from is not None and run.main else []
    run.step = run.start_step = ((run.start_epoch - 1) * run.steps_per_epoch
                                 + (run.partial["steps"] if run.partial else 0))
    run.run_start = time.perf_counter()
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        try:
            t0, sums = _train_one_epoch(run, epoch)
            train_time = time.perf_counter() - t0
            val_loss, val_acc = evaluate(run.model, run.val_ds, cfg.val_batch_size, run.device,
                                         dist, run.channels_last)
        except PnnhError as e:  # e.g. an unreadable image met mid-run: say so in summary.json
            _record_failure(run, epoch, e)
            raise
        _end_epoch(run, epoch, sums, train_time, time.perf_counter() - t0, val_loss, val_acc)
    if run.writer:
        run.writer.close()
    return _summary(run)


# ----------------------------------------------------------------------------- setup
def _setup(cfg, dist: Distributed, callbacks: list, stop: dict) -> Run:
    """Device, data, model, optimizer and schedule; every check a user's input can fail."""
    device = pick_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.tensorboard and dist.is_main:
        _tensorboard_writer_class()
    train_ds, val_ds, augment = _load_data(cfg)

    seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights
    model_kwargs = {"in_shape": list(train_ds.input_shape), "num_classes": train_ds.num_classes}
    if cfg.depth is not None:
        model_kwargs["depth"] = cfg.depth
    if cfg.width is not None:
        model_kwargs["width"] = cfg.width
    model_kwargs.update(cfg.model_args)
    model = _build_model(cfg, model_kwargs)
    if cfg.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise ConfigError("sync_bn: SyncBatchNorm needs CUDA devices; on CPU each rank "
                              "normalises over its own shard (drop sync_bn)", field="sync_bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    params = count_parameters(model)
    model.to(device)
    channels_last = use_channels_last(cfg.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    steps_per_epoch = sum(1 for _ in epoch_batches(len(train_ds), cfg.batch_size, 0, 0, 0, dist.world))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size: {cfg.batch_size} leaves no full batch of the "
                          f"{len(train_ds)} training samples", field="batch_size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
    if dist.rank > 0:  # decorrelate dropout across ranks (rank 0 keeps the single-process stream)
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    return Run(cfg=cfg, dist=dist, device=device, callbacks=callbacks, stop=stop,
               train_ds=train_ds, val_ds=val_ds, augment=augment, model=model,
               model_kwargs=model_kwargs, params=params, optimizer=optimizer,
               scheduler=scheduler, steps_per_epoch=steps_per_epoch, channels_last=channels_last)


def use_channels_last(setting: bool | None, model: nn.Module) -> bool:
    """``channels_last``: as set, or by default on for a model with a 2-D convolution of a
    kernel wider than 1x1 (a CNN; a ViT's patch embedding is a stride-``p`` ``p×p`` conv and
    counts too, its cost is negligible either way). On this CPU a conv net's training step is
    memory-format bound: NHWC ran ResNet-20 1.66x faster on 28x28 images (docs/BENCHMARKS.md,
    "Channels-last on the CPU"); on CUDA it is cuDNN's fast layout for convolutions."""
    if setting is not None:
        return bool(setting)
    return any(isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 for m in model.modules())


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: install the 'tensorboard' package to use it",
                          field="tensorboard") from None
    return SummaryWriter


def _load_data(cfg) -> tuple[object, object, bool]:
    """``(train_ds, val_ds, augment)``; bad dataset options are a ConfigError."""
    try:
        train_ds, val_ds = get_dataset(cfg.dataset, cfg.data_dir, num_samples=cfg.num_samples,
                                       seed=cfg.seed, **cfg.dataset_args)
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as e:
        raise ConfigError(f"dataset_args: cannot build dataset {cfg.dataset!r} with "
                          f"{cfg.dataset_args}: {str(e).splitlines()[0][:200] if str(e) else e!r}",
                          field="dataset_args") from None
    augment = cfg.augment if cfg.augment is not None else getattr(train_ds, "augmentable", False)
    if augment and len(train_ds.input_shape) != 3:
        raise ConfigError("augment: random crop/flip needs 2-D images (C, H, W); "
                          f"dataset {cfg.dataset!r} has inputs {train_ds.input_shape}",
                          field="augment")
    return train_ds, val_ds, augment


# ----------------------------------------------------------------------------- resume
def _resume(run: Run) -> None:
    """Load the checkpoint ``cfg.resume`` asks for (if any) into the run; still writes nothing."""
    cfg, dist = run.cfg, run.dist
    found = _find_resume_checkpoint(cfg, run.ckpt_dir, run.main)
    if found is None:
        return
    path, ckpt = found  # on the CPU; load_state_dict moves it
    if ckpt.get("model_name") != cfg.model:
        raise ConfigError(f"resume: {path} holds model "
                          f"{ckpt.get('model_name')!r}, not {cfg.model!r}", field="model")
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        hint = ("; a PNNH CNN run from before the learned 1x1 transition default resumes with "
                "--model-arg transition_coder=orthogonal"
                if "coder.weight" in str(e) and "transition_coder" not in cfg.model_args else "")
        raise ConfigError(f"resume: {path} does not fit this configuration "
                          f"(depth/width/model_args/optimizer changed?): "
                          f"{str(e).splitlines()[0][:200]}{hint}", field="resume") from None
    set_rng_state(ckpt["rng"])
    ranks_rng = ckpt.get("rank_torch_rng")
    if dist.enabled and ranks_rng and len(ranks_rng) == dist.world:
        torch.set_rng_state(ranks_rng[dist.rank].cpu())
    elif dist.rank > 0:  # saved by another number of ranks: fresh, distinct streams
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank + 7_919 * int(ckpt["epoch"]))
    run.ckpt_path = path
    run.start_epoch = int(ckpt["epoch"]) + 1
    run.best_acc, run.best_epoch = float(ckpt["best_val_acc"]), int(ckpt["best_epoch"])
    run.resumed_from = int(ckpt["epoch"])
    partial = run.partial = ckpt.get("partial_epoch")
    if partial is not None and len(partial["aug_rng"]) != dist.world:
        raise ConfigError(f"resume: {path} was saved mid-epoch by "
                          f"{len(partial['aug_rng'])} rank(s); resume it with the same number "
                          f"of processes (now {dist.world})", field="resume")
    if run.main:
        where = f"epoch {run.resumed_from}" + (f", step {partial['steps']} of epoch "
                                               f"{partial['epoch']}" if partial else "")
        done = "; the run had already finished" if run.start_epoch > cfg.epochs and not partial else ""
        _log(f"resuming from {path} ({where}){done}")


def _find_resume_checkpoint(cfg, ckpt_dir: Path, main: bool) -> tuple[Path, dict] | None:
    """The checkpoint this run continues from, by ``cfg.resume`` (see TrainConfig.resume).

    ``last.pt`` first, ``prev.pt`` when ``last.pt`` is damaged or missing (killed between the
    two renames of a save); both damaged: the one-line CheckpointError of ``last.pt``.
    Under ``auto`` a checkpoint whose stored config differs from ``cfg`` in a field that
    changes the trajectory is refused with one line naming those fields.
    """
    mode = cfg.resume
    if mode is None:  # under torchrun (its agent sets this, 0 on the first attempt): auto
        mode = "auto" if under_torchrun() else False
    if not mode:
        return None
    found = load_latest(ckpt_dir, log=_log if main else None)
    if found is None:
        if main and mode is True:
            _log(f"no checkpoint at {ckpt_dir / 'last.pt'}; starting from scratch")
        return None
    path, ckpt = found
    diff = config_mod.config_differences(dict(ckpt.get("config") or {}), cfg)
    if mode == "auto" and diff:
        raise ConfigError(f"resume: {path} was saved by another configuration "
                          f"({'; '.join(diff)}); use another --out, or --resume to continue it "
                          f"anyway, or --no-resume to start over", field="resume")
    return path, ckpt


# ----------------------------------------------------------------------------- output folder
def _prepare_out_dir(run: Run) -> None:
    """Rank 0 writes ``config.yaml`` and makes the folder agree with the resumed checkpoint:
    temporary files of a killed run swept, metric lines newer than the checkpoint dropped (a
    fresh start drops them all, with the earlier run's resume state)."""
    out, ckpt_dir = run.out, run.ckpt_dir
    if run.main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in [*out.glob(".*.tmp"), *ckpt_dir.glob(".*.tmp")]:  # left by a killed run
            tmp.unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", config_mod.dump_yaml(run.cfg))
        if run.ckpt_path is not None and run.ckpt_path.name != "last.pt" \
                and (ckpt_dir / "last.pt").exists():
            # a damaged last.pt: keep it for inspection, out of the prev.pt rotation
            os.replace(ckpt_dir / "last.pt", ckpt_dir / "last.pt.damaged")
        if run.resumed_from is None:  # a fresh start: nothing of an earlier run may be resumed
            for stale in ("metrics.jsonl", "norms.jsonl", "summary.json", "checkpoints/last.pt",
                          "checkpoints/prev.pt"):
                (out / stale).unlink(missing_ok=True)
        else:  # drop lines written after that checkpoint (a crash mid-epoch)
            rewrite_jsonl(out / "metrics.jsonl", [r for r in read_jsonl(out / "metrics.jsonl")
                                                  if r["epoch"] <= run.resumed_from])
            if (out / "norms.jsonl").exists():
                last_step = (run.resumed_from * run.steps_per_epoch
                             + (run.partial["steps"] if run.partial else 0))
                rewrite_jsonl(out / "norms.jsonl", [r for r in read_jsonl(out / "norms.jsonl")
                                                    if r.get("step", 0) <= last_step])
    if run.cfg.track_norms and run.main:
        from pnnh.probes.norms import NormTracker

        run.callbacks.append(NormTracker(every=run.cfg.track_norms, path=out / "norms.jsonl"))
    if run.cfg.tensorboard and run.main:
        run.writer = _tensorboard_writer_class()(log_dir=str(out / "tensorboard"))


def _wrap_for_training(run: Run) -> None:
    """torch.compile, DDP, the AMP scaler and the modules' step hooks."""
    cfg, device = run.cfg, run.device
    run.train_model = torch.compile(run.model) if cfg.compile else run.model
    if run.dist.enabled:
        run.train_model = nn.parallel.DistributedDataParallel(
            run.train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.amp and device.type == "cuda":
        run.scaler = torch.amp.GradScaler("cuda")
    run.hooks = module_methods(run.model, "after_optimizer_step")
    run.loss_terms = module_methods(run.model, "extra_loss")


# ----------------------------------------------------------------------------- one epoch
def _train_one_epoch(run: Run, epoch: int) -> tuple[float, list[float]]:
    """Train ``epoch`` (from a mid-epoch position if ``run.partial``); returns its start time
    and the global ``[loss_sum, correct, seen]``."""
    cfg, dist, device = run.cfg, run.dist, run.device
    run.model.train()
    t0 = time.perf_counter()
    # augmentation: one stream per (seed, epoch, rank); rank 0's is the single-process one
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch + 1 + 104_729 * dist.rank)
    sums = [0.0, 0.0, 0.0]  # loss_sum, correct, seen (this rank's)
    skip = 0
    if run.partial is not None:  # continue a mid-epoch checkpoint exactly where it stopped
        skip = int(run.partial["steps"])
        aug_gen.set_state(run.partial["aug_rng"][dist.rank].cpu())
        if run.main:
            sums = [float(v) for v in run.partial["sums"]]
        t0 -= float(run.partial["train_time"])
        run.partial = None
    if _progress_enabled(cfg) and run.main:
        from tqdm import tqdm

        run.bar = tqdm(total=run.steps_per_epoch, initial=skip, desc=f"epoch {epoch}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True, file=sys.stderr)

    def position(steps: int) -> dict:  # the mid-epoch checkpoint's view of this epoch
        return {"epoch": epoch, "steps": steps, "sums": dist.all_sum(sums, device),
                "aug_rng": dist.gather(aug_gen.get_state(), device),
                "train_time": time.perf_counter() - t0}

    for i, x, y, n_batch in _epoch_data(run, epoch, skip):
        # RNG states at the start of this step: a stop rewinds to them, so the mid-epoch
        # checkpoint replays this step exactly (augmentation, dropout)
        rewind = _rng_snapshot(aug_gen if run.augment else None, device)
        if run.augment:
            x = augment_batch(x, aug_gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if run.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            logits, loss = _train_step(run, x, y, n_batch, epoch)
        except _StopRequested:  # rewound, this step is the first the checkpoint replays
            _restore_rng(rewind, aug_gen, device)
            _interrupted(run, epoch, position(i))
        with torch.no_grad():
            sums[0] += loss.item() * len(y)
            sums[1] += (logits.argmax(1) == y).sum().item()
            sums[2] += len(y)
        for cb in run.callbacks:
            cb.on_step(step=run.step, epoch=epoch, model=run.model, inputs=x, targets=y,
                       loss_fn=run.loss_fn)
        if cfg.checkpoint_steps and run.step % cfg.checkpoint_steps == 0 \
                and i + 1 < run.steps_per_epoch:  # mid-epoch save (the epoch end has its own)
            run.save_last(run.payload(epoch - 1, None, position(i + 1)))
        if run.bar:
            run.bar.update(1)
            run.bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}")
    run.close_bar()
    return t0, dist.all_sum(sums, device)


def _epoch_data(run: Run, epoch: int, skip: int):
    """``(i, x, y, global_batch_len)`` of this rank's steps ``skip ..`` of ``epoch``.
    Datasets read item by item (imagefolder) use ``num_workers`` DataLoader processes."""
    cfg, dist = run.cfg, run.dist
    shards = list(itertools.islice(epoch_batches(len(run.train_ds), cfg.batch_size, cfg.seed,
                                                 epoch, dist.rank, dist.world), run.steps_per_epoch))
    todo = shards[skip:]
    if cfg.num_workers and not isinstance(run.train_ds, TensorData) and todo:
        loader = torch.utils.data.DataLoader(run.train_ds, batch_sampler=[s.tolist() for s, _ in todo],
                                             num_workers=cfg.num_workers)
        batches_xy = ((x, torch.as_tensor(y, dtype=torch.long)) for x, y in _one_line_errors(loader))
    else:
        batches_xy = (_fetch(run.train_ds, idx, run.device) for idx, _ in todo)
    for i, (_, n_batch), (x, y) in zip(itertools.count(skip), todo, batches_xy):
        yield i, x, y, n_batch


def _one_line_errors(loader):
    """Iterate ``loader``; a PnnhError raised in a worker process (which the DataLoader
    re-raises with the worker's traceback in its message) keeps only its own message."""
    try:
        yield from loader
    except PnnhError as e:
        last = str(e).strip().splitlines()[-1]  # "pnnh.errors.DataError: cannot read ..."
        raise type(e)(last.split(": ", 1)[-1] if last.startswith("pnnh.") else str(e)) from None


def _rng_snapshot(aug_gen: torch.Generator | None, device: torch.device) -> tuple:
    return (torch.get_rng_state(), aug_gen.get_state() if aug_gen is not None else None,
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_rng(snapshot: tuple, aug_gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        aug_gen.set_state(snapshot[1])
    if snapshot[2] is not None:
        torch.cuda.set_rng_state(snapshot[2], device)


# ----------------------------------------------------------------------------- one step
class _StopRequested(Exception):
    """Every rank agreed to stop before this step's update (a SIGINT/SIGTERM somewhere)."""


def _train_step(run: Run, x: torch.Tensor, y: torch.Tensor, n_batch: int,
                epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, one agreement between ranks (diverged? stop?), backward, clip, step, hooks,
    schedule. Returns ``(logits, loss)``; raises TrainingDiverged or _StopRequested (nothing
    updated yet)."""
    cfg, optimizer, scaler = run.cfg, run.optimizer, run.scaler
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if scaler else nullcontext()
    with ctx:
        logits = run.train_model(x)
        loss = run.loss_fn(logits, y)
        extra = extra_losses(run.loss_terms)
        total = loss + extra if extra is not None else loss
    # one flag exchange per step: every rank stops or diverges at the same step
    diverged, stopping = run.dist.any([not bool(torch.isfinite(total)), "signal" in run.stop],
                                      run.device)
    if diverged:
        _diverged(run, epoch, total)
    if stopping:
        raise _StopRequested
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over ranks: scale each shard's mean so that the average is the
    # global batch's mean (exact for unequal shards too)
    scale = shard_loss_scale(len(y), n_batch, run.dist.world)
    backward = total * scale if scale != 1 else total
    if scaler:
        scaler.scale(backward).backward()
        scaler.unscale_(optimizer)
    else:
        backward.backward()
    if cfg.grad_clip:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    for h in run.hooks:
        h()
    run.scheduler.step()
    run.step += 1
    return logits, loss


# ----------------------------------------------------------------------------- unusual ends
def _interrupted(run: Run, epoch: int, mid: dict | None):
    """Save ``last.pt`` (mid-epoch if ``mid``) and raise TrainingInterrupted."""
    signum = int(run.stop.get("signal") or signal.SIGTERM)
    where = run.ckpt_dir / "last.pt"
    if mid is not None and run.step > run.start_step:  # (at an epoch end last.pt is saved already)
        run.save_last(run.payload(epoch - 1, None, mid))
    run.close_bar()
    if run.writer:
        run.writer.close()
    pos = (f"epoch {epoch}, step {mid['steps']}/{run.steps_per_epoch}" if mid
           else f"end of epoch {epoch}")
    saved = f"checkpoint saved to {where}" if where.exists() else "no checkpoint yet"
    raise TrainingInterrupted(signum, f"{signal.Signals(signum).name} received: stopped at {pos}; "
                                      f"{saved}; continue with --resume")


def _diverged(run: Run, epoch: int, total: torch.Tensor):
    """A NaN/inf loss on some rank: summary.json says so, the last good checkpoint stays."""
    run.close_bar()
    where = run.ckpt_dir / "last.pt"
    kept = f"; the last good checkpoint is kept at {where}" if where.exists() else ""
    if run.main:
        atomic_write_json(run.out / "summary.json", {
            "status": "diverged", "diverged_epoch": epoch, "diverged_step": run.step,
            "model": run.cfg.model, "dataset": run.cfg.dataset, "params": run.params,
            "best_val_acc": max(run.best_acc, 0.0), "final_val_acc": None})
    raise TrainingDiverged(f"loss became {total.item()} at epoch {epoch}, step "
                           f"{run.step} (try a smaller --lr or --grad-clip){kept}")


def _record_failure(run: Run, epoch: int, e: PnnhError) -> None:
    if run.main and not isinstance(e, TrainingDiverged):
        atomic_write_json(run.out / "summary.json", {
            "status": "failed", "error": str(e), "failed_epoch": epoch,
            "model": run.cfg.model, "dataset": run.cfg.dataset, "params": run.params,
            "best_val_acc": max(run.best_acc, 0.0), "final_val_acc": None})


# ----------------------------------------------------------------------------- end of epoch
def _end_epoch(run: Run, epoch: int, sums: list[float], train_time: float, time_s: float,
               val_loss: float, val_acc: float) -> None:
    """Metrics line, best/last checkpoints, log line; then stop here if a signal came."""
    cfg = run.cfg
    loss_sum, correct, seen = sums
    record = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1),
              "train_acc": correct / max(seen, 1), "val_loss": val_loss, "val_acc": val_acc,
              "lr": run.optimizer.param_groups[0]["lr"],
              "images_per_s": seen / max(train_time, 1e-9), "time_s": time_s}
    improved = val_acc > run.best_acc
    if improved:
        run.best_acc, run.best_epoch = val_acc, epoch
    save_last = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
    p = run.payload(epoch, val_acc) if save_last or improved else None
    if run.main:
        run.history.append(record)
        append_jsonl(run.out / "metrics.jsonl", record)  # before last.pt: see the module doc
        if run.writer:
            for k, v in record.items():
                if k != "epoch":
                    run.writer.add_scalar(k, v, epoch)
        if improved:  # best.pt before last.pt: a crash between them replays this epoch
            save_checkpoint(run.ckpt_dir / "best.pt", p)
        if save_last:
            run.save_last(p)
        _log(f"epoch {epoch}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  "
             f"train_acc {record['train_acc']:.4f}  val_loss {val_loss:.4f}  "
             f"val_acc {val_acc:.4f}  lr {record['lr']:.3g}  "
             f"{record['images_per_s']:.0f} img/s  {record['time_s']:.1f}s")
    (stopping,) = run.dist.any(["signal" in run.stop], run.device)
    if stopping and epoch < cfg.epochs:
        if not save_last:  # make last.pt this epoch's state before stopping
            run.save_last(run.payload(epoch, val_acc))
        _interrupted(run, epoch, None)


# ----------------------------------------------------------------------------- summary
def _summary(run: Run) -> dict:
    """``summary.json`` of a finished run (rank 0 writes it); every rank returns it."""
    cfg, history = run.cfg, run.history
    final = history[-1] if history else {}
    summary = {
        "status": "finished", "model": cfg.model, "dataset": cfg.dataset, "depth": cfg.depth,
        "width": cfg.width, "model_args": cfg.model_args, "params": run.params,
        "epochs": cfg.epochs, "best_val_acc": run.best_acc, "best_epoch": run.best_epoch,
        "final_val_acc": final.get("val_acc"), "final_val_loss": final.get("val_loss"),
        "final_train_loss": final.get("train_loss"), "final_train_acc": final.get("train_acc"),
        "mean_images_per_s": (sum(r["images_per_s"] for r in history) / len(history)
                              if history else None),
        "time_s": sum(r["time_s"] for r in history),
        "run_time_s": time.perf_counter() - run.run_start,
        "world_size": run.dist.world,
        "resumed_from_epoch": run.resumed_from,
    }
    if run.main:
        atomic_write_json(run.out / "summary.json", summary)
        # prev.pt guards a run in progress against a damaged last.pt; a finished run's folder
        # keeps last.pt and best.pt only
        (run.ckpt_dir / "prev.pt").unlink(missing_ok=True)
    return summary
