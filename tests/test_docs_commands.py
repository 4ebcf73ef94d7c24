"""Every shell command in README.md and docs/*.md runs: exit code 0, no traceback.

Conventions (also in docs/ARCHITECTURE.md, "Documented commands are tested"):

- Commands go in ```bash fenced blocks (```sh / ```shell too); those blocks are run. Output,
  tables and formulas go in ```text blocks (or any other language) and are not.
- One command per line; a trailing ``\\`` continues it; ``# comments`` are ignored; leading
  ``VAR=value`` assignments (``OMP_NUM_THREADS=1``) set the environment of that command.
- ``pnnh ...`` and ``python -m pnnh...`` run in this process, in a temporary directory shared by
  all commands in document order (README first, then docs/*.md by name), so a later command may
  read what an earlier one wrote (``runs/x``). Nothing is written into the repository.
- ``PNNH_QUICK=1`` is set (see :func:`pnnh.cli.apply_quick`): ``train`` runs 1 epoch of 2 steps
  on at most 512 samples, probes use at most 64 samples and short iterations, ``demo`` runs
  ``--quick``. Depths, widths and every flag are kept, so the code paths are the documented ones.
  ``reproduce`` runs at ``--scale quick``: every experiment of :mod:`pnnh.reproduce` has a
  test-sized form (part of its contract) that runs all its parts and writes all its files in
  seconds, so ``pnnh reproduce NAME`` and a later ``pnnh report runs/reproduce/NAME`` run here.
- Files the docs assume exist are made first: ``my.yaml``, the checkpoints
  ``runs/p/checkpoints/best.pt`` and ``runs/train/checkpoints/best.pt``, a copy of
  ``tests/user_models.py`` (the hand-written models of the ``--model-file`` examples), and
  tiny Fashion-MNIST IDX files in ``$PNNH_DATA_DIR`` (so ``pnnh data fetch`` downloads nothing).
- Anything else must match an entry of :data:`EXCEPTIONS` (a regular expression and the reason
  it is not run: GPUs, torchrun, CIFAR files, installation, the minutes-long benchmarks). An entry
  that matches no command any more fails the test, so the list stays true.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from _helpers import write_idx_set

from pnnh.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
RUN_LANGS = {"bash", "sh", "shell"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)

EXCEPTIONS: list[tuple[str, str]] = [
    (r"^make (demo|test)\b", "sets up .venv (.venv-ecosystem) and runs the demo / a test suite"),
    (r"^(python3 -m venv|pip install)", "installation"),
    (r"torchrun", "several processes (tested by tests/test_ddp.py)"),
    (r"--device cuda|--scale paper", "needs a GPU"),
    (r"--dataset cifar10|--data-dir (DATA|data/)", "needs the CIFAR-10 files"),
    (r"benchmarks/\w+\.py", "minutes; each benchmark runs with --quick in tests/test_benchmarks.py"),
    (r"^python -c ['\"]\s*import (time|json)", "a timing measurement at full size / a summary "
     "script over runs made by hand"),
    (r"\$\{?[A-Za-z_]", "a shell script over variables set in the text (e.g. $D)"),
    (r"^(for|done)\b", "a shell loop (see the $-variables entry)"),
    (r"^pnnh export .*--format onnx", "needs the optional onnx package"),
    (r"tests/ecosystem_models\.py", "real torchvision/timm/transformers models: run by "
     "tests/test_ecosystem.py in the ecosystem environment"),
]


def _commands(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` for each command in the runnable fenced blocks of ``text``."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) not in RUN_LANGS:
            continue
        first = text.count("\n", 0, m.start(2)) + 1
        pending, start = "", 0
        for i, line in enumerate(m.group(2).splitlines()):
            if not pending:
                start = first + i
            pending += line + "\n"
            if line.rstrip().endswith("\\"):
                pending = pending.rstrip().rstrip("\\") + " "
                continue
            try:
                tokens = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if tokens:
                out.append((start, pending.strip()))
            pending = ""
    return out


def _all_commands() -> list[tuple[str, str]]:
    cmds = []
    for doc in DOCS:
        for line, cmd in _commands(doc.read_text()):
            cmds.append((f"{doc.relative_to(ROOT)}:{line}", cmd))
    return cmds


COMMANDS = _all_commands()


def _exception(cmd: str) -> str | None:
    cmd = re.sub(r"^([A-Za-z_]\w*=\S*\s+)+", "", cmd)  # leading VAR=value assignments
    for pattern, reason in EXCEPTIONS:
        if re.search(pattern, cmd, re.M):
            return reason
    return None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The shared cwd, with the files the docs assume (made quickly, like the commands)."""
    d = tmp_path_factory.mktemp("docs-commands")
    old = os.getcwd()
    os.chdir(d)
    os.environ["PNNH_QUICK"] = "1"
    old_data_dir = os.environ.get("PNNH_DATA_DIR")
    # tiny Fashion-MNIST files where the loader and `pnnh data fetch` look first (>= 512
    # training images: PNNH_QUICK's subset), so that nothing is downloaded
    os.environ["PNNH_DATA_DIR"] = str(write_idx_set(tmp_path_factory.mktemp("idx") / "fashion-mnist",
                                                    n_train=600, n_test=100).parent)
    try:
        (d / "my.yaml").write_text("model: resnet_mlp\ndepth: 4\nepochs: 1\nout: runs/my\n")
        (d / "tests").mkdir()
        shutil.copy(ROOT / "tests" / "user_models.py", d / "tests" / "user_models.py")
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["train", "--model", "pnnh_mlp", "--depth", "4", "--out", "runs/p"]) == 0
            assert main(["train", "--model", "resnet_mlp", "--depth", "4", "--out",
                         "runs/train"]) == 0
        yield d
    finally:
        os.environ.pop("PNNH_QUICK", None)
        if old_data_dir is None:
            os.environ.pop("PNNH_DATA_DIR", None)
        else:
            os.environ["PNNH_DATA_DIR"] = old_data_dir
        os.chdir(old)


