"""Training configuration: one dataclass, loaded from YAML and overridden by CLI flags.

Precedence: dataclass defaults < ``--config FILE.yaml`` < explicit command-line flags.
Every value is validated here, and a bad value raises :class:`pnnh.errors.ConfigError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pnnh.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("cpu", "cuda", "auto")
# upper bounds that catch a typo (an extra zero or three) before it allocates or runs forever
MAX = {"epochs": 1_000_000, "depth": 10_000, "width": 1_000_000, "num_samples": 10_000_000}


def _opt(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A TrainConfig field with its command-line help (``pnnh train --FIELD``) as metadata;
    ``flag=False`` for fields set another way, ``choices`` / ``metavar`` for the flag."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Every training setting. Each field is a config-file key and a ``pnnh train`` flag
    (generated from these fields: ``pnnh.cli.add_config_flags``)."""

    model: str = _opt("resnet_mlp", "registered model name (see `pnnh models`)")
    dataset: str = _opt("mnist1d", "mnist1d, digits, fashion_mnist, mnist, cifar10, cifar100, "
                                   "imagefolder, synthetic")
    depth: int | None = _opt(None, "number of weight layers")
    width: int | None = _opt(None, "hidden width / base channels")
    model_args: dict = _opt({}, "family-specific options (coder_ratio, ...)", flag=False)
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(128, "global batch (split across torchrun processes)")
    lr: float = _opt(1e-3, "peak learning rate")
    lr_multipliers: dict = _opt({}, "lr factor per submodule, by name or dotted pattern (e.g. "
                                    "blocks=0.1: the blocks at lr / 10; blocks.*.enc=0.3; the most "
                                    "specific key wins; flag --lr-multiplier)", flag=False)
    optimizer: str = _opt("adamw", "optimizer", choices=OPTIMIZERS)
    momentum: float = _opt(0.9, "SGD momentum (Nesterov when > 0)")
    weight_decay: float = _opt(0.0, "weight decay (not on biases and norm parameters)")
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_epochs: float = _opt(0.0, "linear warmup length in epochs")
    step_size: int = _opt(30, "epochs between decays for the step schedule")
    gamma: float = _opt(0.1, "decay factor for the step schedule")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy")
    grad_clip: float | None = _opt(None, "clip the gradient norm to this value")
    seed: int = _opt(0, "seed of weights, batch order and augmentation")
    device: str = _opt("auto", "device", choices=DEVICES)
    data_dir: str | None = _opt(None, "directory holding cifar/imagefolder data, or the IDX files of "
                                      "fashion_mnist/mnist (default for those: $PNNH_DATA_DIR, "
                                      "the pnnh cache, /usr/share/datasets)")
    dataset_args: dict = _opt({}, "e.g. synthetic input_shape, image_size", flag=False)
    augment: bool | None = _opt(None, "random crop + flip (default: on for 2-D image datasets)")
    num_samples: int | None = _opt(None, "dataset size for mnist1d/synthetic; for fashion_mnist/mnist "
                                         "a fixed subset of the training split (the test split "
                                         "stays whole)")
    val_batch_size: int = _opt(1000, "batch size of the evaluation")
    num_workers: int = _opt(0, "DataLoader worker processes for datasets read item by item "
                               "(imagefolder; 0: the main process)")
    out: str = _opt("runs/train", "run directory")
    # true: continue from out/checkpoints/last.pt (prev.pt if last.pt is damaged); "auto": the
    # same when that checkpoint's config equals this one (TRAJECTORY_FREE fields aside), refuse
    # one of another config, start fresh without one; false: start fresh. None: "auto" under
    # torchrun (an elastic restart must continue by itself), false otherwise.
    resume: bool | str | None = _opt(None, "see --resume / --no-resume", flag=False)
    track_norms: int = _opt(0, "record per-block gradient norms every N steps (0: off)",
                            metavar="N")
    amp: bool = _opt(False, "mixed precision (CUDA only)")
    channels_last: bool | None = _opt(None, "channels-last memory format (default: on for 2-D "
                                            "conv nets, CPU and CUDA; --no-channels-last: off)")
    compile: bool = _opt(False, "torch.compile")
    sync_bn: bool = _opt(False, "synchronise BatchNorm statistics across torchrun processes "
                                "(CUDA)")
    dist_timeout: float | None = _opt(None, "seconds a torchrun collective waits for a rank that "
                                            "hung before the job fails (default: torch's, 30 "
                                            "min for gloo)", metavar="S")
    tensorboard: bool = _opt(False, "also log to OUT/tensorboard")
    checkpoint_every: int = _opt(1, "epochs between checkpoints/last.pt saves", metavar="N")
    checkpoint_steps: int = _opt(0, "also save checkpoints/last.pt every N steps inside an "
                                    "epoch (0: off)", metavar="N")
    max_steps_per_epoch: int | None = _opt(None, "cap on optimizer steps per epoch (tests, "
                                                 "benchmarks)")
    progress: bool | None = _opt(None, "a progress bar (default: on a terminal)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# fields that change where and how a run reports, never the numbers it computes: a checkpoint
# saved under other values of these is still "the same configuration" for resume: auto
TRAJECTORY_FREE = ("out", "resume", "progress", "tensorboard", "data_dir", "checkpoint_every",
                   "checkpoint_steps", "num_workers", "dist_timeout")


def config_differences(stored: dict, cfg: TrainConfig) -> list[str]:
    """``"field: stored -> now"`` for every field where a checkpoint's config differs from
    ``cfg`` (fields the stored config lacks count as their default; TRAJECTORY_FREE ignored)."""
    now, default = cfg.to_dict(), TrainConfig().to_dict()
    return [f"{k}: {stored.get(k, default[k])!r} -> {v!r}" for k, v in now.items()
            if k not in TRAJECTORY_FREE and stored.get(k, default[k]) != v]


def _resume_value(value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text == "auto":
        return "auto"
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off", "never"):
        return False
    raise ConfigError(f"resume: expected true, false or auto, got {value!r}", field="resume")


def _check_type(name: str, value: Any) -> Any:
    """Coerce YAML/CLI values to the field's type, or raise a ConfigError naming the field."""
    if name == "resume":
        return _resume_value(value)
    f = FIELDS[name]
    t = f.type if isinstance(f.type, str) else str(f.type)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{name}: must not be empty", field=name)
    try:
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if t.startswith("str"):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if t.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            bad_keys = [k for k in value if not _valid_key(name, k)]
            if bad_keys:
                raise ConfigError(f"{name}: option names must be identifiers, got {bad_keys[0]!r}",
                                  field=name)
            return dict(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"{name}: expected {t.replace(' | None', '')}, got {value!r}", field=name
        ) from None
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Range checks; raises ConfigError naming the first bad field."""

    def bad(name: str, why: str):
        raise ConfigError(f"{name}: {why} (got {getattr(cfg, name)!r})", field=name)

    if cfg.epochs < 1:
        bad("epochs", "must be at least 1")
    if cfg.batch_size < 1:
        bad("batch_size", "must be at least 1")
    if cfg.val_batch_size < 1:
        bad("val_batch_size", "must be at least 1")
    if not cfg.lr > 0:
        bad("lr", "must be positive")
    for key, factor in cfg.lr_multipliers.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ConfigError(f"lr_multipliers: {key}: must be a positive number "
                              f"(got {factor!r})", field="lr_multipliers")
    if cfg.weight_decay < 0:
        bad("weight_decay", "must be >= 0")
    if not 0 <= cfg.momentum < 1:
        bad("momentum", "must be in [0, 1)")
    if not 0 <= cfg.label_smoothing < 1:
        bad("label_smoothing", "must be in [0, 1)")
    if cfg.warmup_epochs < 0 or cfg.warmup_epochs > cfg.epochs:
        bad("warmup_epochs", "must be between 0 and epochs")
    if cfg.optimizer not in OPTIMIZERS:
        bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
    if cfg.step_size < 1:
        bad("step_size", "must be at least 1")
    if not 0 < cfg.gamma <= 1:
        bad("gamma", "must be in (0, 1]")
    if cfg.device not in DEVICES:
        bad("device", f"must be one of {', '.join(DEVICES)}")
    if cfg.depth is not None and cfg.depth < 1:
        bad("depth", "must be at least 1")
    if cfg.width is not None and cfg.width < 1:
        bad("width", "must be at least 1")
    if cfg.num_samples is not None and cfg.num_samples < 20:
        bad("num_samples", "must be at least 20")
    for name, top in MAX.items():
        value = getattr(cfg, name)
        if value is not None and value > top:
            bad(name, f"must be at most {top:,}")
    if cfg.grad_clip is not None and not cfg.grad_clip > 0:
        bad("grad_clip", "must be positive")
    if cfg.track_norms < 0:
        bad("track_norms", "must be >= 0")
    if cfg.num_workers < 0:
        bad("num_workers", "must be >= 0")
    if cfg.dist_timeout is not None and not cfg.dist_timeout > 0:
        bad("dist_timeout", "must be a positive number of seconds")
    if cfg.checkpoint_every < 1:
        bad("checkpoint_every", "must be at least 1")
    if cfg.checkpoint_steps < 0:
        bad("checkpoint_steps", "must be >= 0")
    if cfg.max_steps_per_epoch is not None and cfg.max_steps_per_epoch < 1:
        bad("max_steps_per_epoch", "must be at least 1")
    if not 0 <= cfg.seed < 2**32:
        bad("seed", "must be in [0, 2**32)")
    if not cfg.out:
        bad("out", "must be a directory path")
    return cfg


def from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Apply ``values`` (config-file keys or flags) on top of ``base``; unknown keys are errors."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    cfg.model_args = dict(cfg.model_args)
    cfg.dataset_args = dict(cfg.dataset_args)
    cfg.lr_multipliers = dict(cfg.lr_multipliers)
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(
                f"unknown config key {key!r}; valid keys: {', '.join(sorted(FIELDS))}", field=name
            )
        value = _check_type(name, value)
        if name in ("model_args", "dataset_args"):
            getattr(cfg, name).update(value)
        else:
            setattr(cfg, name, value)
    return cfg


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``yaml.safe_load`` (no code execution)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}", field="config") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}", field="config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid YAML"
        raise ConfigError(f"config file {path} is not valid YAML: {first}", field="config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}",
            field="config",
        )
    return data


def resolve(
    config: TrainConfig | dict | str | Path | None = None, overrides: dict | None = None
) -> TrainConfig:
    """Build a validated config from a dataclass, a dict or a YAML path, then ``overrides``."""
    if config is None:
        cfg = TrainConfig()
    elif isinstance(config, TrainConfig):
        cfg = from_dict({}, config)
    elif isinstance(config, dict):
        cfg = from_dict(config)
    else:
        cfg = from_dict(load_yaml(config))
    if overrides:
        cfg = from_dict(overrides, cfg)
    return validate(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


MODULE_PATTERN = re.compile(r"[\w*?\[\]]+(\.[\w*?\[\]]+)*")


def _valid_key(field_name: str, key: Any) -> bool:
    """Option names are identifiers; ``lr_multipliers`` keys are module paths, whose dotted
    parts may be ``fnmatch`` patterns (``blocks.*.enc``)."""
    if not isinstance(key, str):
        return False
    if field_name == "lr_multipliers":
        return MODULE_PATTERN.fullmatch(key) is not None
    return key.isidentifier()


def parse_model_arg(text: str, flag: str = "--model-arg") -> tuple[str, Any]:
    """``KEY=VALUE`` → (key, YAML-parsed value), for ``--model-arg`` / ``--dataset-arg`` /
    ``--lr-multiplier``."""
    field_name = ("lr_multipliers" if flag == "--lr-multiplier"
                  else flag.lstrip("-").replace("-arg", "_args"))
    if "=" not in text:
        raise ConfigError(f"{flag} expects KEY=VALUE, got {text!r}", field=field_name)
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not _valid_key(field_name, key):
        raise ConfigError(f"{flag}: {key!r} is not a valid option name", field=field_name)
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed
