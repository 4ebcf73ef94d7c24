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
long epoch loses at most N steps.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pnnh import config as config_mod
from pnnh.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pnnh.data import TensorData, augment_batch, get_dataset
from pnnh.errors import ConfigError, PnnhError, TrainingDiverged
from pnnh.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, rewrite_jsonl
from pnnh.registry import count_parameters, create_model

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                 "images_per_s", "time_s")


# ----------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available", field="device")
    return torch.device(name)


class Distributed:
    """Rank/world from torchrun's environment; a no-op for a single process."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            use_cuda = device_name != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flags: list[bool], device) -> list[bool]:
        """Element-wise OR across ranks (every rank takes the same branch afterwards)."""
        if not self.enabled:
            return flags
        return [v > 0 for v in self.all_sum([float(f) for f in flags], device)]

    def gather(self, t: torch.Tensor, device) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor (e.g. RNG states), on the CPU."""
        if not self.enabled:
            return [t.cpu()]
        src = t.to(device)
        parts = [torch.empty_like(src) for _ in range(self.world)]
        torch.distributed.all_gather(parts, src)
        return [p.cpu() for p in parts]

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


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


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation parameters (1-D tensors); the
    parameters of a top-level submodule named in ``cfg.lr_multipliers`` at ``lr * factor``."""
    mult = dict(getattr(cfg, "lr_multipliers", None) or {})
    children = dict(model.named_children())
    for name in mult:
        if name not in children:
            raise ConfigError(f"lr_multipliers: {cfg.model} has no submodule {name!r} "
                              f"(it has {', '.join(children)})", field="lr_multipliers")
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            factor = float(mult.get(name.split(".", 1)[0], 1.0))
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


def _fetch(dataset, idx: torch.Tensor):
    if isinstance(dataset, TensorData):
        x, y = dataset.tensors
        return x[idx], y[idx]
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
        x, y = _fetch(dataset, order[i:i + batch_size])
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
    dist = Distributed(cfg.device)
    state: dict = {}
    try:
        with _stop_on_signals(state):
            return _train(cfg, dist, list(callbacks or []), state)
    finally:
        dist.close()


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


def _train(cfg, dist: Distributed, callbacks: list, stop: dict) -> dict:
    device = pick_device(cfg.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    main = dist.is_main
    progress = _progress_enabled(cfg) and main

    # ------------------------------------------------------------ validate, write nothing
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard: install the 'tensorboard' package to use it",
                              field="tensorboard") from None
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
    if cfg.channels_last and device.type == "cuda":
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

    start_epoch, best_acc, best_epoch = 1, -1.0, 0
    resumed_from = None
    partial = None  # a mid-epoch position saved by SIGINT/SIGTERM
    if cfg.resume and (ckpt_dir / "last.pt").exists():
        ckpt = load_checkpoint(ckpt_dir / "last.pt")  # on the CPU; load_state_dict moves it
        if ckpt.get("model_name") != cfg.model:
            raise ConfigError(f"resume: {ckpt_dir / 'last.pt'} holds model "
                              f"{ckpt.get('model_name')!r}, not {cfg.model!r}", field="model")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"resume: {ckpt_dir / 'last.pt'} does not fit this configuration "
                              f"(depth/width/model_args/optimizer changed?): "
                              f"{str(e).splitlines()[0][:200]}", field="resume") from None
        set_rng_state(ckpt["rng"])
        ranks_rng = ckpt.get("rank_torch_rng")
        if dist.enabled and ranks_rng and len(ranks_rng) == dist.world:
            torch.set_rng_state(ranks_rng[dist.rank].cpu())
        elif dist.rank > 0:  # saved by another number of ranks: fresh, distinct streams
            torch.manual_seed(cfg.seed + 1_000_003 * dist.rank + 7_919 * int(ckpt["epoch"]))
        start_epoch = int(ckpt["epoch"]) + 1
        best_acc, best_epoch = float(ckpt["best_val_acc"]), int(ckpt["best_epoch"])
        resumed_from = int(ckpt["epoch"])
        partial = ckpt.get("partial_epoch")
        if partial is not None and len(partial["aug_rng"]) != dist.world:
            raise ConfigError(f"resume: {ckpt_dir / 'last.pt'} was saved mid-epoch by "
                              f"{len(partial['aug_rng'])} rank(s); resume it with the same number "
                              f"of processes (now {dist.world})", field="resume")
    if main:
        if resumed_from is not None:
            where = f"epoch {resumed_from}" + (f", step {partial['steps']} of epoch "
                                               f"{partial['epoch']}" if partial else "")
            _log(f"resuming from {ckpt_dir / 'last.pt'} ({where})")
        elif cfg.resume:
            _log(f"no checkpoint at {ckpt_dir / 'last.pt'}; starting from scratch")

    # ------------------------------------------------------------ from here on, rank 0 writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in [*out.glob(".*.tmp"), *ckpt_dir.glob(".*.tmp")]:  # left by a killed run
            tmp.unlink(missing_ok=True)
        atomic_write_text(out / "config.yaml", config_mod.dump_yaml(cfg))
        if resumed_from is None:
            for stale in ("metrics.jsonl", "norms.jsonl", "summary.json"):
                (out / stale).unlink(missing_ok=True)
        else:  # drop lines written after that checkpoint (a crash mid-epoch)
            rewrite_jsonl(out / "metrics.jsonl",
                          [r for r in read_jsonl(out / "metrics.jsonl") if r["epoch"] <= resumed_from])
            if (out / "norms.jsonl").exists():
                last_step = (resumed_from * steps_per_epoch + (partial["steps"] if partial else 0))
                rewrite_jsonl(out / "norms.jsonl", [r for r in read_jsonl(out / "norms.jsonl")
                                                    if r.get("step", 0) <= last_step])

    if cfg.track_norms and main:
        from pnnh.probes.norms import NormTracker

        callbacks.append(NormTracker(every=cfg.track_norms, path=out / "norms.jsonl"))

    writer = SummaryWriter(log_dir=str(out / "tensorboard")) if cfg.tensorboard and main else None

    train_model = model
    if cfg.compile:
        train_model = torch.compile(model)
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    hooks = module_methods(model, "after_optimizer_step")
    loss_terms = module_methods(model, "extra_loss")

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)

    def payload(epoch: int, val_acc: float | None, mid: dict | None = None) -> dict:
        """Checkpoint content after ``epoch`` complete epochs (+ ``mid``: a partial one).
        Collective under DDP: every rank calls it, rank 0 writes."""
        rank_rng = dist.gather(torch.get_rng_state(), device) if dist.enabled else None
        p = {
            "epoch": epoch, "step": step, "model_name": cfg.model, "model_kwargs": model_kwargs,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "config": cfg.to_dict(), "rng": rng_state(),
            "best_val_acc": best_acc, "best_epoch": best_epoch, "val_acc": val_acc,
            "world_size": dist.world,
        }
        if rank_rng is not None:
            p["rank_torch_rng"] = rank_rng
        if mid is not None:
            p["partial_epoch"] = mid
        return p

    def interrupted(epoch: int, mid: dict | None):
        """Save ``last.pt`` (mid-epoch if ``mid``) and raise TrainingInterrupted."""
        signum = int(stop.get("signal") or signal.SIGTERM)
        name = signal.Signals(signum).name
        where = ckpt_dir / "last.pt"
        if mid is not None and step > start_step:  # (at an epoch end last.pt is saved already)
            p = payload(epoch - 1, None, mid)
            if main:
                save_checkpoint(where, p)
        if bar:
            bar.close()
        if writer:
            writer.close()
        pos = (f"epoch {epoch}, step {mid['steps']}/{steps_per_epoch}" if mid
               else f"end of epoch {epoch}")
        saved = f"checkpoint saved to {where}" if where.exists() else "no checkpoint yet"
        raise TrainingInterrupted(signum, f"{name} received: stopped at {pos}; {saved}; "
                                          f"continue with --resume")

    if main:
        _log(f"training {cfg.model} ({params:,} params) on {cfg.dataset} "
             f"[{len(train_ds)} train / {len(val_ds)} val] for {cfg.epochs} epochs on {device}"
             + (f" x{dist.world} ranks" if dist.enabled else ""))

    history = read_jsonl(out / "metrics.jsonl") if resumed_from is not None and main else []
    step = (start_epoch - 1) * steps_per_epoch + (partial["steps"] if partial else 0)
    start_step = step
    run_start = time.perf_counter()
    bar = None
    for epoch in range(start_epoch, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        # augmentation: one stream per (seed, epoch, rank); rank 0's is the single-process one
        aug_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch + 1 + 104_729 * dist.rank)
        loss_sum = correct = seen = 0.0
        skip = 0
        if partial is not None:  # continue a mid-epoch checkpoint exactly where it stopped
            skip = int(partial["steps"])
            aug_gen.set_state(partial["aug_rng"][dist.rank].cpu())
            if main:
                loss_sum, correct, seen = (float(v) for v in partial["sums"])
            t0 -= float(partial["train_time"])
            partial = None
        it = epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, epoch, dist.rank, dist.world)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True, file=sys.stderr)
        try:
            for i, (idx, n_batch) in enumerate(it):
                if i >= steps_per_epoch:
                    break
                if i < skip:
                    continue
                # RNG states at the start of this step: a stop below rewinds to them, so the
                # mid-epoch checkpoint replays this step exactly (augmentation, dropout)
                rewind = (torch.get_rng_state(), aug_gen.get_state() if augment else None,
                          torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
                x, y = _fetch(train_ds, idx)
                if augment:
                    x = augment_batch(x, aug_gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if cfg.channels_last and device.type == "cuda" and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
                with ctx:
                    logits = train_model(x)
                    loss = loss_fn(logits, y)
                    extra = extra_losses(loss_terms)
                    total = loss + extra if extra is not None else loss
                # one flag exchange per step: every rank stops or diverges at the same step
                diverged, stopping = dist.any([not bool(torch.isfinite(total)),
                                               "signal" in stop], device)
                if stopping and not diverged:
                    torch.set_rng_state(rewind[0])
                    if rewind[1] is not None:
                        aug_gen.set_state(rewind[1])
                    if rewind[2] is not None:
                        torch.cuda.set_rng_state(rewind[2], device)
                    sums = dist.all_sum([loss_sum, correct, seen], device)
                    aug_states = dist.gather(aug_gen.get_state(), device)
                    interrupted(epoch, {"epoch": epoch, "steps": i, "sums": sums,
                                        "aug_rng": aug_states,
                                        "train_time": time.perf_counter() - t0})
                if diverged:
                    if bar:
                        bar.close()
                    where = ckpt_dir / "last.pt"
                    kept = f"; the last good checkpoint is kept at {where}" if where.exists() else ""
                    if main:
                        atomic_write_json(out / "summary.json", {
                            "status": "diverged", "diverged_epoch": epoch, "diverged_step": step,
                            "model": cfg.model, "dataset": cfg.dataset, "params": params,
                            "best_val_acc": max(best_acc, 0.0), "final_val_acc": None})
                    raise TrainingDiverged(f"loss became {total.item()} at epoch {epoch}, step "
                                           f"{step} (try a smaller --lr or --grad-clip){kept}")
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks: scale each shard's mean so that the
                # average is the global batch's mean (exact for unequal shards too)
                scale = shard_loss_scale(len(y), n_batch, dist.world)
                backward = total * scale if scale != 1 else total
                if scaler:
                    scaler.scale(backward).backward()
                    scaler.unscale_(optimizer)
                else:
                    backward.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                for h in hooks:
                    h()
                scheduler.step()
                step += 1
                with torch.no_grad():
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += len(y)
                for cb in callbacks:
                    cb.on_step(step=step, epoch=epoch, model=model, inputs=x, targets=y,
                               loss_fn=loss_fn)
                if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0 \
                        and i + 1 < steps_per_epoch:  # mid-epoch save (the epoch end has its own)
                    p = payload(epoch - 1, None, {
                        "epoch": epoch, "steps": i + 1,
                        "sums": dist.all_sum([loss_sum, correct, seen], device),
                        "aug_rng": dist.gather(aug_gen.get_state(), device),
                        "train_time": time.perf_counter() - t0})
                    if main:
                        save_checkpoint(ckpt_dir / "last.pt", p)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            if bar:
                bar.close()
                bar = None
            train_time = time.perf_counter() - t0
            loss_sum, correct, seen = dist.all_sum([loss_sum, correct, seen], device)
            val_loss, val_acc = evaluate(model, val_ds, cfg.val_batch_size, device, dist,
                                         cfg.channels_last and device.type == "cuda")
        except PnnhError as e:  # e.g. an unreadable image met mid-run: say so in summary.json
            if main and not isinstance(e, TrainingDiverged):
                atomic_write_json(out / "summary.json", {
                    "status": "failed", "error": str(e), "failed_epoch": epoch,
                    "model": cfg.model, "dataset": cfg.dataset, "params": params,
                    "best_val_acc": max(best_acc, 0.0), "final_val_acc": None})
            raise
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / max(train_time, 1e-9),
            "time_s": time.perf_counter() - t0,
        }
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch
        save_last = epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
        p = payload(epoch, val_acc) if save_last or improved else None
        if main:
            history.append(record)
            append_jsonl(out / "metrics.jsonl", record)  # before last.pt: see the module doc
            if writer:
                for k, v in record.items():
                    if k != "epoch":
                        writer.add_scalar(k, v, epoch)
            if improved:  # best.pt before last.pt: a crash between them replays this epoch
                save_checkpoint(ckpt_dir / "best.pt", p)
            if save_last:
                save_checkpoint(ckpt_dir / "last.pt", p)
            _log(f"epoch {epoch}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  "
                 f"train_acc {record['train_acc']:.4f}  val_loss {val_loss:.4f}  "
                 f"val_acc {val_acc:.4f}  lr {record['lr']:.3g}  "
                 f"{record['images_per_s']:.0f} img/s  {record['time_s']:.1f}s")
        (stopping,) = dist.any(["signal" in stop], device)
        if stopping and epoch < cfg.epochs:
            if not save_last:  # make last.pt this epoch's state before stopping
                p = payload(epoch, val_acc)
                if main:
                    save_checkpoint(ckpt_dir / "last.pt", p)
            interrupted(epoch, None)

    if writer:
        writer.close()
    final = history[-1] if history else {}
    summary = {
        "status": "finished",
        "model": cfg.model,
        "dataset": cfg.dataset,
        "depth": cfg.depth,
        "width": cfg.width,
        "model_args": cfg.model_args,
        "params": params,
        "epochs": cfg.epochs,
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
        "final_val_acc": final.get("val_acc"),
        "final_val_loss": final.get("val_loss"),
        "final_train_loss": final.get("train_loss"),
        "final_train_acc": final.get("train_acc"),
        "mean_images_per_s": (sum(r["images_per_s"] for r in history) / len(history)
                              if history else None),
        "time_s": sum(r["time_s"] for r in history),
        "run_time_s": time.perf_counter() - run_start,
        "world_size": dist.world,
        "resumed_from_epoch": resumed_from,
    }
    if main:
        atomic_write_json(out / "summary.json", summary)
    return summary
