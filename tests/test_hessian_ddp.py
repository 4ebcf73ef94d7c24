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
@pytest.mark.parametrize("batch_size", [None, 7])
def test_two_ranks_give_the_single_process_curvature(tmp_path, batch_size):
    """With ``--batch-size 7`` each rank also splits its shard (19 and 18 samples) into batches
    of 7: the data-set path, one batch's graph at a time, against one process with one batch."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    env.pop("RANK", None)
    extra = [] if batch_size is None else ["--batch-size", str(batch_size)]
    p = torchrun([*ARGS, *extra, "--out", str(tmp_path / "ddp")], env)
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
    # rank 0 alone wrote the folder and printed; rank 1's temporary folder is gone
    assert p.stdout.count(f"hessian: {tmp_path / 'ddp' / 'hessian.json'}") == 1
    assert not list(scratch.glob("pnnh-hessian-rank*"))


def test_batch_size_gives_the_one_batch_curvature(tmp_path, capsys):
    """``--batch-size``: the exact mean over the batches, so the one-batch values."""
    short = [a for a in ARGS if a != "--blocks" and a != "head"]
    assert main([*short, "--batch-size", "10", "--out", str(tmp_path / "b")]) == 0
    assert main([*short, "--out", str(tmp_path / "one")]) == 0
    (b,) = json.loads((tmp_path / "b" / "hessian.json").read_text())
    (one,) = json.loads((tmp_path / "one" / "hessian.json").read_text())
    for key in ("lambda_max", "lambda_min", "trace"):
        assert b[key] == pytest.approx(one[key], rel=1e-5), key
    assert main([*short, "--batch-size", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--batch-size: at least 1, got 0" in capsys.readouterr().err
