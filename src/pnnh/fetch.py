"""``pnnh data fetch NAME`` (what ``make data`` runs): a data set from Debian's package into
the pnnh cache, once.

Debian packages Fashion-MNIST as ``dataset-fashion-mnist``: the four gzipped IDX files under
``/usr/share/datasets/fashion-mnist``. :func:`fetch` runs ``apt-get download`` (no root
needed) in a temporary folder beside the cache, unpacks the ``.deb`` with ``dpkg-deb -x``,
reads the four files with the loader's own checks, and moves them into
``cache_dir()/fashion-mnist`` by one rename: a reader finds the whole set or none of it.

It does nothing when the loader already reads a good copy (``$PNNH_DATA_DIR``, the cache,
``/usr/share/datasets``); a damaged copy in the cache is replaced. Where it cannot fetch (no
``apt-get``/``dpkg-deb``, no network, a package list without the package) it says why in
one line and still returns normally: the set-up must not fail on such a machine, and the
tests that need the real files say so themselves.

``apt-get update`` is never run, with one exception: as root, when the download failed
because the package lists lack the package or name a version the mirror no longer has, one
``apt-get update`` and one more download are tried (a fresh container ships without lists).
Without root, the message says to run it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from pnnh.data import IDX_FILES, IDX_SETS, _idx_file, cache_dir, idx_arrays, idx_folder
from pnnh.errors import DataError

APT_TIMEOUT_S = 600  # apt-get download of the ~30 MB .deb takes seconds on a working network
_NETWORK = re.compile(r"Temporary failure resolving|Could not resolve|Could not connect|"
                      r"Connection (failed|timed out|refused)|Network is unreachable|"
                      r"No route to host", re.I)
_STALE_LISTS = re.compile(r"Unable to locate package|has no installation candidate|"
                          r"404\s+Not Found", re.I)


def fetchable() -> list[str]:
    """The data sets :func:`fetch` can get: those Debian packages."""
    return [name for name, spec in IDX_SETS.items() if spec.debian_package]


def fetch(name: str) -> tuple[bool, str]:
    """Make ``name``'s IDX files readable from the pnnh cache: ``(ok, one-line message)``.

    ``ok`` is true when the set is there afterwards (fetched now, or already present)."""
    if name not in fetchable():
        raise DataError(f"data fetch: {name!r} has no Debian package to fetch; "
                        f"fetchable: {', '.join(fetchable())}")
    spec = IDX_SETS[name]
    target = cache_dir() / spec.folder
    folder, replacing = idx_folder(name), ""
    if folder is not None:
        try:
            idx_arrays(name)
            return True, f"{name}: already present in {folder}; nothing to fetch"
        except DataError as e:
            if folder != target:  # the user's own copy: fetching into the cache would not help
                return False, f"{name}: not fetched, the copy the loader reads is damaged: {e}"
            replacing = ", replacing a damaged copy"
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        return False, (f"{name}: not fetched: no {' or '.join(missing)} here (not Debian); "
                       f"put the four IDX files in {target} or pass --data-dir DIR")
    try:
        deb, problem = _fetch_into(name, target)
    except OSError as e:  # the cache cannot be written
        deb, problem = None, f"cannot write {e.filename or target}: {e.strerror or e}"
    if problem is not None:
        return False, f"{name}: not fetched: {problem}"
    size = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "?"
    return True, (f"{name}: fetched Debian's {spec.debian_package} {version} into {target} "
                  f"({len(IDX_FILES)} files, {size:.0f} MB{replacing})")


def _fetch_into(name: str, target: Path) -> tuple[Path | None, str | None]:
    """Download, unpack, check and install, in a temporary folder beside ``target`` that goes
    in every case: ``(the .deb's path, None)`` or ``(_, why not)``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-fetch-", dir=target.parent))
    try:
        deb, problem = _download(IDX_SETS[name].debian_package, tmp)
        if problem is None:
            problem = _unpack_and_install(name, deb, tmp, target)
        return deb, problem
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], cwd: Path) -> tuple[int, str]:
    """``cmd``'s exit code and its output (stdout and stderr, kept from the terminal)."""
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=APT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 124, f"E: {cmd[0]} {cmd[1]} ran over {APT_TIMEOUT_S} s (a slow or hanging network)"
    except OSError as e:
        return 127, f"E: cannot run {cmd[0]}: {e.strerror or e}"
    return r.returncode, r.stdout + r.stderr


def _download(package: str, tmp: Path) -> tuple[Path | None, str | None]:
    """``apt-get download package`` into ``tmp``: ``(the .deb, None)`` or ``(None, why not)``."""
    code, out = _run(["apt-get", "download", "-q", package], tmp)
    if code != 0 and _STALE_LISTS.search(out) and os.geteuid() == 0:
        if _run(["apt-get", "update", "-q"], tmp)[0] == 0:
            code, out = _run(["apt-get", "download", "-q", package], tmp)
    debs = sorted(tmp.glob(f"{package}_*.deb"))
    if code == 0 and len(debs) == 1:
        return debs[0], None
    errors = [line.strip() for line in out.splitlines() if line.startswith("E:")]
    detail = errors[-1] if errors else (out.strip().splitlines() or [f"exit code {code}"])[-1]
    if _NETWORK.search(out):
        return None, f"no network (apt-get download: {detail})"
    if _STALE_LISTS.search(out):
        return None, (f"the package lists lack {package} or are stale ({detail}); run "
                     f"`apt-get update` as root, then `pnnh data fetch` again")
    if code == 0:
        return None, f"apt-get download left {len(debs)} {package}_*.deb files, expected one"
    return None, f"apt-get download failed ({detail})"


def _unpack_and_install(name: str, deb: Path, tmp: Path, target: Path) -> str | None:
    """``dpkg-deb -x``, check the four files, rename them into ``target``; None or why not."""
    code, out = _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], tmp)
    if code != 0:
        lines = out.strip().splitlines() or [f"exit code {code}"]
        return f"dpkg-deb -x {deb.name} failed ({lines[-1]})"
    unpacked = tmp / "root" / IDX_SETS[name].debian_tree()
    try:
        idx_arrays(name, unpacked)
    except DataError as e:
        return f"the package's files do not read: {e}"
    staging = tmp / "new"
    staging.mkdir()
    for base in IDX_FILES:
        src = _idx_file(unpacked, base)
        os.replace(src, staging / src.name)
    if target.exists() or target.is_symlink():
        os.replace(target, tmp / "old")  # a damaged copy: removed with tmp
    os.replace(staging, target)
    return None
