"""``pnnh data fetch``: Debian's package into the pnnh cache, with stand-ins for ``apt-get``
and ``dpkg-deb`` on PATH (the real fetch is what `make data` runs; test_idx.py checks the real
files it fetched). Every outcome is one line and exit code 0."""

import io
import os
import stat
import tarfile

import pytest
from _helpers import write_idx_set

from pnnh import data
from pnnh.cli import main
from pnnh.data import IDX_FILES, get_dataset

FAKE_APT = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
if [ "$1" = update ]; then touch "$FAKE_DIR/updated"; exit 0; fi
case "$FAKE_MODE" in
  nonet) echo "E: Failed to fetch http://deb.debian.org/x.deb  Temporary failure resolving \
'deb.debian.org'" >&2; exit 100;;
  nolists) if [ ! -e "$FAKE_DIR/updated" ]; then
             echo "E: Unable to locate package $3" >&2; exit 100; fi;;
esac
echo "W: Download is performed unsandboxed as root" >&2
cp "$FAKE_DIR/package.deb" "./$3_1.0-1_all.deb"
"""
# dpkg-deb -x DEB DIR; the stand-in .deb is a tar of the package's tree
FAKE_DPKG = """#!/bin/sh
mkdir -p "$3" && tar -xf "$2" -C "$3"
"""


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """``apt-get``/``dpkg-deb`` stand-ins first on PATH, serving a .deb of tiny IDX files
    (``$FAKE_MODE``: ok, nonet, nolists); returns their folder (the call log: ``log``)."""
    bin_dir, tree = tmp_path / "bin", tmp_path / "tree"
    bin_dir.mkdir()
    for name, text in (("apt-get", FAKE_APT), ("dpkg-deb", FAKE_DPKG)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    write_idx_set(tree / "usr/share/datasets/fashion-mnist", n_train=40, n_test=10)
    (tree / "usr/share/doc").mkdir(parents=True)
    with tarfile.open(tmp_path / "package.deb", "w") as tar:
        tar.add(tree, arcname=".")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("FAKE_MODE", "ok")
    monkeypatch.setenv("PNNH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PNNH_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_DATASETS", tmp_path / "installed")  # as if not installed
    return tmp_path


def _fetch(capsys) -> tuple[str, str]:
    assert main(["data", "fetch", "fashion-mnist"]) == 0
    out, err = capsys.readouterr()
    assert len((out + err).strip().splitlines()) == 1 and "Traceback" not in out + err
    return out.strip(), err.strip()


def _calls(fake) -> list[str]:
    log = fake / "log"
    return log.read_text().splitlines() if log.exists() else []


def test_fetch_installs_the_four_files_atomically_once(fake_debian, capsys):
    out, err = _fetch(capsys)
    target = fake_debian / "cache" / "fashion-mnist"
    assert out.startswith("fashion_mnist: fetched Debian's dataset-fashion-mnist 1.0-1 into "
                          f"{target}") and not err
    assert sorted(p.name for p in target.iterdir()) == sorted(f + ".gz" for f in IDX_FILES)
    assert [p.name for p in (fake_debian / "cache").iterdir()] == ["fashion-mnist"]  # no temp
    assert len(get_dataset("fashion_mnist")[0]) == 40
    out, _ = _fetch(capsys)
    assert out == f"fashion_mnist: already present in {target}; nothing to fetch"
    assert _calls(fake_debian) == ["download -q dataset-fashion-mnist"]


def test_nothing_is_fetched_where_the_loader_finds_the_set(fake_debian, capsys, monkeypatch):
    write_idx_set(fake_debian / "mine" / "fashion-mnist")
    monkeypatch.setenv("PNNH_DATA_DIR", str(fake_debian / "mine"))
    out, _ = _fetch(capsys)
    assert out == (f"fashion_mnist: already present in {fake_debian / 'mine' / 'fashion-mnist'}; "
                   "nothing to fetch")
    assert _calls(fake_debian) == [] and not (fake_debian / "cache").exists()


def test_a_damaged_copy_in_the_cache_is_replaced(fake_debian, capsys):
    target = write_idx_set(fake_debian / "cache" / "fashion-mnist", n_train=20)
    (target / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    out, _ = _fetch(capsys)
    assert out.endswith("replacing a damaged copy)")
    assert len(get_dataset("fashion_mnist")[0]) == 40


def test_without_apt_it_says_so_and_succeeds(fake_debian, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_debian / "cache"))  # no apt-get, no dpkg-deb
    out, err = _fetch(capsys)
    assert not out and err.startswith("fashion_mnist: not fetched: no apt-get or dpkg-deb here")
    assert "--data-dir" in err


def test_without_network_it_says_so_and_leaves_nothing(fake_debian, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "nonet")
    _, err = _fetch(capsys)
    assert err.startswith("fashion_mnist: not fetched: no network (apt-get download: E: Failed")
    assert list((fake_debian / "cache").iterdir()) == []


@pytest.mark.parametrize("root", [True, False])
def test_missing_package_lists_one_update_as_root_only(fake_debian, capsys, monkeypatch, root):
    monkeypatch.setenv("FAKE_MODE", "nolists")
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    out, err = _fetch(capsys)
    if root:
        assert out.startswith("fashion_mnist: fetched")
        assert _calls(fake_debian) == ["download -q dataset-fashion-mnist", "update -q",
                                       "download -q dataset-fashion-mnist"]
    else:
        assert "the package lists lack dataset-fashion-mnist" in err
        assert "run `apt-get update` as root" in err
        assert _calls(fake_debian) == ["download -q dataset-fashion-mnist"]


def test_a_cache_that_cannot_be_written_is_one_line(fake_debian, capsys, monkeypatch):
    (fake_debian / "a-file").write_text("")
    monkeypatch.setenv("PNNH_CACHE_DIR", str(fake_debian / "a-file" / "cache"))
    _, err = _fetch(capsys)
    assert err.startswith(f"fashion_mnist: not fetched: cannot write {fake_debian / 'a-file'}")
    assert _calls(fake_debian) == []


def test_a_package_whose_files_do_not_read_installs_nothing(fake_debian, capsys):
    deb = fake_debian / "package.deb"
    with tarfile.open(deb, "w") as tar:
        info = tarfile.TarInfo("./usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    _, err = _fetch(capsys)
    assert err.startswith("fashion_mnist: not fetched: the package's files do not read")
    assert list((fake_debian / "cache").iterdir()) == []


def test_only_packaged_sets_are_fetchable(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "fetch", "mnist"])
    assert e.value.code == 2 and "invalid choice: 'mnist'" in capsys.readouterr().err
