"""Checkpoints: written atomically, checksummed, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain Python values and tensors (state dicts, config, RNG states),
never pickled objects, so loading cannot execute code from the file. Saving goes through a
temporary file and a rename, so ``last.pt`` is either the old or the new checkpoint, never half.

Every checkpoint carries ``sha256``, a digest of its whole content (every tensor's dtype, shape
and bytes, every key and plain value, in order). :func:`load_checkpoint` recomputes it, so a
file damaged on disk or in transit (flipped bytes, a truncation that still unzips) is a
:class:`~pnnh.errors.CheckpointError`, never a silently wrong model.

The training loop keeps two generations: :func:`save_checkpoint` with ``keep_previous`` writes
the new file to a temporary name first, then renames the current ``last.pt`` to ``prev.pt`` and
the new file to ``last.pt``. At every instant a good checkpoint exists under one of the two
names; :func:`load_latest` reads ``last.pt`` and falls back to ``prev.pt`` when ``last.pt`` is
damaged or missing. A write that fails (a full disk: ``OSError(ENOSPC)``) removes its temporary
file, leaves both generations as they were and is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from pnnh.errors import CheckpointError, PnnhError
from pnnh.io import _MODE, content_digest, verify_digest
from pnnh.io import DIGEST_HEADER as _HEADER

FORMAT = "pnnh-checkpoint"
VERSION = 2  # 2: adds the sha256 content digest
def save_checkpoint(path: str | Path, payload: dict, keep_previous: str | None = None) -> Path:
    """Serialise ``payload`` (plus a format tag and its sha256 digest) and write it atomically.

    With ``keep_previous`` (a file name in the same folder, e.g. ``"prev.pt"``) the checkpoint
    that ``path`` held is renamed to it once the new one is safely on disk. A failed write
    (no space left, read-only disk) leaves every existing file intact and raises a one-line
    :class:`CheckpointError` naming ``path``.
    """
    path = Path(path)
    body = {k: v for k, v in payload.items() if k not in _HEADER}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "sha256": content_digest(body), **body}, buf)
    try:
        tmp = _write_temporary(path, buf.getvalue())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(keep_previous))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        kept = " (the previous checkpoint is intact)" if path.exists() else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}{kept}",
                              field="checkpoint") from None
    return path


def _write_temporary(path: Path, data: bytes) -> str:
    """``data`` in a fsynced temporary file next to ``path`` (removed again if writing fails)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_latest(folder: str | Path, names: tuple[str, ...] = ("last.pt", "prev.pt"),
                log=None) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint among ``names`` in ``folder``: ``(path, checkpoint)``.

    ``names`` are tried in order; a damaged one is skipped (``log`` is told why) when a later
    one loads. None when none exists; when every existing one is damaged, the first one's
    :class:`CheckpointError` is raised.
    """
    folder = Path(folder)
    first_error = None
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            first_error = first_error or e
            continue
        if first_error is not None and log is not None:
            log(f"{first_error}; falling back to {path}")
        return path, ckpt
    if first_error is not None:
        raise first_error
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a pnnh checkpoint safely; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}", field="checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any failure to unpickle/unzip means a bad file, never a crash
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "it contains pickled objects that are not allowed (refused to execute code)"
        raise CheckpointError(
            f"cannot load checkpoint {path}: {msg[:200]} (truncated, corrupted or not a "
            "pnnh checkpoint)", field="checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pnnh checkpoint", field="checkpoint")
    verify_digest(path, ckpt, "(written by pnnh < 0.1 or by hand); refusing to load it unverified")
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model stored in a checkpoint: returns ``(model, checkpoint_dict)``.

    The model is created from the registry with the saved name and keyword arguments, then
    its weights are loaded (strictly).
    """
    from pnnh.models.factory import create_model

    ckpt = load_checkpoint(path, map_location)
    try:
        name, kwargs, state = ckpt["model_name"], dict(ckpt["model_kwargs"]), ckpt["model"]
    except KeyError as e:
        raise CheckpointError(f"{path}: checkpoint lacks {e.args[0]!r}", field="checkpoint") from None
    if "in_shape" in kwargs:
        kwargs["in_shape"] = tuple(kwargs["in_shape"])
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        older = _before_learned_transitions(name, kwargs, state)
        if older is None:
            raise CheckpointError(f"{path}: weights do not fit model {name!r}: {str(e)[:300]}",
                                  field="checkpoint") from None
        model = older
    return model, ckpt