def _run(tokens: list[str]) -> int:
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        env[k] = v
    head = tokens[0]
    if head == "pnnh":
        return main(tokens[1:])
    if Path(head).name.startswith("python") and tokens[1:2] == ["-m"]:
        module = tokens[2]
        if module == "pnnh":
            return main(tokens[3:])
        if module.startswith("pnnh."):
            old = sys.argv
            sys.argv = [module, *tokens[3:]]
            try:
                runpy.run_module(module, run_name="__main__")
            except SystemExit as e:
                return int(e.code or 0)
            finally:
                sys.argv = old
            return 0
    raise AssertionError(f"no way to run {head!r}: add it to EXCEPTIONS with a reason")


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs(where, cmd, workdir, capsys):
    reason = _exception(cmd)
    if reason:
        pytest.skip(f"not run: {reason}")
    rc = _run(shlex.split(cmd, comments=True))
    err = capsys.readouterr().err
    assert rc == 0, f"{where}: `{cmd}` exited {rc}: {err.strip()[-500:]}"
    assert "Traceback" not in err


def test_the_docs_have_commands_and_every_exception_is_used():
    assert len(COMMANDS) >= 20, "README/docs lost their ```bash blocks?"
    used = {p for _, c in COMMANDS for p, r in EXCEPTIONS if _exception(c) == r}
    unused = [p for p, _ in EXCEPTIONS if p not in used]
    assert not unused, f"EXCEPTIONS entries that match no documented command: {unused}"


def test_the_parser_joins_continuations_and_open_quotes_and_skips_text_blocks():
    text = ("```bash\npnnh a \\\n  --b 1   # note\n# only a comment\npython -c 'x\ny'\n```\n"
            "```text\npnnh not-run\n```\n")
    (l1, c1), (l2, c2) = _commands(text)
    assert (l1, shlex.split(c1, comments=True)) == (2, ["pnnh", "a", "--b", "1"])
    assert (l2, shlex.split(c2)) == (5, ["python", "-c", "x\ny"])
