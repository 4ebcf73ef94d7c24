"""Fashion-MNIST and MNIST: the IDX reader on files written here in the real format (gzipped
and plain), every way a file can be wrong, the search for the folder, training on them from
the command line, and the real Fashion-MNIST files the set-up fetches."""

import gzip
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import write_idx, write_idx_set
from hypothesis import given, settings
from hypothesis import strategies as st

from pnnh import data
from pnnh.cli import main
from pnnh.data import (
    IDX_FILES,
    find_idx_dir,
    get_dataset,
    holdout_split,
    idx_arrays,
    idx_search_path,
    read_idx,
)
from pnnh.errors import DataError


@pytest.mark.parametrize("gz", [True, False])
def test_the_reader_reads_every_idx_type_gzipped_or_plain(tmp_path, gz):
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        got = read_idx(write_idx(tmp_path / f"a-{np.dtype(dtype).name}", a, gz=gz))
        assert got.dtype == dtype and got.dtype.isnative and np.array_equal(got, a)
        assert not got.flags.writeable  # shared by the per-process cache: never changed


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_tiny_files(tmp_path, gz):
    write_idx_set(tmp_path, n_train=60, n_test=20, gz=gz)
    train, val = get_dataset("fashion_mnist", str(tmp_path))
    assert (len(train), len(val)) == (60, 20)
    assert train.input_shape == (1, 28, 28) and train.num_classes == 10 and train.augmentable
    assert train.name == "fashion_mnist" and val.tensors[1].dtype == torch.int64
    x = train.tensors[0]
    assert abs(x.mean().item()) < 1e-5 and abs(x.std().item() - 1) < 1e-4
    a = idx_arrays("fashion_mnist", tmp_path)
    raw_train, raw_val = (a[s][0].astype(np.float64) for s in ("train", "test"))
    mean, std = raw_train.mean(), raw_train.std(ddof=1)
    assert torch.allclose(val.tensors[0][:, 0].double(), torch.from_numpy((raw_val - mean) / std),
                          atol=1e-5)  # the test split standardised with the training statistics


def test_images_stay_uint8_and_each_batch_is_standardised_as_the_whole_split(tmp_path):
    """The pixels are held as uint8 (a quarter of float32's memory); a batch is standardised
    where it is fetched, by the same two float32 operations on the same numbers as the whole
    split: bit for bit the same values, in any batch order, after a hold-out split too."""
    write_idx_set(tmp_path, n_train=60, n_test=20)
    train, val = get_dataset("fashion_mnist", str(tmp_path))
    assert train.raw.dtype == torch.uint8 and train.raw.shape == (60, 1, 28, 28)
    assert train._x is None  # no float copy until someone asks for the whole split
    idx = torch.tensor([5, 0, 59, 5])
    xb, yb = train.batch(idx)
    assert xb.dtype == torch.float32 and torch.equal(yb, train.y[idx])
    assert torch.equal(xb, train.tensors[0][idx])
    assert torch.equal(train[7][0], train.tensors[0][7])
    rest, held = holdout_split(train, 0.25)
    assert rest.raw.dtype == torch.uint8 and (len(rest), len(held)) == (45, 15)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    assert torch.equal(held.tensors[0], train.tensors[0][perm[45:]])
    assert torch.equal(rest.batch(torch.tensor([3]))[0], train.tensors[0][perm[3:4]])
    with pytest.raises(ValueError, match="uint8 inputs need their mean and std"):
        data.TensorData(train.raw, train.y, "x", 10)


def test_num_samples_is_a_fixed_nested_subset_of_the_training_split(tmp_path):
    write_idx_set(tmp_path, n_train=100, n_test=20)
    raw_x, raw_y = idx_arrays("mnist", tmp_path)["train"]
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    full, _ = get_dataset("mnist", str(tmp_path))
    for n, seed in ((30, 0), (50, 7)):  # the first n of the seed-0 permutation, whatever the seed
        sub, val = get_dataset("mnist", str(tmp_path), num_samples=n, seed=seed)
        assert (len(sub), len(val)) == (n, 20)  # the test split stays whole
        keep = perm[:n].sort().values.numpy()
        assert torch.equal(sub.tensors[1], torch.from_numpy(raw_y[keep].astype(np.int64)))
        x = raw_x[keep].astype(np.float64)
        assert torch.allclose(sub.tensors[0][:, 0].double(),
                              torch.from_numpy((x - x.mean()) / x.std(ddof=1)), atol=1e-5)
    with pytest.raises(DataError, match="num_samples: mnist has 100 training images"):
        get_dataset("mnist", str(tmp_path), num_samples=101)
    rest, held = holdout_split(full, 0.2)
    assert (len(rest), len(held)) == (80, 20)


