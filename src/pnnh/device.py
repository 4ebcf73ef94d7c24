"""Devices and processes, the bottom layer: which device a run uses and, under ``torchrun``,
which rank it is. Nothing here imports the rest of pnnh but its errors, so the trainer, the
probes and the experiments can all use it without importing each other.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch

from pnnh.errors import ConfigError


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; ``"cuda"`` without a GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda requested but no CUDA device is available", field="device")
    return torch.device(name)


def under_torchrun() -> bool:
    """True in a worker started by ``torchrun``: its agent sets ``TORCHELASTIC_RESTART_COUNT``
    on every worker (0 on the first attempt)."""
    return "TORCHELASTIC_RESTART_COUNT" in os.environ


class Distributed:
    """Rank/world from torchrun's environment; a no-op for a single process.

    Under ``torchrun`` the process group is formed on the launcher's store under a key prefix
    of its own per restart (``pnnh/attempt_<TORCHELASTIC_RESTART_COUNT>``). torchrun keeps one
    store for the whole job and ``init_process_group`` alone uses the same keys on every
    attempt, so restarted workers would read the addresses of the killed ones and fail with
    "Gloo connectFullMesh failed ... Connection refused". ``timeout`` (seconds; ``--dist-timeout``)
    bounds how long a collective waits for a rank that hung (None: torch's default, 30 min for
    gloo); the rank that gives up raises, and torchrun stops or restarts the job.
    """

    def __init__(self, device_name: str, timeout: float | None = None):
        self.timeout = None if timeout is None else datetime.timedelta(seconds=float(timeout))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            use_cuda = device_name != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            self._init_group("nccl" if use_cuda else "gloo")

    def _init_group(self, backend: str) -> None:
        # the collectives' timeout (None: torch's default); rendezvous keeps its own
        limit = {"timeout": self.timeout} if self.timeout is not None else {}
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            torch.distributed.init_process_group(backend=backend, **limit)
            return
        from torch.distributed.constants import default_pg_timeout

        store, _, _ = next(torch.distributed.rendezvous("env://", self.rank, self.world,
                                                        timeout=default_pg_timeout))
        store = torch.distributed.PrefixStore(f"pnnh/attempt_{self.restart}", store)
        torch.distributed.init_process_group(backend=backend, store=store, rank=self.rank,
                                             world_size=self.world, **limit)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float], device) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flags: list[bool], device) -> list[bool]:
        """Element-wise OR across ranks (every rank takes the same branch afterwards)."""
        if not self.enabled:
            return flags
        return [v > 0 for v in self.all_sum([float(f) for f in flags], device)]

    def gather(self, t: torch.Tensor, device) -> list[torch.Tensor]:
        """Every rank's copy of a same-shaped tensor (e.g. RNG states), on the CPU."""
        if not self.enabled:
            return [t.cpu()]
        src = t.to(device)
        parts = [torch.empty_like(src) for _ in range(self.world)]
        torch.distributed.all_gather(parts, src)
        return [p.cpu() for p in parts]

    def close(self, agreed: bool = True) -> None:
        """Leave together, then tear the group down.

        After an end all ranks agreed on (finished, interrupted, diverged: ``agreed``) every
        rank waits in a barrier for the others (rank 0 writes files last), so that no rank
        tears down its side while a peer still uses the group: that race aborted a rank of a
        finished run ("terminate called without an active exception", SIGABRT) about once in
        ten runs. After an error there is no barrier (a peer may be dead; torchrun stops the
        rest); the group is destroyed in every case.
        """
        if not (self.enabled and torch.distributed.is_initialized()):
            return
        try:
            if agreed:
                torch.distributed.barrier()
        finally:
            torch.distributed.destroy_process_group()
