"""The ``pnnh`` process's allocator setting: freed tensors served again from glibc's heap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter (mallopt is process-wide): a 16 MiB tensor, then glibc's own count of
# bytes in mmap-ed blocks (mallinfo2().hblkhd) while it lives.
PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from pnnh.allocator import retain_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = retain_freed_memory() if sys.argv[1] == "set" else None
    before = libc.mallinfo2().hblkhd
    t = torch.empty(4 * 2**20)  # 16 MiB: above glibc's starting mmap threshold (128 KiB)
    t.fill_(1.0)
    mapped = libc.mallinfo2().hblkhd - before
    print(json.dumps({"applied": applied, "mapped": mapped}))
""")


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "PNNH_MALLOC")}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env},
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's mallopt")


@glibc
def test_a_tensor_below_32_mib_comes_from_the_heap_once_set():
    """Unset, glibc maps a fresh 16 MiB block for the tensor (faulted in page by page, given
    back on free); set, the tensor comes from the heap, where a freed one leaves its pages."""
    assert probe("unset")["mapped"] >= 16 * 2**20
    got = probe("set")
    assert got["applied"] is True
    assert got["mapped"] == 0


@glibc
@pytest.mark.parametrize("env", [{"PNNH_MALLOC": "default"},
                                 {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}])
def test_the_users_own_setting_is_left_alone(env):
    got = probe("set", **env)
    assert got["applied"] is False
    assert got["mapped"] >= 16 * 2**20


@glibc
def test_a_tunable_for_something_else_does_not_turn_it_off():
    got = probe("set", GLIBC_TUNABLES="glibc.cpu.hwcap_mask=0")
    assert got["applied"] is True and got["mapped"] == 0


def test_the_command_sets_it_and_the_library_does_not(monkeypatch, capsys):
    """``pnnh.cli.run`` (the process entry) sets it before the command runs; ``main`` (what a
    Python caller or a test runs) and the probes leave the caller's allocator as it was."""
    from pnnh import allocator, cli

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append("set") or True)
    assert cli.main(["models"]) == 0
    assert calls == []
    with pytest.raises(SystemExit) as e:
        cli.run(["models"])
    assert e.value.code == 0 and calls == ["set"]
    capsys.readouterr()