@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw",
                                    "usr/share/datasets/fashion-mnist"])
def test_the_folder_may_hold_the_files_or_a_known_sub_folder(tmp_path, layout):
    write_idx_set(tmp_path / layout)
    assert find_idx_dir("fashion_mnist", tmp_path) == tmp_path / layout
    assert len(get_dataset("fashion_mnist", str(tmp_path))[0]) == 60


def test_search_order_data_dir_then_env_then_cache_then_debian(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PNNH_CACHE_DIR", str(cache))
    monkeypatch.delenv("PNNH_DATA_DIR", raising=False)
    assert idx_search_path("fashion_mnist") == [cache / "fashion-mnist",
                                                Path("/usr/share/datasets/fashion-mnist")]
    assert idx_search_path("mnist") == [cache / "mnist"]  # Debian packages no MNIST
    monkeypatch.setattr(data, "DEBIAN_DATASETS", tmp_path / "installed")
    write_idx_set(tmp_path / "installed" / "fashion-mnist", n_train=20)
    assert len(get_dataset("fashion_mnist")[0]) == 20  # where apt-get install puts it
    write_idx_set(cache / "fashion-mnist", n_train=40)
    assert len(get_dataset("fashion_mnist")[0]) == 40
    monkeypatch.setenv("PNNH_DATA_DIR", str(tmp_path / "root"))
    assert len(get_dataset("fashion_mnist")[0]) == 40  # a data root without the set: the cache
    write_idx_set(tmp_path / "root" / "fashion-mnist", n_train=50)
    assert len(get_dataset("fashion_mnist")[0]) == 50
    write_idx_set(tmp_path / "mine", n_train=30)
    assert len(get_dataset("fashion_mnist", str(tmp_path / "mine"))[0]) == 30
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no IDX files"):  # --data-dir is the only place then
        get_dataset("fashion_mnist", str(tmp_path / "empty"))


def _damage(folder, what):
    """Spoil one file of a good set the way ``what`` says; returns the spoiled file."""
    img, lab = folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz"
    if what == "missing":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
        return folder
    if what == "truncated gzip":
        img.write_bytes(img.read_bytes()[:-100])
    elif what == "corrupt gzip":
        raw = bytearray(img.read_bytes())
        raw[20:40] = b"\xff" * 20
        img.write_bytes(bytes(raw))
    elif what == "wrong magic":
        img.write_bytes(gzip.compress(b"\x08\x03\x00\x00" + gzip.decompress(img.read_bytes())[4:]))
    elif what == "truncated idx":
        img.write_bytes(gzip.compress(gzip.decompress(img.read_bytes())[:-28]))
    elif what == "count mismatch":
        write_idx(lab, np.zeros(59, np.uint8))
        return lab
    elif what == "label out of range":
        write_idx(lab, np.full(60, 10, np.uint8))
        return lab
    elif what == "image size":
        write_idx(img, np.zeros((60, 32, 32), np.uint8))
    elif what == "labels as images":
        write_idx(img, np.zeros(60, np.uint8))
    return img


@pytest.mark.parametrize("what,needle", [
    ("missing", "lacks t10k-labels-idx1-ubyte[.gz]"),
    ("truncated gzip", "bad gzip data"),
    ("corrupt gzip", "bad gzip data"),
    ("wrong magic", "not an IDX file (magic number 08030000"),
    ("truncated idx", "truncated: its header says 60x28x28 values (47,040 bytes), it has 47,012"),
    ("count mismatch", "59 labels for the 60 images of train-images-idx3-ubyte.gz"),
    ("label out of range", "label 10 outside 0..9"),
    ("image size", "expected uint8 images (N, 28, 28)"),
    ("labels as images", "holds uint8 (60,), expected uint8 images"),
])
def test_a_bad_file_is_one_line_naming_it_and_how_to_get_the_data(tmp_path, what, needle):
    write_idx_set(tmp_path)
    bad = _damage(tmp_path, what)
    with pytest.raises(DataError) as e:
        get_dataset("fashion_mnist", str(tmp_path))
    msg = str(e.value)
    assert needle in msg and str(bad) in msg and "\n" not in msg
    assert "pnnh data fetch fashion_mnist" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_a_repaired_file_is_read_again_not_taken_from_the_cache(tmp_path):
    write_idx_set(tmp_path)
    lab = tmp_path / "train-labels-idx1-ubyte.gz"
    good = lab.read_bytes()
    write_idx(lab, np.full(60, 11, np.uint8))
    with pytest.raises(DataError, match="label 11"):
        get_dataset("fashion_mnist", str(tmp_path))
    lab.write_bytes(good)
    assert len(get_dataset("fashion_mnist", str(tmp_path))[0]) == 60


def test_mnist_says_where_to_put_its_files(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset("mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "--data-dir" in str(e.value)
    assert "apt-get" not in str(e.value)


@pytest.mark.parametrize("where", ["nonexistent", "empty"])
def test_cli_a_missing_dataset_folder_is_exit_2_one_line(capsys, tmp_path, where):
    folder = tmp_path / where
    if where == "empty":
        folder.mkdir()
    code = main(["train", "--model", "resnet_mlp", "--dataset", "fashion_mnist", "--data-dir",
                 str(folder), "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(folder) in err and "pnnh data fetch" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start


def test_cli_trains_a_cnn_on_fashion_mnist_files(capsys, tmp_path):
    write_idx_set(tmp_path / "data" / "fashion-mnist", n_train=64, n_test=20)
    out = tmp_path / "run"
    code = main(["train", "--model", "plain20", "--width", "4", "--dataset", "fashion_mnist",
                 "--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "32",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    (line,) = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line)["epoch"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "fashion_mnist" and 0 <= summary["final_val_acc"] <= 1


def test_the_real_fashion_mnist(user_cache):
    """The files the set-up fetched (`make data`), found as a user's run finds them. Skipped
    where they are absent, except in CI (``CI`` set), whose `make test` fetches them first."""
    try:
        folder = find_idx_dir("fashion_mnist")
    except DataError as e:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI: the set-up (`make data`) should have fetched Fashion-MNIST: {e}")
        pytest.skip(f"no Fashion-MNIST here; `make data` fetches it ({e})")
    a = idx_arrays("fashion_mnist")
    (tx, ty), (vx, vy) = a["train"], a["test"]
    assert tx.shape == (60_000, 28, 28) and vx.shape == (10_000, 28, 28), folder
    assert np.bincount(ty).tolist() == [6000] * 10 and np.bincount(vy).tolist() == [1000] * 10
    assert abs(tx.mean(dtype=np.float64) - 72.94) < 0.01
    assert abs(vx.mean(dtype=np.float64) - 73.15) < 0.01
    assert sorted(p.name.removesuffix(".gz") for p in folder.iterdir()
                  if p.name.removesuffix(".gz") in IDX_FILES) == sorted(IDX_FILES)
    train, val = get_dataset("fashion_mnist", num_samples=1000)
    assert (len(train), len(val)) == (1000, 10_000) and val.input_shape == (1, 28, 28)
    assert abs(val.tensors[0].mean().item()) < 0.05  # standardised with the subset's statistics


@settings(max_examples=150, deadline=None, database=None)
@given(header=st.binary(min_size=0, max_size=24), body=st.binary(max_size=64), gz=st.booleans())
def test_any_bytes_are_an_idx_array_or_a_data_error_naming_the_file(header, body, gz):
    """Random bytes, with and without a valid-looking magic number, gzipped or not: an
    array whose size agrees with its header, or one DataError line naming the file."""
    with tempfile.TemporaryDirectory() as d:
        raw = (b"\x00\x00" + header[2:] if header[:1] == b"\x00" else header) + body
        path = Path(d) / "x-idx3-ubyte"
        path.write_bytes(gzip.compress(raw) if gz else raw)
        try:
            a = read_idx(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert a.size * a.itemsize == len(raw) - 4 - 4 * a.ndim
