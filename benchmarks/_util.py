"""Shared helpers of the peer benchmarks: the machine's description, round-robin timing, JSON.

Every benchmark times its contenders interleaved (each repeat times every contender once, in
a rotated order) so that a shared machine's load falls on them alike, and reports medians and
ratios. Results go to ``benchmarks/results/<name>.json`` with the machine description.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pnnh.train import module_methods

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """nproc, CPU model, torch version and threads, the load average right now, and on a CUDA
    ``device`` the GPU's name and the CUDA version torch was built with."""
    info = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def machine_label(info: dict) -> str:
    """The GPU's name where :func:`machine_info` ran on one, else the CPU model and its count."""
    return info.get("gpu", f"{info['cpu_model']} ({info['nproc']} CPUs)")


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading a clock: CUDA work is asynchronous, so on a CUDA ``device``
    a timing must wait for the queued kernels; on the CPU there is nothing to wait for."""
    if str(device).startswith("cuda"):
        dev = torch.device(device)
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_round_robin(fns: dict[str, Callable[[], None]], repeats: int, inner: int = 1,
                     warmup: int = 1, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of every ``fns[name]``: ``repeats`` rounds, each timing every function
    once (``inner`` calls, averaged), in an order rotated by one each round. On a CUDA
    ``device`` the clock is read only after the queued kernels have finished."""
    names, sync = list(fns), synchronizer(device)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                fns[n]()
            sync()
            times[n].append((time.perf_counter() - t) / inner)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    tmp.replace(path)
    return path


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """One training step as the trainer takes it: forward, cross-entropy, backward, optimizer
    step, then the model's ``after_optimizer_step`` hooks (the PNNH coder projection)."""
    hooks = module_methods(model, "after_optimizer_step")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for h in hooks:
            h()
    return step


def save_results(name: str, args, info: dict, **fields) -> dict:
    """Write ``{benchmark, machine, config (the CLI args), **fields}`` to
    ``<name>[_quick].json`` under ``args.out`` (default results/), print the path, return it."""
    payload = {"benchmark": name, "machine": info, "config": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **fields}
    path = write_json(name + ("_quick" if getattr(args, "quick", False) else ""), payload,
                      getattr(args, "out", None))
    print(f"wrote {path}")
    return payload