def _before_learned_transitions(name: str, kwargs: dict, state: dict):
    """A BatchNorm CNN PNNH checkpoint saved before the learned 1x1 transition ``S`` became the
    default (its transitions hold the fixed 2x2 ``P``, no ``transition_coder`` recorded): the
    model it was, ``transition_coder="orthogonal"``, loaded; None when that does not fit either."""
    from pnnh.models.factory import create_model, model_info

    if "transition_coder" in kwargs or "transition_coder" not in model_info(name).parameters():
        return None
    model = create_model(name, **kwargs, transition_coder="orthogonal")
    try:
        model.load_state_dict(state)
    except RuntimeError:
        return None
    return model


def rng_state() -> dict:
    """Every RNG the training loop touches, as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(("MT19937", state["numpy_keys"].cpu().numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached_gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def _has_residual_blocks(model) -> bool:
    """A ResNet layout (``resnet_to_plain``) rather than a plain/PNNH one (``to_plain``)."""
    from pnnh.convert_layouts import resnet_layout

    try:
        _, blocks, _, _ = resnet_layout(model)
    except PnnhError:
        return False
    return any(not hasattr(b, "to_plain_layers") for _, b in blocks)


def export_model(model, format: str, out: str | Path, in_shape, meta: dict | None = None) -> Path:
    """Write ``model``'s plain form (``plain``/``onnx``): :func:`pnnh.export.to_plain` for plain
    and PNNH models, :func:`pnnh.convert.resnet_to_plain` for ResNets (torchvision, timm,
    pnnh). Checks that the plain network reproduces the model's outputs (atol 1e-4, relative to
    the output's size) on a random batch of shape ``(2, *in_shape)`` before writing."""
    from pnnh.convert_layouts import resnet_to_plain
    from pnnh.export import export_onnx, save_plain, to_plain

    if format not in ("plain", "onnx"):
        raise PnnhError(f"format: must be plain or onnx, got {format!r}", field="format")
    if format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise PnnhError("format onnx needs the 'onnx' package: pip install 'pnnh[onnx]'",
                            field="format") from None
    model.eval()
    try:
        plain = to_plain(model)
    except PnnhError:
        if not _has_residual_blocks(model):
            raise
        plain = resnet_to_plain(model)
    example = torch.randn(2, *in_shape)
    with torch.no_grad():
        try:
            y = model(example)
        except RuntimeError as e:
            raise PnnhError(f"input_shape: the model does not run on inputs of shape "
                            f"{tuple(in_shape)}: {str(e)[:200]}", field="input_shape") from None
        err = float((plain(example) - y).abs().max())
    if not err <= 1e-4 * max(1.0, float(y.abs().max())):
        raise PnnhError(f"export check failed: plain network differs by {err:.3g}",
                        field="model")
    if format == "onnx":
        return export_onnx(model, out, example, plain=plain)
    return save_plain(plain, out, {"in_shape": list(in_shape), **(meta or {})})


def export_checkpoint(checkpoint: str | Path, format: str, out: str | Path) -> Path:
    """``pnnh export --checkpoint``: load a training checkpoint, write its plain form
    (:func:`export_model`).

    It lives here, beside :func:`load_model`, so that :mod:`pnnh.export` needs no checkpoint
    code (the import graph has no ``export -> checkpoint -> models -> tat -> export`` cycle).
    """
    if format not in ("plain", "onnx"):
        raise PnnhError(f"format: must be plain or onnx, got {format!r}", field="format")
    model, ckpt = load_model(checkpoint)
    in_shape = tuple(getattr(model, "in_shape", ()) or ckpt.get("model_kwargs", {}).get("in_shape"))
    meta = {"model_name": ckpt.get("model_name"), "source": str(checkpoint)}
    return export_model(model, format, out, in_shape, meta)
