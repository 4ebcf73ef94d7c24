"""Fault tolerance: resume auto, two checkpoint generations, a full disk, torchrun restarts.

The in-process tests use a small synthetic run (3 epochs of 10 steps). The torchrun tests
(``slow``) start real 2-process gloo jobs through ``benchmarks/torchrun_stress.py``'s helpers.
"""

import errno
import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from _helpers import Crash

import pnnh
from pnnh.checkpoint import load_checkpoint, load_latest, save_checkpoint
from pnnh.cli import main
from pnnh.errors import CheckpointError, ConfigError
from pnnh.io import read_jsonl

TIME_FIELDS = ("images_per_s", "time_s")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _small(out, **kw):
    return {**dict(model="resnet_mlp", dataset="synthetic", num_samples=400, depth=4, width=16,
                   epochs=3, batch_size=32, lr=3e-3, out=str(out), progress=False, augment=True,
                   dataset_args={"input_shape": [1, 6, 6], "num_classes": 3}), **kw}


SMALL_FLAGS = ["--model", "resnet_mlp", "--dataset", "synthetic", "--num-samples", "400",
               "--depth", "4", "--width", "16", "--epochs", "3", "--batch-size", "32",
               "--lr", "3e-3", "--augment", "--no-progress", "--dataset-arg",
               "input_shape=[1,6,6]", "--dataset-arg", "num_classes=3"]


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records]


def _files(folder: Path) -> dict:
    return {f: f.read_bytes() for f in folder.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = pnnh.train(_small(out))
    return out, summary


def _crashed(out: Path, step: int = 25, **kw) -> None:
    """A run of ``_small`` that died at ``step`` (mid-epoch 3) with checkpoints every 4 steps."""
    with pytest.raises(RuntimeError, match="power cut"):
        pnnh.train(_small(out, checkpoint_steps=4, **kw), callbacks=[Crash(step)])


# ----------------------------------------------------------------------------- resume auto
def test_resume_auto_continues_a_checkpoint_of_the_same_configuration(tmp_path, reference):
    out = tmp_path / "r"
    _crashed(out)
    # fields that do not change the trajectory may differ (here: how often it checkpoints)
    summary = pnnh.train(_small(out, resume="auto", checkpoint_steps=0))
    assert summary["resumed_from_epoch"] == 2
    assert summary["final_val_acc"] == reference[1]["final_val_acc"]
    assert _strip(read_jsonl(out / "metrics.jsonl")) == _strip(read_jsonl(reference[0] / "metrics.jsonl"))


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path, reference):
    summary = pnnh.train(_small(tmp_path / "r", resume="auto"))
    assert summary["resumed_from_epoch"] is None
    assert summary["final_val_acc"] == reference[1]["final_val_acc"]


