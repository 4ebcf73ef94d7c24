"""Clean exits under torchrun: the README's 2-process command, run many times in a row.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/torchrun_stress.py --runs 20

Each run is ``torchrun --standalone --nproc-per-node 2 -m pnnh train --model resnet_mlp
--depth 8 --device cpu --epochs 2 --no-progress --out DIR`` (the README's command, shortened
to 2 epochs). A run passes when torchrun exits 0, ``done:`` is printed exactly once, no rank
aborted ("terminate called", SIGABRT) and ``summary.json`` says ``finished``. The script
prints one line per run and a final ``PASS n/N`` or ``FAIL``; exit status 0 only when every
run passed. It runs this checkout's ``src`` (put first on the children's PYTHONPATH).

``--kill-after S`` adds the elastic case: torchrun gets ``--max-restarts 1`` and one worker
(rank 1) is killed with SIGKILL S seconds after the first checkpoint appears; a run then
passes when the job still exits 0, the restarted workers resumed from the checkpoint (rather
than starting over) and its metrics equal those of the first, uninterrupted run (timings
aside).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine_info, save_results  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TRAIN = ["--model", "resnet_mlp", "--depth", "8", "--device", "cpu", "--no-progress"]
ABORT_SIGNS = ("terminate called", "SIGABRT", "Signal 6")
TIME_FIELDS = ("images_per_s", "time_s")


def torchrun_command(out: Path, epochs: int, extra: list[str] = (), restarts: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    if restarts:
        launcher += ["--max-restarts", str(restarts)]
    return [*launcher, "-m", "pnnh", "train", *TRAIN, "--epochs", str(epochs), *extra,
            "--out", str(out)]


def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the training workers below ``launcher_pid`` (from /proc)."""
    found, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop()
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if pid != launcher_pid and ranks:
            found[int(ranks[0])] = pid
    return found


def kill_rank_after_checkpoint(proc: subprocess.Popen, out: Path, rank: int, delay: float,
                               after_epochs: int = 0, timeout: float = 300,
                               sig: int = signal.SIGKILL) -> int:
    """SIGKILL ``rank``'s worker ``delay`` s after ``out/checkpoints/last.pt`` first appears
    (and ``after_epochs`` metrics lines are written); ``sig=signal.SIGSTOP`` freezes it
    instead (a hung rank: alive, silent, unseen by torchrun's health checks)."""
    deadline = time.monotonic() + timeout

    def ready() -> bool:
        if not (out / "checkpoints" / "last.pt").exists():
            return False
        return len(metrics(out)) >= after_epochs

    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the job ended before the point it was to be killed at")
        time.sleep(0.02)
    time.sleep(delay)
    pid = worker_pids(proc.pid).get(rank)
    if pid is None:
        raise RuntimeError(f"no worker of rank {rank} found")
    os.kill(pid, sig)
    return pid


def metrics(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        lines = []
    return [{k: v for k, v in json.loads(x).items() if k not in TIME_FIELDS} for x in lines if x]


def one_run(out: Path, args, reference: list[dict] | None) -> dict:
    """Run the job once (with the kill when ``reference`` is given); what happened."""
    t0 = time.perf_counter()
    extra = ["--checkpoint-steps", str(args.checkpoint_steps)] if args.checkpoint_steps else []
    restarts = 1 if reference is not None else 0
    proc = subprocess.Popen(torchrun_command(out, args.epochs, extra, restarts),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    killed = None
    if reference is not None:
        killed = kill_rank_after_checkpoint(proc, out, 1, args.kill_after)
    stdout, stderr = proc.communicate(timeout=600)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    problems = []
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}")
    if stdout.count("done:") != 1:
        problems.append(f"{stdout.count('done:')} 'done:' lines")
    problems += [f"'{s}' in the output" for s in ABORT_SIGNS if s in stderr]
    if summary.get("status") != "finished":
        problems.append(f"summary status {summary.get('status')!r}")
    if reference is not None and metrics(out) != reference:
        problems.append("metrics differ from the uninterrupted run")
    if reference is not None and stderr.count("resuming from") != 1:
        problems.append("the restarted workers did not resume from the checkpoint")
    return {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "killed_pid": killed, "restarted": "resuming from" in stderr, "problems": problems,
            "stderr_tail": stderr[-2000:] if problems else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--kill-after", type=float, default=None, metavar="S",
                   help="elastic case: SIGKILL rank 1 S seconds after the first checkpoint")
    p.add_argument("--checkpoint-steps", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results folder (default results/)")
    args = p.parse_args(argv)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="pnnh-stress-"))
    runs, reference = [], None
    try:
        if args.kill_after is not None:
            first = one_run(work / "reference", args, None)
            if first["problems"]:
                print(f"reference run failed: {first['problems']}\n{first['stderr_tail']}")
                return 1
            reference = metrics(work / "reference")
        for i in range(args.runs):
            r = one_run(work / f"run{i}", args, reference)
            runs.append(r)
            verdict = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
            print(f"run {i + 1}/{args.runs}: exit {r['returncode']}, {r['seconds']}s, {verdict}",
                  flush=True)
            if r["problems"]:
                print(r["stderr_tail"], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = sum(not r["problems"] for r in runs)
    mode = "elastic restart after SIGKILL of rank 1" if reference is not None else "clean exit"
    print(f"{'PASS' if passed == len(runs) else 'FAIL'} {passed}/{len(runs)} runs ({mode})")
    save_results("torchrun_stress" + ("_kill" if reference is not None else ""), args, info,
                 passed=passed, runs=runs)
    return 0 if passed == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
