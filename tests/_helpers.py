"""Helpers shared by several test modules (not tests themselves)."""

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every weight off its init and give BatchNorm non-trivial statistics (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=g))
    return model.eval()


class Crash:
    """A training callback that fails abruptly at a given step: no handler runs and nothing is
    saved on the way out (a power cut, as far as the run directory can tell)."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, step, **_):
        if step == self.step:
            raise RuntimeError("power cut")


def randomised(model: nn.Module, seed: int = 0, weight_noise: float = 0.05) -> nn.Module:
    """Weights moved off init (by ``weight_noise``) and random BatchNorm statistics and affine,
    with signed γ (a fresh BatchNorm in eval mode is the identity, which hides mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(weight_noise * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                m.running_var.copy_(0.3 + torch.rand(n, generator=g))
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model.eval()


TORCHRUN = Path(sys.executable).with_name("torchrun")


def torchrun(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m pnnh ARGV``; a second try if the free port
    it picked was taken meanwhile (other jobs on the machine), which is no fault of pnnh."""
    for _ in range(2):
        p = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pnnh",
                            *argv], capture_output=True, text=True, env=env, timeout=300)
        if p.returncode == 0 or not any(s in p.stderr for s in (
                "EADDRINUSE", "Address already in use", "DistNetworkError")):
            return p
    return p


def write_idx(path, array, gz: bool | None = None) -> Path:
    """``array`` as an IDX file (magic 0x0000TTNN, big-endian sizes and values), gzipped when
    ``gz`` (default: when the name ends in ``.gz``), as the MNIST files are written."""
    import gzip

    import numpy as np

    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    array = np.asarray(array)
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gz = path.name.endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_set(folder, n_train: int = 60, n_test: int = 20, gz: bool = True,
                  seed: int = 0) -> Path:
    """The four MNIST-format files of a tiny learnable set (class-dependent mean brightness,
    every class present) in ``folder``; ``gz``: the ``.gz`` names, else the plain ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, (n, 28, 28)) + 18 * labels[:, None, None]
        write_idx(Path(folder) / f"{prefix}-images-idx3-ubyte{suffix}", images.astype(np.uint8))
        write_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return Path(folder)
