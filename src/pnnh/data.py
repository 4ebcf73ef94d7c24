"""Datasets behind one function, :func:`get_dataset`, plus image augmentation in plain torch.

Every dataset comes back as a ``(train, val)`` pair of torch datasets with ``input_shape``
(shape of one input, no batch dimension), ``num_classes`` and ``name``. Small datasets are held
in memory as :class:`TensorData` (``.tensors == (x, y)``), which the trainer batches without a
DataLoader; ``imagefolder`` is read lazily from disk.

Inputs are normalised per channel with the training split's mean and standard deviation.
Nothing is downloaded: MNIST-1D is generated offline by the ``mnist1d`` package (and cached),
``digits`` ships with scikit-learn, CIFAR and image folders are read from ``data_dir``, and
Fashion-MNIST / MNIST from their IDX files, found by :func:`find_idx_dir` (``data_dir``,
``$PNNH_DATA_DIR``, the cache ``pnnh data fetch`` fills from Debian's package, Debian's
install path).
"""

from __future__ import annotations

import functools
import gzip
import io
import math
import os
import pickle
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pnnh.errors import DataError

DATASETS = ("mnist1d", "digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder",
            "synthetic")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp", ".tif", ".tiff")


class TensorData(Dataset):
    """An in-memory dataset: ``x`` (N, *input_shape), ``y`` (N,) int64.

    ``x`` is float32, or uint8 pixels with their standardisation ``(x - mean) / std``
    (``mean``, ``std``: numbers, or one per channel, channel = dim 1): the images then stay
    uint8 (a quarter of the memory, and of the bytes a batch moves to a GPU) and :meth:`batch`
    standardises each batch where it lands, to the same float32 values a standardised copy
    holds (the same two elementwise operations on the same numbers). ``tensors`` (the whole
    split as float32) is made on first use.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, name: str, num_classes: int,
                 augmentable: bool = False, mean: float | tuple[float, ...] | None = None,
                 std: float | tuple[float, ...] | None = None):
        if x.dtype == torch.uint8 and (mean is None or std is None):
            raise ValueError("TensorData: uint8 inputs need their mean and std")
        self.raw = x.contiguous() if x.dtype == torch.uint8 else None
        self.mean, self.std = mean, std
        # what a batch is standardised with: the numbers, or (C, 1, 1) float32 tensors made once
        self._stats = (mean, std) if mean is None or isinstance(mean, (int, float)) else tuple(
            torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))
        self._x = None if self.raw is not None else x.float().contiguous()
        self.y = y.long().contiguous()
        self.name = name
        self.num_classes = int(num_classes)
        self.input_shape = tuple(x.shape[1:])
        self.augmentable = augmentable  # 2-D natural images: random crop + flip make sense

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the whole split, ``x`` standardised float32."""
        if self._x is None:
            self._x = self._standardise(self.raw)
        return self._x, self.y

    def _standardise(self, raw: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats
        if isinstance(mean, torch.Tensor) and mean.device != raw.device:  # moved once a device
            self._stats = mean, std = mean.to(raw.device), std.to(raw.device)
        return raw.float().sub_(mean).div_(std)

    def batch(self, idx: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the samples ``idx`` on ``device`` (uint8 pixels move as uint8 and are
        standardised there)."""
        y = self.y[idx].to(device, non_blocking=True)
        if self._x is not None:
            return self._x[idx].to(device, non_blocking=True), y
        return self._standardise(self.raw[idx].to(device, non_blocking=True)), y

    def subset(self, idx: torch.Tensor) -> TensorData:
        """The samples ``idx`` as a new dataset, stored as this one is."""
        x = self.raw if self.raw is not None else self._x
        return TensorData(x[idx], self.y[idx], self.name, self.num_classes, self.augmentable,
                          self.mean, self.std)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        """One sample (``i`` an int) or a batch (a slice, a list or a tensor of indices)."""
        if isinstance(i, int):  # per-sample readers: no index tensor over the whole split
            x, y = self.batch(torch.tensor([i]))
            return x[0], y[0]
        idx = torch.arange(len(self.y))[i]
        if idx.dim() == 0:
            x, y = self.batch(idx.reshape(1))
            return x[0], y[0]
        return self.batch(idx)


# Class names, by label, of the sets whose labels are only numbers in their files
CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}


def cache_dir() -> Path:
    """``$PNNH_CACHE_DIR``, else ``$XDG_CACHE_HOME/pnnh``, else ``~/.cache/pnnh``."""
    if os.environ.get("PNNH_CACHE_DIR"):
        return Path(os.environ["PNNH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pnnh"


def _normalize(train_x: torch.Tensor, val_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardisation (channel = dim 1) with the training split's statistics."""
    dims = [0] + list(range(2, train_x.dim()))
    mean = train_x.mean(dim=dims, keepdim=True)
    std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (train_x - mean) / std, (val_x - mean) / std


# ----------------------------------------------------------------------------- MNIST-1D
def _mnist1d_arrays(num_samples: int) -> dict[str, np.ndarray]:
    """Generate (once) and cache MNIST-1D with the package's standard arguments."""
    path = cache_dir() / f"mnist1d_{num_samples}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a damaged cache is regenerated, never trusted
            path.unlink(missing_ok=True)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - a dependency of pnnh
        raise DataError(f"dataset 'mnist1d' needs the mnist1d package: {e}") from e
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG; leave it as it was
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return arrays


def _mnist1d(num_samples: int | None) -> tuple[TensorData, TensorData]:
    n = 10_000 if num_samples is None else int(num_samples)
    a = _mnist1d_arrays(n)
    tx = torch.from_numpy(a["x"]).float().unsqueeze(1)
    vx = torch.from_numpy(a["x_test"]).float().unsqueeze(1)
    tx, vx = _normalize(tx, vx)
    ty, vy = torch.from_numpy(a["y"]), torch.from_numpy(a["y_test"])
    return TensorData(tx, ty, "mnist1d", 10), TensorData(vx, vy, "mnist1d", 10)


def _mnist1d_raw(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The package's ``make_dataset`` loop (its templates, its ``transform``, its shuffle) with
    ``seed``, stopped before its own whole-set centring and scaling."""
    from mnist1d.data import get_dataset_args, get_templates, set_seed, transform

    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    templates = get_templates()
    state = np.random.get_state()
    try:
        set_seed(args.seed)
        xs, ys = [], []
        for label_ix in range(len(templates["y"])):
            for _ in range(args.num_samples // len(templates["y"])):
                x, _t = transform(templates["x"][label_ix], templates["t"], args)
                xs.append(x)
                ys.append(templates["y"][label_ix])
        order = np.random.permutation(len(ys))
    finally:
        np.random.set_state(state)
    return np.stack(xs)[order], np.stack(ys)[order]


def mnist1d_fresh_test(num_samples: int, seed: int = 2026, reference: int = 10_000) -> TensorData:
    """``num_samples`` new MNIST-1D examples from the same generator, normalised exactly as the
    ``reference``-sized dataset's test split is.

    The standard split is one draw of ``reference · 0.2`` examples (the package's seed 42), so an
    accuracy measured on it carries that sample's noise (a standard error of ~0.9 points per
    model at 2,000 examples and 80% accuracy). This draws fresh examples with another ``seed``
    and puts them through the training pipeline's two normalisations, with the *reference*
    set's constants: the package's whole-set centring and scaling (recomputed from the
    reference set's raw draw, which reproduces its stored inputs) and then the training split's
    per-position mean and standard deviation (:func:`_normalize`)."""
    if num_samples < 10:
        raise DataError(f"num_samples: a fresh MNIST-1D sample needs at least 10 examples, got "
                        f"{num_samples}")
    if seed == 42:
        raise DataError("seed: 42 is the seed of the standard MNIST-1D set; a fresh sample needs "
                        "another")
    x, y = _mnist1d_raw(num_samples, seed)
    return TensorData(_like_standard(x, reference), torch.from_numpy(y), "mnist1d", 10)


def _like_standard(raw_x: np.ndarray, reference: int) -> torch.Tensor:
    """Raw generator outputs normalised as the ``reference``-sized standard set's test split."""
    ref_x, _ = _mnist1d_raw(reference, 42)
    mean, std = ref_x.mean(), ref_x.std()
    stored = _mnist1d_arrays(reference)
    split = len(stored["x"])
    if not np.allclose((ref_x[:split] - mean) / std, stored["x"], atol=1e-6):
        raise DataError("mnist1d: the installed package no longer reproduces the cached "
                        f"{reference}-example set; remove {cache_dir()} and retry")
    tx = torch.from_numpy(stored["x"]).float().unsqueeze(1)
    vx = torch.from_numpy((raw_x - mean) / std).float().unsqueeze(1)
    return _normalize(tx, vx)[1]


# ----------------------------------------------------------------------------- digits
def _digits() -> tuple[TensorData, TensorData]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    tr, va = perm[:n_train], perm[n_train:]
    tx, vx = _normalize(x[tr], x[va])
    return TensorData(tx, y[tr], "digits", 10), TensorData(vx, y[va], "digits", 10)


# ----------------------------------------------------------------------------- IDX (MNIST format)
@dataclass(frozen=True)
class IdxSet:
    """An MNIST-format set: where its four IDX files live and how a user gets them."""

    folder: str  # the sub-folder name, in the pnnh cache and under a data root
    torchvision: str  # torchvision's folder name (``<root>/<name>/raw``)
    debian_package: str | None = None  # installs /usr/share/datasets/<folder>

    def debian_tree(self) -> Path | None:
        """Where the files lie inside the package's ``.deb`` (installed: under ``/``)."""
        return Path("usr/share/datasets", self.folder) if self.debian_package else None

    def hint(self, name: str) -> str:
        """How to get the files, the tail of every error about them."""
        if self.debian_package:
            return (f"get the data with `pnnh data fetch {name}` (what `make data` runs), "
                    f"`apt-get install {self.debian_package}`, or --data-dir DIR")
        return (f"put {', '.join(f + '.gz' for f in IDX_FILES)} in --data-dir DIR, "
                f"$PNNH_DATA_DIR/{self.folder} or {cache_dir() / self.folder}")


IDX_SETS = {
    "fashion_mnist": IdxSet("fashion-mnist", "FashionMNIST", "dataset-fashion-mnist"),
    "mnist": IdxSet("mnist", "MNIST"),
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_IMAGE_SHAPE = (28, 28)
DEBIAN_DATASETS = Path("/usr/share/datasets")  # where Debian's dataset-* packages are installed
# the IDX type codes (the third byte of the magic number); values are big-endian
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32,
               0x0D: np.float32, 0x0E: np.float64}


def _idx_file(folder: Path, base: str) -> Path | None:
    """``base`` in ``folder``, plain or gzipped (the plain file first, as torchvision)."""
    for path in (folder / base, folder / (base + ".gz")):
        if path.is_file():
            return path
    return None


def _idx_layouts(root: Path, spec: IdxSet) -> list[Path]:
    """The folders under ``root`` that may hold the files: itself, ``<root>/<folder>``,
    torchvision's ``<root>/<Name>/raw`` and Debian's tree as ``dpkg-deb -x`` extracts it."""
    out = [root, root / spec.folder, root / spec.torchvision / "raw"]
    return out + ([root / spec.debian_tree()] if spec.debian_package else [])


def idx_search_path(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders :func:`find_idx_dir` looks in, in order: ``data_dir`` (and its layouts)
    alone when given; else ``$PNNH_DATA_DIR`` (and its layouts), ``cache_dir()/<folder>``
    (what ``pnnh data fetch`` writes) and Debian's ``/usr/share/datasets/<folder>``."""
    spec = _idx_spec(name)
    if data_dir:
        return _idx_layouts(Path(data_dir), spec)
    out = _idx_layouts(Path(os.environ["PNNH_DATA_DIR"]), spec) \
        if os.environ.get("PNNH_DATA_DIR") else []
    out.append(cache_dir() / spec.folder)
    return out + ([DEBIAN_DATASETS / spec.folder] if spec.debian_package else [])


def idx_folder(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder the loader reads: the first of :func:`idx_search_path` holding any of the
    four IDX files (complete or not), or None."""
    return next((folder for folder in idx_search_path(name, data_dir)
                 if any(_idx_file(folder, base) for base in IDX_FILES)), None)


def find_idx_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """:func:`idx_folder`, which must hold all four files. A :class:`DataError` (one line:
    where it looked, how to get the data) if it is missing or incomplete."""
    spec = _idx_spec(name)
    if data_dir and not Path(data_dir).is_dir():
        raise DataError(f"{name}: data directory not found: {data_dir}; {spec.hint(name)}",
                        field="data_dir")
    folder = idx_folder(name, data_dir)
    if folder is not None:
        missing = [base + "[.gz]" for base in IDX_FILES if _idx_file(folder, base) is None]
        if missing:
            raise DataError(f"{name}: {folder} lacks {', '.join(missing)}; {spec.hint(name)}")
        return folder
    looked = ", ".join(str(p) for p in idx_search_path(name, data_dir))
    raise DataError(f"{name}: no IDX files (train-images-idx3-ubyte[.gz], ...) in {looked}; "
                    f"{spec.hint(name)}")


def _idx_spec(name: str) -> IdxSet:
    if name not in IDX_SETS:
        raise DataError(f"not an IDX dataset: {name!r}; known: {', '.join(IDX_SETS)}")
    return IDX_SETS[name]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file, gzipped or plain, as a read-only array of its type and shape.

    The format (LeCun's MNIST page; torchvision's ``read_sn3_pascalvincent_tensor``): a magic
    number ``0x0000TTNN`` (``TT`` the type code, ``NN`` the number of dimensions), ``NN``
    big-endian int32 sizes, then the values, big-endian. A file that does not read, is not
    gzip or IDX, or whose size differs from its header's is a :class:`DataError` naming it.
    Decoded arrays are kept per process (keyed by path, size and modification time)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    return _read_idx_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    """:func:`read_idx`'s work; ``size`` and ``mtime_ns`` only key the cache."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: bad gzip data ({e}); the file is damaged") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, "
                        f"expected 0x0000TTNN)")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]]).newbyteorder(">")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated in its header ({len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", ndim, 4))
    start, want = 4 + 4 * ndim, math.prod(shape) * dtype.itemsize
    if len(raw) - start != want:
        raise DataError(f"{path}: {'truncated' if len(raw) - start < want else 'too long'}: "
                        f"its header says {'x'.join(map(str, shape))} values ({want:,} bytes), "
                        f"it has {len(raw) - start:,} bytes of data")
    arr = np.frombuffer(raw, dtype, math.prod(shape), start).reshape(shape)
    arr = arr.astype(dtype.newbyteorder("="), copy=False)
    arr.flags.writeable = False
    return arr


def idx_arrays(name: str, data_dir: str | os.PathLike | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": (images, labels)}`` of an MNIST-format set, as
    read-only uint8 arrays (images ``(N, 28, 28)``, labels ``(N,)``), found by
    :func:`find_idx_dir` and checked: types, image size, equal counts, labels 0..9. Every
    failure is one :class:`DataError` naming the file and how to get the data."""
    spec = _idx_spec(name)
    folder = find_idx_dir(name, data_dir)
    out = {}
    for split, (img_base, lab_base) in (("train", IDX_FILES[:2]), ("test", IDX_FILES[2:])):
        img_path, lab_path = _idx_file(folder, img_base), _idx_file(folder, lab_base)
        try:
            images, labels = read_idx(img_path), read_idx(lab_path)
            _check_idx_pair(img_path, images, lab_path, labels)
        except DataError as e:
            raise DataError(f"{name}: {e}; {spec.hint(name)}") from None
        out[split] = (images, labels)
    return out


def _check_idx_pair(img_path: Path, images: np.ndarray, lab_path: Path,
                    labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IDX_IMAGE_SHAPE:
        raise DataError(f"{img_path}: holds {images.dtype} {images.shape}, expected uint8 "
                        f"images (N, {IDX_IMAGE_SHAPE[0]}, {IDX_IMAGE_SHAPE[1]})")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{lab_path}: holds {labels.dtype} {labels.shape}, expected uint8 "
                        f"labels (N,)")
    if len(labels) != len(images):
        raise DataError(f"{lab_path}: {len(labels):,} labels for the {len(images):,} images "
                        f"of {img_path.name}")
    if len(labels) == 0:
        raise DataError(f"{img_path}: holds no images")
    if labels.max() > 9:
        raise DataError(f"{lab_path}: label {int(labels.max())} outside 0..9")


def _idx(name: str, data_dir: str | None, num_samples: int | None
         ) -> tuple[TensorData, TensorData]:
    """The training split (or its first ``num_samples`` in a fixed seed-0 permutation: every
    smaller subset inside every larger one) and the whole test split, standardised with the
    training subset's pixel mean and standard deviation (the same as scaling to [0, 1] first)."""
    a = idx_arrays(name, data_dir)
    (tx, ty), (vx, vy) = a["train"], a["test"]
    if num_samples is not None:
        if not 0 < num_samples <= len(ty):
            raise DataError(f"num_samples: {name} has {len(ty):,} training images, asked for "
                            f"{num_samples:,}", field="num_samples")
        keep = torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))[:num_samples]
        keep = keep.sort().values.numpy()
        tx, ty = tx[keep], ty[keep]
    mean, std = _pixel_stats(tx)
    # uint8 (N, 1, 28, 28), standardised per batch: 47 MB for the 60,000 training images (a
    # copy, np.array: the reader's arrays are shared by its cache and read-only)
    return tuple(TensorData(torch.from_numpy(np.array(x)).unsqueeze(1),
                            torch.from_numpy(y.astype(np.int64)), name, 10, augmentable=True,
                            mean=mean, std=std) for x, y in ((tx, ty), (vx, vy)))


def _pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of uint8 pixels, exactly, from their histogram
    (counted in chunks: no float or int64 copy of the whole set)."""
    flat, counts = images.reshape(-1), np.zeros(256, np.int64)
    for i in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[i:i + (1 << 22)], minlength=256)
    values, n = np.arange(256, dtype=np.float64), counts.sum()
    mean = float(counts @ values) / n
    var = float(counts @ (values - mean) ** 2) / max(n - 1, 1)
    return mean, max(var ** 0.5, 1e-8)


# ----------------------------------------------------------------------------- CIFAR
class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batch files that refuses every global but numpy's array rebuilders.

    The CIFAR "python version" batches are pickled dicts of numpy arrays and lists. Only the
    callables needed to rebuild an ndarray are allowed, so a crafted file cannot run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read CIFAR file {path}: {e.strerror or e}") from None
    try:
        d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR python batch file ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path} is not a CIFAR python batch file (expected a dict)")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    key = label_key.decode()
    if "data" not in d or key not in d:
        raise DataError(f"{path}: missing 'data' or '{key}' entry (is this the right CIFAR variant?)")
    data = np.asarray(d["data"])
    labels = np.asarray(d[key])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072) uint8")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {len(labels)} labels for {data.shape[0]} images")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar(name: str, data_dir: str | None) -> tuple[TensorData, TensorData]:
    if not data_dir:
        raise DataError(f"dataset {name!r} needs --data-dir (the folder of the python batches)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    if name == "cifar10":
        sub, train_files, test_files, key, classes = (
            "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
            b"labels", 10)
    else:
        sub, train_files, test_files, key, classes = (
            "cifar-100-python", ["train"], ["test"], b"fine_labels", 100)
    if (root / sub).is_dir():
        root = root / sub
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise DataError(f"{name}: missing file(s) in {root}: {', '.join(missing)}")

    def load(files):
        parts = [_read_cifar_batch(root / f, key) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    (tx, ty), (vx, vy) = load(train_files), load(test_files)
    for lab, f in ((ty, train_files[0]), (vy, test_files[0])):
        if lab.size and (lab.min() < 0 or lab.max() >= classes):
            raise DataError(f"{root / f}: labels outside 0..{classes - 1}")
    # uint8 (N, 3, 32, 32), standardised per batch with the training split's exact per-channel
    # pixel statistics: 154 MB for CIFAR's 50,000 training images, not 614 MB of float32
    stats = [_pixel_stats(np.ascontiguousarray(tx[:, c])) for c in range(tx.shape[1])]
    mean, std = map(tuple, zip(*stats))
    return tuple(TensorData(torch.from_numpy(x), torch.from_numpy(y), name, classes,
                            augmentable=True, mean=mean, std=std) for x, y in ((tx, ty), (vx, vy)))


# ----------------------------------------------------------------------------- image folder
class ImageFolderData(Dataset):
    """Class-per-folder images read lazily, converted to RGB, resized to ``image_size``."""

    def __init__(self, files: list[tuple[Path, int]], classes: list[str], image_size: int,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        self.files = files
        self.classes = classes
        self.num_classes = len(classes)
        self.image_size = image_size
        self.input_shape = (3, image_size, image_size)
        self.name = "imagefolder"
        self.augmentable = True
        self.mean = mean if mean is not None else torch.zeros(3, 1, 1)
        self.std = std if std is not None else torch.ones(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def load_raw(self, i: int) -> torch.Tensor:
        from PIL import Image

        path, _ = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((self.image_size, self.image_size))
                arr = np.asarray(img, dtype=np.uint8).copy()
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 255

    def __getitem__(self, i):
        return (self.load_raw(i) - self.mean) / self.std, self.files[i][1]


def _scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list, list[str]]:
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"imagefolder: no class sub-folders in {root}")
    files = []
    for ci, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                files.append((p, ci))
    if not files:
        raise DataError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files, classes


def _imagefolder(data_dir: str | None, image_size: int) -> tuple[ImageFolderData, ImageFolderData]:
    if not data_dir:
        raise DataError("dataset 'imagefolder' needs --data-dir (train/ and val/ class folders)")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    val_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_name:
        train_files, classes = _scan_folder(root / "train")
        val_files, _ = _scan_folder(root / val_name, classes)
    else:  # one folder of classes: a fixed 80/20 split
        files, classes = _scan_folder(root)
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
        cut = max(1, int(0.8 * len(files)))
        train_files = [files[i] for i in perm[:cut]]
        val_files = [files[i] for i in perm[cut:]] or train_files[-1:]
    train = ImageFolderData(train_files, classes, image_size)
    # per-channel statistics from (up to) 512 training images
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:512].tolist()
    sample = torch.stack([train.load_raw(i) for i in idx])
    mean = sample.mean(dim=(0, 2, 3)).view(3, 1, 1)
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-8).view(3, 1, 1)
    train.mean, train.std = mean, std
    return train, ImageFolderData(val_files, classes, image_size, mean, std)


# ----------------------------------------------------------------------------- synthetic
def _synthetic(num_samples: int | None, input_shape, num_classes: int, noise: float,
               seed: int) -> tuple[TensorData, TensorData]:
    """A learnable toy task: class prototypes plus Gaussian noise (``noise`` × prototype scale)."""
    n = 2000 if num_samples is None else int(num_samples)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise DataError(f"synthetic: input_shape must be positive integers, got {input_shape!r}")
    if num_classes < 2:
        raise DataError(f"synthetic: num_classes must be at least 2, got {num_classes}")
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn((num_classes, *shape), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = protos[y] + noise * torch.randn((n, *shape), generator=g)
    cut = int(0.8 * n)
    tx, vx = _normalize(x[:cut], x[cut:])
    augmentable = len(shape) == 3
    return (TensorData(tx, y[:cut], "synthetic", num_classes, augmentable),
            TensorData(vx, y[cut:], "synthetic", num_classes, augmentable))


def get_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    num_samples: int | None = None,
    image_size: int = 32,
    input_shape=(1, 40),
    num_classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
    holdout: float = 0.0,
):
    """Return ``(train, val)`` for a dataset name.

    ``holdout`` in (0, 1): ``val`` is instead that fraction of the *training* split
    (:func:`holdout_split`), for choosing settings without looking at the test split.

    - ``mnist1d``: generated offline (``num_samples`` in all, default 10,000 → 8,000/2,000),
      cached under :func:`cache_dir`; inputs (1, 40).
    - ``digits``: scikit-learn's 8×8 digits (1,797), a fixed 80/20 split; inputs (1, 8, 8).
    - ``fashion_mnist`` / ``mnist``: the standard IDX files (gzipped or not) found by
      :func:`find_idx_dir`; 60,000 training images (``num_samples``: a fixed subset of them)
      and the 10,000 test images as ``val``; inputs (1, 28, 28).
    - ``cifar10`` / ``cifar100``: the python-pickle batches in ``data_dir`` (or its
      ``cifar-10-batches-py`` / ``cifar-100-python`` sub-folder), loaded without running code.
    - ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or one
      folder of classes split 80/20), resized to ``image_size``.
    - ``synthetic``: prototypes + noise, ``input_shape`` / ``num_classes`` / ``num_samples``.
    """
    pair = _load(name, data_dir, num_samples, image_size, input_shape, num_classes, noise, seed)
    return holdout_split(pair[0], holdout) if holdout else pair


def _load(name, data_dir, num_samples, image_size, input_shape, num_classes, noise, seed):
    """:func:`get_dataset`'s dispatch on the name: ``(train, val)``."""
    input_shape = tuple(input_shape) if isinstance(input_shape, (list, tuple)) else (input_shape,)
    if name == "mnist1d":
        return _mnist1d(num_samples)
    if name == "digits":
        return _digits()
    if name in IDX_SETS:
        return _idx(name, data_dir, num_samples)
    if name in ("cifar10", "cifar100"):
        return _cifar(name, data_dir)
    if name == "imagefolder":
        return _imagefolder(data_dir, image_size)
    if name == "synthetic":
        return _synthetic(num_samples, input_shape, num_classes, noise, seed)
    raise DataError(f"unknown dataset {name!r} (field 'dataset'); known: {', '.join(DATASETS)}")


def holdout_split(train: Dataset, fraction: float) -> tuple[TensorData, TensorData]:
    """``(rest, held out)``: the last ``fraction`` of a fixed permutation of ``train`` (drawn
    with seed 0, so every training seed sees the same split) as a validation set. Inputs keep
    the standardisation of the whole training split (its mean and std only: no label leaks)."""
    if not isinstance(train, TensorData):
        raise DataError(f"holdout: needs an in-memory dataset (mnist1d, digits, "
                        f"fashion_mnist, mnist, cifar, synthetic), not {type(train).__name__}")
    fraction = float(fraction)
    n = len(train)
    k = round(fraction * n)
    if not 0.0 < fraction < 1.0 or not 0 < k < n:
        raise DataError(f"holdout: a fraction in (0, 1) leaving both parts non-empty, got "
                        f"{fraction!r} of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return train.subset(perm[:n - k]), train.subset(perm[n - k:])


def augment_batch(x: torch.Tensor, generator: torch.Generator, padding: int | None = None,
                  flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, on a (N, C, H, W) batch.

    ``padding`` defaults to ``H // 8`` (4 for 32×32, the standard CIFAR recipe).
    """
    n, _, h, w = x.shape
    pad = h // 8 if padding is None else padding
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)  # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)  # (n, w)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]
        x = x.permute(0, 3, 1, 2).contiguous()
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x
