"""Atomic file writing and tidy records (lists of dicts) to CSV / JSON.

Every result file is written to a temporary file in the same directory, flushed, fsynced
and renamed over the target, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from pnnh.errors import CheckpointError


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _MODE)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars and non-finite floats into JSON-safe values."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj))


def records_to_csv(records: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if columns is None:
        columns = []
        for r in records:
            for k in r:
                if k not in columns:
                    columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: _jsonable(r.get(k)) for k in columns})
    return buf.getvalue()


def write_records(
    records: Sequence[dict],
    out_dir: str | os.PathLike,
    stem: str,
    columns: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``records`` as ``out_dir/stem.csv`` and ``out_dir/stem.json`` (both atomic)."""
    out_dir = Path(out_dir)
    csv_path = atomic_write_text(out_dir / f"{stem}.csv", records_to_csv(records, columns))
    json_path = atomic_write_json(out_dir / f"{stem}.json", list(records))
    return csv_path, json_path


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and fsync it (a line is either whole or absent after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(record)) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, ignoring a trailing partial line left by a crash."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def rewrite_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Atomically replace a JSONL file with ``records``."""
    atomic_write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in records))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG and write it atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


#: Header keys a content digest leaves out (the digest itself, the format tag, the version).
DIGEST_HEADER = ("format", "version", "sha256")


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
    """sha256 over a checkpoint's or plain file's content (the header keys excluded).

    Tensors are fed as dtype, shape and raw bytes; dicts, lists and plain values by their
    structure and ``repr``, in order — so the digest is the same on every machine.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k not in DIGEST_HEADER})
    return h.hexdigest()


def verify_digest(path: Path | str, payload: dict, missing: str) -> None:
    """Raise a one-line :class:`~pnnh.errors.CheckpointError` unless ``payload`` carries a
    ``sha256`` that matches :func:`content_digest`; ``missing`` ends the message for a file
    without one (where it came from, what to do)."""
    stored = payload.get("sha256")
    if not isinstance(stored, str):
        raise CheckpointError(f"{path} has no checksum {missing}", field="checkpoint")
    if content_digest(payload) != stored:
        raise CheckpointError(f"{path} is corrupted: its content does not match its sha256 "
                              "checksum", field="checkpoint")
