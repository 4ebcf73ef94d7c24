import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pnnh.data import augment_batch, get_dataset
from pnnh.errors import DataError


def test_mnist1d_generated_offline_and_cached(monkeypatch):
    train, val = get_dataset("mnist1d", num_samples=500)
    assert (len(train), len(val)) == (400, 100)
    assert train.input_shape == (1, 40) and train.num_classes == 10
    x, y = train.tensors
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3
    assert set(y.unique().tolist()) <= set(range(10))
    # second call reads the cache: generation must not run again
    import mnist1d.data

    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda *a, **k: pytest.fail("regenerated"))
    train2, _ = get_dataset("mnist1d", num_samples=500)
    assert torch.equal(train2.tensors[0], x)


def test_mnist1d_leaves_global_numpy_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    get_dataset("mnist1d", num_samples=300)
    assert np.random.rand() == expected


def test_mnist1d_fresh_sample_is_normalised_exactly_like_the_standard_test_split():
    """The generator loop reproduces the package's standard set, and its raw outputs go through
    the same two normalisations: fed the standard set's own raw test rows, the result equals
    the test split ``get_dataset`` returns."""
    from pnnh.data import _like_standard, _mnist1d_raw

    _, val = get_dataset("mnist1d", num_samples=500)
    raw, y = _mnist1d_raw(500, 42)
    assert torch.allclose(_like_standard(raw[400:], 500), val.tensors[0], atol=1e-6)
    assert torch.equal(torch.from_numpy(y[400:]), val.tensors[1])


def test_mnist1d_fresh_sample_is_new_balanced_and_checked(monkeypatch):
    from pnnh import data
    from pnnh.data import mnist1d_fresh_test

    fresh = mnist1d_fresh_test(300, seed=3, reference=500)
    x, y = fresh.tensors
    assert x.shape == (300, 1, 40) and fresh.num_classes == 10
    assert torch.bincount(y).tolist() == [30] * 10
    train, val = get_dataset("mnist1d", num_samples=500)
    standard = torch.cat([train.tensors[0], val.tensors[0]]).flatten(1)
    assert torch.cdist(x.flatten(1), standard).min() > 1e-3  # no example of the standard set
    assert abs(x.mean().item() - val.tensors[0].mean().item()) < 0.1
    assert torch.equal(mnist1d_fresh_test(300, seed=3, reference=500).tensors[0], x)
    assert not torch.equal(mnist1d_fresh_test(300, seed=4, reference=500).tensors[0], x)
    with pytest.raises(DataError, match="seed: 42"):
        mnist1d_fresh_test(300, seed=42, reference=500)
    with pytest.raises(DataError, match="num_samples"):
        mnist1d_fresh_test(5, reference=500)
    stored = data._mnist1d_arrays(500)
    monkeypatch.setattr(data, "_mnist1d_arrays", lambda n: {**stored, "x": stored["x"] + 1})
    with pytest.raises(DataError, match="no longer reproduces"):
        mnist1d_fresh_test(300, seed=3, reference=500)


def test_digits():
    train, val = get_dataset("digits")
    assert len(train) + len(val) == 1797
    assert train.input_shape == (1, 8, 8)


