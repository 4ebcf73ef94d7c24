"""Data-parallel training through PyTorch's own ``torchrun`` (gloo, 2 CPU processes)."""

import os
import subprocess

import pytest
import torch
from _helpers import TORCHRUN, torchrun

import pnnh
import pnnh.cli
from pnnh.checkpoint import load_checkpoint
from pnnh.io import read_jsonl
from pnnh.train import epoch_batches, shard_loss_scale

# a small MLP without BatchNorm; batches of 101 (of 8,000 samples) split 51/50 across two ranks,
# so the shard-size-exact loss scaling is exercised, not only the equal-shard case
ARGS = ["--model", "resnet_mlp", "--depth", "4", "--width", "32", "--dataset", "mnist1d",
        "--epochs", "2", "--batch-size", "101", "--lr", "3e-3",
        "--optimizer", "sgd", "--momentum", "0.9", "--weight-decay", "1e-4", "--device", "cpu",
        "--no-progress"]


def test_epoch_batches_split_every_global_batch_across_ranks():
    one = list(epoch_batches(1600, 101, seed=3, epoch=2))
    two = [list(epoch_batches(1600, 101, seed=3, epoch=2, rank=r, world=2)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 16
    for (idx, n), (a, na), (b, nb) in zip(one, *two):
        assert n == na == nb == len(idx)
        assert sorted(torch.cat([a, b]).tolist()) == sorted(idx.tolist())
        assert abs(len(a) - len(b)) <= 1


@pytest.mark.parametrize("batch,world", [(101, 2), (7, 3), (64, 4)])
def test_scaled_shard_gradients_average_to_the_global_batch_gradient(batch, world):
    """What DDP computes (the mean over ranks of each shard's scaled gradient) against the
    single-process gradient of the global batch, in float64."""
    torch.manual_seed(0)
    model = pnnh.create_model("resnet_mlp", in_shape=(1, 12), depth=4, width=16).double()
    x, y = torch.randn(batch, 1, 12, dtype=torch.float64), torch.randint(0, 10, (batch,))

    def grads(xs, ys, scale=1.0):
        model.zero_grad()
        (torch.nn.functional.cross_entropy(model(xs), ys, label_smoothing=0.1) * scale).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(x, y)
    shards = [grads(x[r::world], y[r::world], shard_loss_scale(len(y[r::world]), batch, world))
              for r in range(world)]
    for k, g in enumerate(whole):
        torch.testing.assert_close(sum(s[k] for s in shards) / world, g, rtol=1e-12, atol=1e-14)
    assert shard_loss_scale(50, 100, 2) == 1.0


def test_sync_bn_on_cpu_ranks_is_a_config_error(tmp_path):
    """SyncBatchNorm has no CPU kernel: say so before the first collective."""
    from pnnh.config import resolve
    from pnnh.errors import ConfigError
    from pnnh.train import Distributed, _train

    class TwoRanks(Distributed):
        def __init__(self):  # rank 0 of 2, without a process group
            self.world, self.rank, self.local_rank, self.enabled = 2, 0, 0, True

    cfg = resolve({"model": "plain20", "dataset": "synthetic", "num_samples": 40, "device": "cpu",
                   "dataset_args": {"input_shape": [3, 8, 8]}, "sync_bn": True,
                   "out": str(tmp_path / "r"), "progress": False})
    with pytest.raises(ConfigError, match="sync_bn: SyncBatchNorm needs CUDA"):
        _train(cfg, TwoRanks(), [], {})
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(),
                    reason="torchrun / torch.distributed not available")
def test_torchrun_two_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    ddp = tmp_path / "ddp"
    p = torchrun(["train", *ARGS, "--out", str(ddp)], env)
    assert p.returncode == 0, p.stderr[-3000:]

    single = tmp_path / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert pnnh.cli.main(["train", *ARGS, "--out", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)

    a, b = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert [r["epoch"] for r in b] == [1, 2]  # written once (rank 0), not once per rank
    for ra, rb in zip(a, b):
        for k in ("train_loss", "val_loss", "lr"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), k
        for k in ("train_acc", "val_acc"):  # a flipped argmax tie at most
            assert abs(rb[k] - ra[k]) <= 2e-3, k
    wa = load_checkpoint(single / "checkpoints" / "last.pt")["model"]
    ckpt = load_checkpoint(ddp / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rank_torch_rng"]) == 2
    for k in wa:  # rounding (~1e-7 a step) compounds over 160 steps: compare as a whole
        assert (ckpt["model"][k] - wa[k]).norm() <= 1e-2 * wa[k].norm() + 1e-5, k

    # rank 0 alone logs and writes: one line per epoch, no stray or temporary files
    assert p.stderr.count("epoch 1/2 ") == 1 and p.stdout.count("done:") == 1
    files = sorted(str(f.relative_to(ddp)) for f in ddp.rglob("*") if f.is_file())
    assert files == ["checkpoints/best.pt", "checkpoints/last.pt", "config.yaml",
                     "metrics.jsonl", "summary.json"]
    assert pnnh.io.read_jsonl(ddp / "metrics.jsonl") == b
    summary = __import__("json").loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not available")
def test_sigterm_to_torchrun_saves_mid_epoch_and_resumes_exactly(tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the step, rank 0 saves."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pnnh", "train", *ARGS,
           "--augment", "--dataset", "synthetic", "--num-samples", "4000",
           "--dataset-arg", "input_shape=[1,8,8]"]
    full, part = tmp_path / "full", tmp_path / "part"
    p = torchrun(run[6:] + ["--out", str(full)], env)
    assert p.returncode == 0, p.stderr[-3000:]
    proc = subprocess.Popen([*run, "--out", str(part)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not (part / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(read_jsonl(part / "metrics.jsonl")[0]["time_s"] / 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("SIGTERM received: stopped at epoch 2, step ") == 1, err[-3000:]
    ckpt = load_checkpoint(part / "checkpoints" / "last.pt")
    assert ckpt["partial_epoch"]["epoch"] == 2 and len(ckpt["partial_epoch"]["aug_rng"]) == 2
    p = torchrun(run[6:] + ["--resume", "--out", str(part)], env)
    assert p.returncode == 0, p.stderr[-3000:]
    strip = [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")}
             for r in read_jsonl(full / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("images_per_s", "time_s")}
                     for r in read_jsonl(part / "metrics.jsonl")]
