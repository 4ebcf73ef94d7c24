"""CUDA-only behaviour, run on a GPU machine with ``PNNH_TEST_CUDA=1`` (``benchmarks/gpu_check.sh``
does; ``tests/conftest.py`` hides the GPU from the rest of the suite). Skipped elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from pnnh.cli import main
from pnnh.probes.hessian import HessianOperator

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (PNNH_TEST_CUDA=1 on a GPU machine; benchmarks/gpu_check.sh)")


def _conv_output_dtypes(argv: list[str]) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()

    def hook(m, _inp, out):
        if isinstance(m, nn.Conv2d) and torch.is_tensor(out):
            seen.add(out.dtype)

    handle = register_module_forward_hook(hook)
    try:
        assert main(argv) == 0
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("amp", [True, False])
def test_amp_runs_the_training_forward_in_bfloat16(amp, tmp_path):
    argv = ["train", "--model", "pnnh20", "--dataset", "synthetic", "--dataset-arg",
            "input_shape=[3,32,32]", "--num-samples", "256", "--epochs", "1", "--device", "cuda",
            "--out", str(tmp_path / "run")] + (["--amp", "--channels-last"] if amp else [])
    seen = _conv_output_dtypes(argv)
    assert (torch.bfloat16 in seen) is amp
    assert torch.float32 in seen  # evaluation runs without autocast


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    return m.eval()


def test_hessian_on_cuda_agrees_with_float64_even_with_tf32_on():
    model, x, y = _bn_net(), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    ref = HessianOperator(copy.deepcopy(model).double(), (x.double(), y), "ce",
                          fold_batchnorm=False).extreme_eigenvalues(tol=1e-10, seed=1)
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        op = HessianOperator(copy.deepcopy(model).cuda(), (x.cuda(), y.cuda()), "ce")
        got = op.extreme_eigenvalues(tol=1e-8, seed=1)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        hv = op.hvp(v.float().cuda()).double().cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = before
    ref_hv = HessianOperator(copy.deepcopy(model).double(), (x.double(), y), "ce").hvp(v)
    assert abs(got["lambda_max"] - ref["lambda_max"]) <= 1e-5 * abs(ref["lambda_max"])
    assert float((hv - ref_hv).norm() / ref_hv.norm()) < 1e-4
