"""Data-parallel curvature under ``torchrun`` (gloo, 2 CPU processes): each rank holds one
shard of the batch, gradients and HVPs are all-reduced, and the result is the single
process's."""

import json
import os

import pytest
import torch
from _helpers import TORCHRUN, torchrun

from pnnh.cli import main

# 37 samples: shards of 19 and 18, so the sample-count weighting is exercised
ARGS = ["probe", "hessian", "--model", "shortcut_mlp", "--depth", "4", "--width", "16",
        "--input-shape", "8", "--num-samples", "37", "--dense", "never", "--max-iter", "60",
        "--tol", "1e-8", "--hutchinson-samples", "8", "--slq-runs", "1", "--slq-steps", "5",
        "--blocks", "head", "--quiet", "--seed", "3", "--device", "cpu"]


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(),
                    reason="torchrun / torch.distributed not available")
def test_two_ranks_give_the_single_process_curvature(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    p = torchrun([*ARGS, "--out", str(tmp_path / "ddp")], env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert main([*ARGS, "--out", str(tmp_path / "one")]) == 0
    (ddp,) = json.loads((tmp_path / "ddp" / "hessian.json").read_text())
    (one,) = json.loads((tmp_path / "one" / "hessian.json").read_text())
    assert (ddp["world_size"], one["world_size"]) == (2, 1)
    assert ddp["num_samples"] == one["num_samples"] == 37
    for key in ("lambda_max", "lambda_min", "trace"):
        assert ddp[key] == pytest.approx(one[key], rel=1e-5), key
    (bd,) = json.loads((tmp_path / "ddp" / "hessian_blocks.json").read_text())
    (bo,) = json.loads((tmp_path / "one" / "hessian_blocks.json").read_text())
    for key in ("lambda_max", "trace"):
        assert bd[key] == pytest.approx(bo[key], rel=1e-5), key
    # rank 0 alone wrote the folder; rank 1's copy went to a temporary folder of its own
    assert p.stdout.count(f"hessian: {tmp_path / 'ddp' / 'hessian.json'}") == 1