def test_resume_auto_refuses_a_checkpoint_of_another_configuration(tmp_path, capsys):
    out = tmp_path / "r"
    _crashed(out)
    before = _files(out)
    capsys.readouterr()
    code = main(["train", *SMALL_FLAGS, "--lr", "1e-2", "--epochs", "4", "--resume", "auto",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pnnh: error: resume: ") and "another configuration" in err
    assert "epochs: 3 -> 4" in err and "lr: 0.003 -> 0.01" in err and "width" not in err
    assert _files(out) == before
    # an explicit --resume still continues it (e.g. to train for more epochs)
    assert main(["train", *SMALL_FLAGS, "--epochs", "4", "--resume", "--out", str(out)]) == 0
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_under_torchrun_resume_auto_is_the_default(tmp_path, monkeypatch, capsys, reference):
    """torchrun's agent sets TORCHELASTIC_RESTART_COUNT on every worker; single-process runs
    keep starting fresh unless told otherwise."""
    out = tmp_path / "r"
    _crashed(out)
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", *SMALL_FLAGS, "--out", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().err
    assert _strip(read_jsonl(out / "metrics.jsonl")) == _strip(read_jsonl(reference[0] / "metrics.jsonl"))
    # the finished run, relaunched: nothing left to do, the same summary
    assert main(["train", *SMALL_FLAGS, "--out", str(out)]) == 0
    assert "the run had already finished" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["final_val_acc"] == \
        reference[1]["final_val_acc"]
    assert main(["train", *SMALL_FLAGS, "--no-resume", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_epoch"] is None
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    _crashed(tmp_path / "single")
    summary = pnnh.train(_small(tmp_path / "single"))
    assert summary["resumed_from_epoch"] is None


def test_resume_values_are_validated():
    from pnnh.config import resolve

    assert resolve({"resume": "auto"}).resume == "auto"
    assert resolve({"resume": "yes"}).resume is True and resolve({}).resume is None
    with pytest.raises(ConfigError, match="resume: expected true, false or auto"):
        resolve({"resume": "sometimes"})


# ----------------------------------------------------------------------------- two generations
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, reference):
    out = tmp_path / "r"
    _crashed(out)
    ckpt = out / "checkpoints"
    assert load_checkpoint(ckpt / "prev.pt")["step"] == load_checkpoint(ckpt / "last.pt")["step"] - 4
    raw = (ckpt / "last.pt").read_bytes()
    (ckpt / "last.pt").write_bytes(raw[: len(raw) // 2])
    capsys.readouterr()
    summary = pnnh.train(_small(out, checkpoint_steps=4, resume=True))
    err = capsys.readouterr().err
    assert "last.pt" in err and f"falling back to {ckpt / 'prev.pt'}" in err
    assert summary["final_val_acc"] == reference[1]["final_val_acc"]
    assert _strip(read_jsonl(out / "metrics.jsonl")) == _strip(read_jsonl(reference[0] / "metrics.jsonl"))
    # the damaged file is kept aside, out of the rotation; a finished run holds last and best
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt", "last.pt.damaged"]


def test_both_generations_damaged_is_one_line_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    _crashed(out)
    for name in ("last.pt", "prev.pt"):
        raw = (out / "checkpoints" / name).read_bytes()
        (out / "checkpoints" / name).write_bytes(raw[: len(raw) // 3])
    before = _files(out)
    capsys.readouterr()
    code = main(["train", *SMALL_FLAGS, "--resume", "auto", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("pnnh: error: cannot load checkpoint") and "last.pt" in err
    assert _files(out) == before


def test_killed_between_the_two_renames_resumes_from_prev(tmp_path, reference):
    """A save renames last.pt to prev.pt, then the new file to last.pt: a kill in between
    leaves prev.pt alone, which is a complete checkpoint."""
    out = tmp_path / "r"
    _crashed(out)
    (out / "checkpoints" / "last.pt").unlink()
    assert load_latest(out / "checkpoints")[0].name == "prev.pt"
    summary = pnnh.train(_small(out, resume=True))
    assert summary["final_val_acc"] == reference[1]["final_val_acc"]


def test_a_fresh_start_removes_the_resume_state_of_an_earlier_run(tmp_path):
    out = tmp_path / "r"
    _crashed(out)
    with pytest.raises(RuntimeError, match="power cut"):  # a new run, dying in its first epoch
        pnnh.train(_small(out, lr=1e-2), callbacks=[Crash(3)])
    assert not (out / "checkpoints" / "last.pt").exists()
    assert not (out / "checkpoints" / "prev.pt").exists()


# ----------------------------------------------------------------------------- full disk
def _fill_disk_on(monkeypatch, name: str, after: int = 0):
    """``os.fsync`` of a temporary file for ``name`` raises ENOSPC (after ``after`` successes):
    the disk fills while the checkpoint is being flushed."""
    real, seen = os.fsync, []

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
        if Path(target).name.startswith(f".{name}.") and target.endswith(".tmp"):
            seen.append(target)
            if len(seen) > after:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_full_disk_while_saving_keeps_the_old_checkpoint_and_stops_with_one_line(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    seen = _fill_disk_on(monkeypatch, "last.pt", after=1)  # epoch 1 saves, epoch 2 does not
    code = main(["train", *SMALL_FLAGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(seen) == 2
    last = err.strip().splitlines()[-1]
    assert last == (f"pnnh: error: cannot write checkpoint {out / 'checkpoints' / 'last.pt'}: "
                    "No space left on device (the previous checkpoint is intact)")
    assert "Traceback" not in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    # space freed: the run continues from epoch 1 (the metrics line of epoch 2 is replayed)
    assert main(["train", *SMALL_FLAGS, "--resume", "--out", str(out)]) == 0
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_save_checkpoint_failure_leaves_both_generations(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"n": 1}, keep_previous="prev.pt")
    save_checkpoint(path, {"n": 2}, keep_previous="prev.pt")
    before = _files(tmp_path)
    _fill_disk_on(monkeypatch, "last.pt")
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, {"n": 3}, keep_previous="prev.pt")
    assert _files(tmp_path) == before
    assert load_checkpoint(path)["n"] == 2 and load_checkpoint(tmp_path / "prev.pt")["n"] == 1


def test_dist_timeout_reaches_the_process_group_and_is_checked(monkeypatch):
    from pnnh import device
    from pnnh.config import resolve

    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    device.Distributed("cpu", 5)
    assert seen == {"backend": "gloo", "timeout": __import__("datetime").timedelta(seconds=5)}
    seen.clear()
    device.Distributed("cpu")  # unset: torch's own default, not a number of ours
    assert seen == {"backend": "gloo"}
    with pytest.raises(ConfigError, match="dist_timeout: must be a positive") as e:
        resolve({"dist_timeout": 0})
    assert e.value.field == "dist_timeout"


def test_a_collective_timeout_is_one_line_from_the_rank_that_waited(tmp_path, monkeypatch,
                                                                     capsys):
    """The rank whose collective timed out (here rank 1, which otherwise stays quiet) names
    ``dist_timeout`` in one line and exits 1; nothing else is caught as a timeout."""
    train_mod = importlib.import_module("pnnh.train")  # the module (pnnh.train is the function)

    class Ranks:
        enabled, rank = True, 1

        def __init__(self, device, timeout=None):
            self.timeout = timeout

        def close(self, agreed=True):
            pass

    def timed_out(*a, **k):
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
                           "for recv operation to complete")

    monkeypatch.setattr(train_mod, "Distributed", Ranks)
    monkeypatch.setattr(train_mod, "_train", timed_out)
    monkeypatch.setenv("RANK", "1")
    code = main(["train", *SMALL_FLAGS, "--dist-timeout", "5", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("pnnh: error: rank 1: a collective waited longer than dist_timeout "
                             "(5 s): another rank hung or died")
    monkeypatch.setattr(train_mod, "_train", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        main(["train", *SMALL_FLAGS, "--out", str(tmp_path / "r")])


# ----------------------------------------------------------------------------- torchrun (slow)
def _stress():
    spec = importlib.util.spec_from_file_location("bench_torchrun_stress", BENCH / "torchrun_stress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# 47 steps an epoch; a mid-epoch checkpoint every 10 steps
DDP_FLAGS = ["--checkpoint-steps", "10", "--augment", "--dataset", "synthetic", "--num-samples",
             "7500", "--dataset-arg", "input_shape=[1,8,8]"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    stress = _stress()
    out = tmp_path_factory.mktemp("ddp") / "ref"
    p = subprocess.run(stress.torchrun_command(out, 3, DDP_FLAGS), capture_output=True, text=True,
                       env=stress.child_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return stress, _strip(read_jsonl(out / "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
@pytest.mark.parametrize("after_epochs", [0, 1])
def test_elastic_restart_after_sigkill_of_a_rank_resumes_by_itself(tmp_path, ddp_reference,
                                                                   after_epochs):
    """``torchrun --max-restarts 1``; rank 1 is SIGKILLed mid-epoch (0.2 s after the first
    checkpoint of epoch 1, or after epoch 1's end); the restarted workers rejoin, resume
    without --resume, and finish with the metrics of the uninterrupted 2-process run."""
    stress, ref = ddp_reference
    out = tmp_path / "run"
    proc = subprocess.Popen(stress.torchrun_command(out, 3, DDP_FLAGS, restarts=1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=stress.child_env())
    stress.kill_rank_after_checkpoint(proc, out, rank=1, delay=0.2, after_epochs=after_epochs)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("resuming from") == 1 and stdout.count("done:") == 1
    assert "connectFullMesh" not in stderr and "terminate called" not in stderr
    assert _strip(read_jsonl(out / "metrics.jsonl")) == ref


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_sigterm_to_torchrun_then_the_same_command_continues(tmp_path, ddp_reference):
    """SIGTERM to the launcher: both ranks save mid-epoch and stop; relaunching the very same
    command (no --resume) continues and ends with the uninterrupted run's metrics."""
    stress, ref = ddp_reference
    out = tmp_path / "run"
    cmd = stress.torchrun_command(out, 3, DDP_FLAGS)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=stress.child_env())
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and err.count("SIGTERM received: stopped at") == 1, err[-3000:]
    p = subprocess.run(cmd, capture_output=True, text=True, env=stress.child_env(), timeout=600)
    assert p.returncode == 0 and "resuming from" in p.stderr, p.stderr[-3000:]
    assert _strip(read_jsonl(out / "metrics.jsonl")) == ref


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_twenty_consecutive_torchrun_runs_exit_0(tmp_path, capsys):
    """The README's 2-process command, 20 times in a row: every run exits 0, one `done:`."""
    assert _stress().main(["--runs", "20", "--out", str(tmp_path)]) == 0
    assert "PASS 20/20" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_a_hung_rank_fails_over_within_dist_timeout_and_the_job_resumes(tmp_path, ddp_reference):
    """Rank 1 is frozen (SIGSTOP: alive and silent, which torchrun's health checks do not see)
    after the first checkpoint. With ``--dist-timeout 5`` rank 0's collective gives up, rank 0
    says so in one line and exits 1, torchrun stops the frozen rank and restarts the job, which
    resumes by itself and ends with the uninterrupted run's metrics."""
    stress, ref = ddp_reference
    out = tmp_path / "run"
    cmd = stress.torchrun_command(out, 3, DDP_FLAGS + ["--dist-timeout", "5"], restarts=1)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=stress.child_env())
    stress.kill_rank_after_checkpoint(proc, out, rank=1, delay=0.2, sig=signal.SIGSTOP)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("pnnh: error: rank 0: a collective waited longer than dist_timeout "
                        "(5 s)") == 1, stderr[-3000:]
    assert stderr.count("resuming from") == 1 and stdout.count("done:") == 1
    assert _strip(read_jsonl(out / "metrics.jsonl")) == ref