def _write_cifar(root, name="cifar10", n_train=6, n_test=4):
    """Write files exactly like the official python batches (pickled dicts, bytes keys)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        label_key, classes = b"labels", 10
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        files, label_key, classes = ["train", "test"], b"fine_labels", 100
    written = {}
    for f in files:
        n = n_test if f in ("test_batch", "test") else n_train
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, size=n).tolist()
        entry = {b"batch_label": f.encode(), b"data": data, label_key: labels,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        if name == "cifar100":
            entry[b"coarse_labels"] = [lab // 5 for lab in labels]
        with open(d / f, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
        written[f] = (data, labels)
    return d, written


@pytest.mark.parametrize("name,classes,n_train", [("cifar10", 10, 30), ("cifar100", 100, 6)])
def test_cifar_reads_the_real_format(tmp_path, name, classes, n_train):
    d, written = _write_cifar(tmp_path, name)
    train, val = get_dataset(name, str(tmp_path))
    assert len(train) == n_train and len(val) == 4
    assert train.input_shape == (3, 32, 32) and train.num_classes == classes
    test_file = "test_batch" if name == "cifar10" else "test"
    assert val.tensors[1].tolist() == written[test_file][1]
    # channel-first layout: the first 1024 bytes are the red plane of image 0
    raw = torch.from_numpy(written[test_file][0][0, :1024].reshape(32, 32)).float()
    red = val.tensors[0][0, 0]
    corr = torch.corrcoef(torch.stack([raw.flatten(), red.flatten()]))[0, 1]
    assert corr > 0.999
    # the sub-folder itself also works as --data-dir
    train2, _ = get_dataset(name, str(d))
    assert torch.equal(train2.tensors[0], train.tensors[0])
    # the pixels stay uint8 in memory; a batch is standardised per channel with the training
    # split's statistics, to the values of the whole standardised split
    assert train.raw.dtype == torch.uint8 and train.raw.shape == (n_train, 3, 32, 32)
    x = train.tensors[0].double()
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-5)
    idx = torch.tensor([3, 0, 5])
    assert torch.equal(train.batch(idx)[0], train.tensors[0][idx])


def test_cifar_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        get_dataset("cifar10")
    with pytest.raises(DataError, match="not found"):
        get_dataset("cifar10", str(tmp_path / "nope"))
    d, _ = _write_cifar(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        get_dataset("cifar10", str(tmp_path))
    with open(d / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataError, match=r"data_batch_3.*shape \(2, 100\)"):
        get_dataset("cifar10", str(tmp_path))
    (d / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        get_dataset("cifar10", str(tmp_path))


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_loader_never_runs_code_from_the_file(tmp_path):
    d, _ = _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(d / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": [0]}, fh)
    with pytest.raises(DataError, match="refusing to load global"):
        get_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def _write_images(root, classes=("cat", "dog"), n=3, size=12):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")


def test_imagefolder(tmp_path):
    _write_images(tmp_path)
    train, val = get_dataset("imagefolder", str(tmp_path), image_size=16)
    assert len(train) == 6 and len(val) == 6 and train.num_classes == 2
    x, y = train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    assert val.classes == ["cat", "dog"]


def test_imagefolder_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        get_dataset("imagefolder", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        get_dataset("imagefolder", str(tmp_path / "empty"))
    _write_images(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "cat" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        get_dataset("imagefolder", str(tmp_path / "d"))


def test_synthetic_is_configurable_and_learnable():
    train, val = get_dataset("synthetic", num_samples=200, input_shape=(3, 8, 8), num_classes=4,
                             noise=0.1)
    assert train.input_shape == (3, 8, 8) and train.num_classes == 4 and len(train) == 160
    # nearest class mean separates this task almost perfectly
    x, y = train.tensors
    means = torch.stack([x[y == c].mean(0) for c in range(4)]).flatten(1)
    vx, vy = val.tensors
    pred = torch.cdist(vx.flatten(1), means).argmin(1)
    assert (pred == vy).float().mean() > 0.9


def test_holdout_carves_validation_from_the_training_split():
    full, test = get_dataset("mnist1d", num_samples=500)
    train, held = get_dataset("mnist1d", num_samples=500, holdout=0.25)
    assert (len(train), len(held)) == (300, 100)
    # both parts come from the training split, disjoint and together all of it
    rows = {tuple(r.flatten().tolist()) for r in full.tensors[0]}
    parts = [{tuple(r.flatten().tolist()) for r in d.tensors[0]} for d in (train, held)]
    assert parts[0] | parts[1] == rows and not parts[0] & parts[1]
    assert not parts[1] & {tuple(r.flatten().tolist()) for r in test.tensors[0]}
    # the split does not depend on the training seed
    again, _ = get_dataset("mnist1d", num_samples=500, holdout=0.25, seed=7)
    assert torch.equal(again.tensors[0], train.tensors[0])
    for bad in (0.0 + 1e-9, 1.0, -0.5, 2):
        with pytest.raises(DataError, match="holdout"):
            get_dataset("mnist1d", num_samples=500, holdout=bad)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'mnist2d'"):
        get_dataset("mnist2d")


def test_augment_batch_crops_and_flips():
    x = torch.randn(64, 3, 8, 8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = augment_batch(x, g1, padding=0)
    assert torch.equal(a, augment_batch(x, g2, padding=0))  # deterministic given the generator
    flipped = [torch.equal(a[i], x[i].flip(2)) for i in range(64)]
    same = [torch.equal(a[i], x[i]) for i in range(64)]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54
    c = augment_batch(x, torch.Generator().manual_seed(2), padding=2, flip=False)
    assert c.shape == x.shape
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(8):
        assert any(torch.equal(c[i], padded[i, :, dy:dy + 8, dx:dx + 8])
                   for dy in range(5) for dx in range(5))
