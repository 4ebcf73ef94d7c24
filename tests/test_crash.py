"""Crash safety: SIGKILL / SIGTERM / SIGINT mid-epoch, exact resume, damaged checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _helpers import Crash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pnnh
from pnnh.checkpoint import load_checkpoint, save_checkpoint
from pnnh.cli import main
from pnnh.errors import CheckpointError
from pnnh.io import read_jsonl
from pnnh.train import TrainingInterrupted

TIME_FIELDS = ("images_per_s", "time_s")
# MNIST-1D (8,000 training samples) in batches of 128: 63 steps an epoch, enough to land inside one
ARGS = ["--model", "resnet_mlp", "--depth", "6", "--width", "64", "--dataset", "mnist1d",
        "--epochs", "2", "--batch-size", "128", "--lr", "1e-3",
        "--device", "cpu", "--no-progress"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pnnh", "train", *ARGS, *extra, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records]


def _wait_inside_epoch_2(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """Return while ``proc`` is half-way through epoch 2 (epoch 1's checkpoint exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = read_jsonl(out / "metrics.jsonl")
        if lines and (out / "checkpoints" / "last.pt").exists():
            time.sleep(lines[0]["time_s"] / 2)  # half an epoch into epoch 2
            assert proc.poll() is None, "the run ended before it could be interrupted"
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("epoch 1 never finished")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, in this process with one thread like the subprocesses."""
    out = tmp_path_factory.mktemp("full") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _same_run(a: Path, b: Path) -> None:
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in mb] == [1, 2]
    assert _strip(ma) == _strip(mb)  # bit-identical on CPU
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["final_val_acc"] == sb["final_val_acc"] and sa["best_val_acc"] == sb["best_val_acc"]


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "run"
    p = _launch(out)
    _wait_inside_epoch_2(p, out)
    p.kill()  # SIGKILL: no handler runs, nothing is flushed
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]  # died inside epoch 2
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    r = subprocess.run([sys.executable, "-m", "pnnh", "train", *ARGS, "--resume", "--out", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr and "(epoch 1)" in r.stderr
    _same_run(uninterrupted, out)
    assert not list(out.rglob("*.tmp"))  # temp files a kill may leave are swept on resume


def test_sigterm_in_a_subprocess_saves_mid_epoch_and_exits_143(tmp_path):
    """(That such a checkpoint resumes exactly is shown in-process below.)"""
    out = tmp_path / "run"
    p = _launch(out)
    _wait_inside_epoch_2(p, out)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("pnnh: SIGTERM received: stopped at epoch 2, step ")
    assert "checkpoint saved to" in last and "--resume" in last and "Traceback" not in err
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["partial_epoch"]["epoch"] == 2
    assert 0 < ckpt["partial_epoch"]["steps"] < 63
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert not (out / "summary.json").exists()


class _SignalAt:
    """Delivers a real signal to this process at a given optimizer step."""

    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step(self, step, **_):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


def _small(out, **kw):
    return {**dict(model="resnet_mlp", dataset="synthetic", num_samples=400, depth=4, width=16,
                   epochs=3, batch_size=32, lr=3e-3, out=str(out), progress=False, augment=True,
                   dataset_args={"input_shape": [1, 6, 6], "num_classes": 3}), **kw}


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_in_process_stops_at_the_next_step_and_resumes_exactly(tmp_path, signum, code):
    """Augmentation on: the generator state is part of the mid-epoch checkpoint."""
    full = pnnh.train(_small(tmp_path / "full"))
    before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as e:
        pnnh.train(_small(tmp_path / "part"), callbacks=[_SignalAt(10 + 5, signum)])  # epoch 2
    assert e.value.exit_code == code and isinstance(e.value, KeyboardInterrupt)
    assert "stopped at epoch 2, step 5/10" in str(e.value)
    assert signal.getsignal(signum) is before  # the caller's handler is back
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ckpt["partial_epoch"]["steps"] == 5 and ckpt["step"] == 15
    resumed = pnnh.train({**_small(tmp_path / "part"), "resume": True})
    assert resumed["final_val_acc"] == full["final_val_acc"]
    assert _strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == \
        _strip(read_jsonl(tmp_path / "part" / "metrics.jsonl"))


def test_signal_at_an_epoch_end_saves_that_epoch(tmp_path):
    with pytest.raises(TrainingInterrupted, match="end of epoch 1"):
        pnnh.train(_small(tmp_path / "r", checkpoint_every=5),
                   callbacks=[_SignalAt(10, signal.SIGTERM)])  # the last step of epoch 1
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1 and "partial_epoch" not in ckpt


# ----------------------------------------------------------------------------- damaged files
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    pnnh.train(_small(d / "r", epochs=1, augment=False))
    return d / "r" / "checkpoints" / "last.pt"


def test_flipped_bytes_in_a_tensor_are_detected_by_the_checksum(tmp_path, good_checkpoint):
    raw = bytearray(good_checkpoint.read_bytes())
    ckpt = load_checkpoint(good_checkpoint)
    w = ckpt["model"]["head.weight"].contiguous().numpy().tobytes()
    pos = raw.find(w)
    assert pos > 0
    raw[pos + len(w) // 2] ^= 0x40  # one bit of one weight: still a valid zip and float
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"bad.pt is corrupted.*sha256"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        pnnh.checkpoint.load_model(bad)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0.0, 1.0, exclude_max=True), mask=st.integers(1, 255),
       cut=st.booleans())
def test_any_damage_is_an_error_or_leaves_the_content_intact(tmp_path, good_checkpoint, where,
                                                              mask, cut):
    raw = bytearray(good_checkpoint.read_bytes())
    pos = int(where * len(raw))
    if cut:
        raw = raw[:pos]
    else:
        raw[pos] ^= mask
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(bytes(raw))
    try:
        got = load_checkpoint(bad)
    except CheckpointError as e:
        assert "damaged.pt" in str(e)
        return
    # a flip in zip padding/metadata may leave the content untouched: then it must be intact
    ref = load_checkpoint(good_checkpoint)
    assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"])
    assert got["epoch"] == ref["epoch"]


def test_a_checkpoint_without_checksum_is_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"format": "pnnh-checkpoint", "version": 1, "model": {"w": torch.ones(2)}}, legacy)
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(legacy)
    ok = tmp_path / "ok.pt"
    save_checkpoint(ok, {"model": {"w": torch.ones(2)}, "note": ("a", 1, 2.5, None)})
    assert torch.equal(load_checkpoint(ok)["model"]["w"], torch.ones(2))


def test_resume_from_a_corrupted_checkpoint_fails_cleanly_and_touches_nothing(tmp_path, capsys,
                                                                                good_checkpoint):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    raw = good_checkpoint.read_bytes()
    (out / "checkpoints" / "last.pt").write_bytes(raw[: len(raw) * 2 // 3])
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    code = main(["train", "--model", "resnet_mlp", "--dataset", "synthetic", "--num-samples", "400",
                 "--depth", "4", "--width", "16", "--dataset-arg", "input_shape=[1,6,6]",
                 "--dataset-arg", "num_classes=3", "--resume", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("pnnh: error: cannot load checkpoint") and "last.pt" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys, good_checkpoint):
    """A changed width, or a mid-epoch checkpoint from another number of ranks: clean errors."""
    run = good_checkpoint.parent.parent
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    with pytest.raises(pnnh.errors.ConfigError, match="does not fit this configuration"):
        pnnh.train({**_small(run, epochs=2, augment=False, width=24), "resume": True})
    ckpt = load_checkpoint(good_checkpoint)
    ckpt["partial_epoch"] = {"epoch": 2, "steps": 3, "sums": [0.0, 0.0, 0.0], "train_time": 0.0,
                             "aug_rng": [torch.Generator().get_state()] * 2}
    other = tmp_path / "r"
    (other / "checkpoints").mkdir(parents=True)
    save_checkpoint(other / "checkpoints" / "last.pt", ckpt)
    with pytest.raises(pnnh.errors.ConfigError, match="same number of processes"):
        pnnh.train({**_small(other, epochs=2, augment=False), "resume": True})
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before
    assert sorted(p.name for p in other.rglob("*")) == ["checkpoints", "last.pt"]


def test_norm_tracking_survives_a_mid_epoch_stop(tmp_path):
    """``--track-norms`` lines up to the stop are kept, the rest replayed: the same file."""
    pnnh.train(_small(tmp_path / "full", track_norms=3))
    with pytest.raises(TrainingInterrupted):
        pnnh.train(_small(tmp_path / "part", track_norms=3),
                   callbacks=[_SignalAt(17, signal.SIGTERM)])
    pnnh.train({**_small(tmp_path / "part", track_norms=3), "resume": True})
    a = read_jsonl(tmp_path / "full" / "norms.jsonl")
    b = read_jsonl(tmp_path / "part" / "norms.jsonl")
    assert len(a) > 0 and a == b


def test_periodic_mid_epoch_checkpoints_bound_the_loss_of_an_abrupt_crash(tmp_path):
    full = pnnh.train(_small(tmp_path / "full"))
    with pytest.raises(RuntimeError, match="power cut"):
        pnnh.train(_small(tmp_path / "part", checkpoint_steps=4), callbacks=[Crash(19)])
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 16 and ckpt["partial_epoch"] == {**ckpt["partial_epoch"], "epoch": 2,
                                                            "steps": 6}
    resumed = pnnh.train({**_small(tmp_path / "part", checkpoint_steps=4), "resume": True})
    assert resumed["final_val_acc"] == full["final_val_acc"]
    assert _strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == \
        _strip(read_jsonl(tmp_path / "part" / "metrics.jsonl"))
