"""glibc's allocator set to keep freed memory for the next pass (the ``pnnh`` process).

PyTorch on a CPU allocates every tensor through ``malloc``. glibc serves a request of
``M_MMAP_THRESHOLD`` or more (128 KiB at start, raised on the fly up to 32 MiB as such blocks
are freed) with a fresh ``mmap``, returned to the system when freed, and gives the top of its
heap back once more than ``M_TRIM_THRESHOLD`` of it is free (mallopt(3)). A backward pass frees
and takes again the same few hundred megabytes each time, so each pass faults many of its
temporaries in afresh, page by page, zeroed by the kernel. With the mmap threshold fixed at its
ceiling (32 MiB: model-sized vectors still come from ``mmap``) and trimming off, freed
temporaries are served again from the heap, already in memory: a bare double-backward HVP on
torchvision's ResNet-18 runs about a fifth faster, EfficientNet-B0's no faster
(``benchmarks/hessian_overhead.py`` times both settings; docs/BENCHMARKS.md).

The price: memory freed inside the process stays with it until it exits (its peak resident
size does not grow). That suits a command that runs one job and exits, so :func:`pnnh.cli.run`
sets it; a library call does not change a process-wide setting behind its caller's back.
Where the user set glibc's malloc variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``), or
``PNNH_MALLOC=default``, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_CEILING = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def retain_freed_memory(mmap_threshold: int = MMAP_CEILING,
                        trim_threshold: int = 2**31 - 1) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (see the module docstring);
    ``True`` where both took. ``False``, changing nothing, off Linux/glibc, where the user set
    glibc's malloc variables, or under ``PNNH_MALLOC=default``. The thresholds are C ints (the
    trim threshold at most 2 GiB). Both must be set together: setting either one stops glibc's
    dynamic threshold, and the trim threshold alone would leave the mmap threshold at 128 KiB:
    every larger tensor a fresh mapping."""
    if (not sys.platform.startswith("linux") or os.environ.get("PNNH_MALLOC") == "default"
            or any(os.environ.get(k) for k in USER_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) != 1:  # 1 = accepted (glibc)
        return False
    return mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
