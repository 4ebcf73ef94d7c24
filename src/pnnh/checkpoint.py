"""Checkpoints: written atomically, checksummed, loaded with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain Python values and tensors (state dicts, config, RNG states),
never pickled objects, so loading cannot execute code from the file. Saving goes through a
temporary file and a rename, so ``last.pt`` is either the old or the new checkpoint, never half.

Every checkpoint carries ``sha256``, a digest of its whole content (every tensor's dtype, shape
and bytes, every key and plain value, in order). :func:`load_checkpoint` recomputes it, so a
file damaged on disk or in transit (flipped bytes, a truncation that still unzips) is a
:class:`~pnnh.errors.CheckpointError`, never a silently wrong model.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import torch

from pnnh.errors import CheckpointError
from pnnh.io import atomic_write_bytes

FORMAT = "pnnh-checkpoint"
VERSION = 2  # 2: adds the sha256 content digest
_HEADER = ("format", "version", "sha256")


def _feed(h, obj) -> None:
    """Feed ``obj`` (nested dicts/lists of tensors and plain values) into hash ``h``, in order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k, v in obj.items():
            h.update(f"K{k!r}|".encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}|".encode())


def content_digest(payload: dict) -> str:
    """sha256 over a checkpoint's content (the header keys excluded)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k not in _HEADER})
    return h.hexdigest()


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Serialise ``payload`` (plus a format tag and its sha256 digest) and write it atomically."""
    body = {k: v for k, v in payload.items() if k not in _HEADER}
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "sha256": content_digest(body), **body}, buf)
    return atomic_write_bytes(path, buf.getvalue())


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
    stored = ckpt.get("sha256")
    if not isinstance(stored, str):
        raise CheckpointError(f"{path} has no checksum (written by pnnh < 0.1 or by hand); "
                              "refusing to load it unverified", field="checkpoint")
    if content_digest(ckpt) != stored:
        raise CheckpointError(f"{path} is corrupted: its content does not match its sha256 "
                              "checksum", field="checkpoint")
    return ckpt


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild the model stored in a checkpoint: returns ``(model, checkpoint_dict)``.

    The model is created from the registry with the saved name and keyword arguments, then
    its weights are loaded (strictly).
    """
    from pnnh.registry import create_model

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
        raise CheckpointError(f"{path}: weights do not fit model {name!r}: {str(e)[:300]}",
                              field="checkpoint") from None
    return model, ckpt


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
