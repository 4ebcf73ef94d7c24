"""Bad input, fuzzed: every case is one line naming the field or file, exit code 2, no
traceback, and nothing (or, for an error met mid-run, only whole files) in the run directory."""

import json
import os
import pickle
import string
import uuid

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pnnh.cli import main
from pnnh.config import FIELDS, MAX, from_dict, load_yaml, resolve, validate
from pnnh.data import get_dataset
from pnnh.errors import ConfigError, DataError, PnnhError

FUZZ = settings(max_examples=30, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# a tiny valid base, so a case that gets past validation only loads a 100-sample toy dataset
BASE = ["--model", "resnet_mlp", "--dataset", "synthetic", "--num-samples", "100",
        "--depth", "4", "--width", "8", "--epochs", "1"]


def test_the_examples_are_the_same_every_run():
    """CI draws what the last run drew (tests/conftest.py); ``PNNH_FUZZ=explore`` draws anew."""
    assert FUZZ.derandomize == (os.environ.get("PNNH_FUZZ") != "explore")
    assert FUZZ.database is None and FUZZ.max_examples == 30


def _run(capsys, argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage line + "error: argument --flag: ..."
        code = e.code
    return code, capsys.readouterr().err


def _assert_clean_failure(code: int, err: str, names: list[str], out) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "error" in line and any(n in line for n in names), (names, line)
    if not line.startswith("usage:") and "argument" not in line:
        assert len(err.strip().splitlines()) == 1, err
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))  # nothing written


# ----------------------------------------------------------------------------- bad values
_text = st.text(alphabet=string.ascii_letters + string.digits + "_-.!/ ", min_size=1, max_size=12)
_not_number = _text.filter(lambda s: not _is_float(s))


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


_huge = st.integers(10**7, 10**30)
_neg = st.integers(-10**12, 0)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_nonfinite = st.sampled_from(["nan", "inf", "-inf", "NaN", "Infinity"])

# flag -> strategy of values that must be refused (as text, the way a shell passes them)
BAD_FLAG_VALUES = {
    "--epochs": st.one_of(_neg, st.integers(MAX["epochs"] + 1, 10**30), _not_number, st.just("2.5")),
    "--batch-size": st.one_of(_neg, _not_number),
    "--depth": st.one_of(_neg, st.integers(MAX["depth"] + 1, 10**30), _not_number),
    "--width": st.one_of(_neg, st.integers(MAX["width"] + 1, 10**30), _not_number),
    "--seed": st.one_of(st.integers(-10**30, -1), st.integers(2**32, 10**30), _not_number),
    "--num-samples": st.one_of(st.integers(-10**9, 19), st.integers(MAX["num_samples"] + 1, 10**30)),
    "--lr": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False), _nonfinite,
                      _not_number),
    "--momentum": st.one_of(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                            st.floats(min_value=1, allow_nan=False, allow_infinity=False),
                            _nonfinite),
    "--weight-decay": st.one_of(st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False),
                                _nonfinite),
    "--label-smoothing": st.one_of(st.floats(min_value=1, allow_nan=False, allow_infinity=False),
                                   st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
    "--warmup-epochs": st.one_of(st.floats(min_value=1.001, max_value=1e30), st.floats(max_value=-1e-9,
                                 allow_nan=False, allow_infinity=False)),
    "--grad-clip": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False), _nonfinite),
    "--track-norms": _neg.filter(lambda v: v < 0),
    "--max-steps-per-epoch": _neg,
    "--optimizer": _text.filter(lambda s: s not in ("sgd", "adamw")),
    "--schedule": _text.filter(lambda s: s not in ("cosine", "step", "constant")),
    "--device": _text.filter(lambda s: s not in ("cpu", "cuda", "auto")),
    "--model": _text.map(lambda s: "no_such_" + s),
    "--dataset": _text.map(lambda s: "no_such_" + s),
}


@FUZZ
@given(data=st.data(), flag=st.sampled_from(sorted(BAD_FLAG_VALUES)))
def test_bad_command_line_values(tmp_path, capsys, data, flag):
    value = data.draw(BAD_FLAG_VALUES[flag])
    value = repr(value) if isinstance(value, float) else str(value)
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", *BASE, flag, value, "--out", str(out)])
    _assert_clean_failure(code, err, [flag, flag[2:].replace("-", "_")], out)


@FUZZ
@given(key=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True).filter(lambda k: k not in (
    "depth", "width", "in_shape", "num_classes", "zero_init_residual", "procrustes", "zca", "tat",
    "tat_eta")),
    value=st.one_of(st.integers(), _text, st.booleans()))
def test_unknown_model_options(tmp_path, capsys, key, value):
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", *BASE, "--model-arg", f"{key}={value}", "--out", str(out)])
    _assert_clean_failure(code, err, [key], out)


def _a_valid_shape(s: str) -> bool:
    """A string ``synthetic`` takes as a shape: each character a positive digit ("12" is (1, 2);
    the option's value arrives stripped)."""
    s = s.strip()
    try:
        return bool(s) and all(int(c) > 0 for c in s)
    except ValueError:
        return False


@FUZZ
@given(shape=st.one_of(st.text(max_size=6).filter(lambda s: not _a_valid_shape(s)),
                       st.lists(st.integers(-5, 0), min_size=1, max_size=3),
                       st.lists(st.integers(10**7, 10**9), min_size=2, max_size=3)))
def test_bad_dataset_options(tmp_path, capsys, shape):
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", *BASE, "--dataset-arg", f"input_shape={json.dumps(shape)}",
                              "--out", str(out)])
    _assert_clean_failure(code, err, ["dataset_args", "input_shape", "synthetic"], out)


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys):
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", *BASE[:-6], "--depth", "4", "--width", "999999",
                              "--epochs", "1", "--out", str(out)])
    _assert_clean_failure(code, err, ["width"], out)
    assert "parameters, too many to train" in err


# ----------------------------------------------------------------------------- config files
_yaml_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), _finite,
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=6)
_keys = st.one_of(st.sampled_from(sorted(FIELDS)), st.text(max_size=10))


@settings(max_examples=200, deadline=None, database=None)
@given(values=st.dictionaries(_keys, _yaml_value, max_size=6))
def test_any_config_mapping_is_valid_or_a_config_error_naming_a_given_key(values):
    """Pure validation (no training): wrong types, unknown keys, any numbers."""
    try:
        cfg = resolve(values)
    except ConfigError as e:
        given_keys = {str(k).replace("-", "_") for k in values}
        # a range check may name the partner of the key that broke it
        assert e.field in given_keys | {"warmup_epochs", "epochs"}, (e.field, values)
        assert e.field in str(e) or any(repr(k) in str(e) for k in values), str(e)
        return
    assert validate(cfg) is cfg


@settings(max_examples=100, deadline=None, database=None)
@given(text=st.text(max_size=60))
def test_any_config_text_is_a_mapping_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        data = load_yaml(path)
    except ConfigError as e:
        assert str(path) in str(e) and e.field == "config"
        return
    assert isinstance(data, dict)


@FUZZ
@given(data=st.data(), flag=st.sampled_from(sorted(set(BAD_FLAG_VALUES) - {"--num-samples"})))
def test_bad_config_file_values(tmp_path, capsys, data, flag):
    key = flag[2:].replace("-", "_")
    value = data.draw(BAD_FLAG_VALUES[flag])
    if isinstance(value, str) and _is_float(value):  # YAML spells non-finite floats .nan / .inf
        value = float(value)
    cfg = tmp_path / "c.yaml"
    base = {"model": "resnet_mlp", "dataset": "synthetic", "num_samples": 100, "depth": 4,
            "width": 8, "epochs": 1}
    cfg.write_text(yaml.safe_dump({**base, key: value}))
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", "--config", str(cfg), "--out", str(out)])
    _assert_clean_failure(code, err, [key], out)


@FUZZ
@given(key=st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,12}", fullmatch=True).filter(
    lambda k: k.replace("-", "_") not in FIELDS),
    kind=st.sampled_from(["list", "dict", "text"]), field=st.sampled_from(
    ["epochs", "batch_size", "lr", "momentum", "seed", "augment", "model_args"]))
def test_config_file_unknown_keys_and_wrong_types(tmp_path, capsys, key, kind, field):
    out = tmp_path / uuid.uuid4().hex
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({key: 1}))
    code, err = _run(capsys, ["train", "--config", str(cfg), "--out", str(out)])
    _assert_clean_failure(code, err, [key], out)
    wrong = {"list": [1, 2], "dict": {"a": 1}, "text": "many"}[kind]
    if field == "model_args" and kind == "dict":
        wrong = {"1bad key": 1}
    cfg.write_text(yaml.safe_dump({field: wrong}))
    code, err = _run(capsys, ["train", "--config", str(cfg), "--out", str(out)])
    _assert_clean_failure(code, err, [field], out)


# ----------------------------------------------------------------------------- files
@FUZZ
@given(name=st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True),
       which=st.sampled_from(["config", "cifar10", "cifar100", "imagefolder"]))
def test_missing_files_and_directories(tmp_path, capsys, name, which):
    missing = tmp_path / "nowhere" / name
    out = tmp_path / uuid.uuid4().hex
    if which == "config":
        argv = ["train", "--config", str(missing)]
    else:
        argv = ["train", "--dataset", which, "--data-dir", str(missing)]
    code, err = _run(capsys, [*argv, "--out", str(out)])
    _assert_clean_failure(code, err, [str(missing)], out)


def _write_cifar10(root, data, labels):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / f, "wb") as fh:
            pickle.dump({b"data": data, b"labels": labels}, fh, protocol=2)
    return d


@FUZZ
@given(n=st.integers(0, 6), width=st.integers(0, 4000), n_labels=st.integers(0, 7),
       ndim=st.sampled_from([1, 2, 3]), label_max=st.sampled_from([9, 10, -1]))
def test_cifar_files_of_the_wrong_shape(tmp_path_factory, n, width, n_labels, ndim, label_max):
    root = tmp_path_factory.mktemp("cifar")
    shape = {1: (n * width,), 2: (n, width), 3: (n, 1, width)}[ndim]
    data = np.zeros(shape, dtype=np.uint8)
    labels = [label_max if i == 0 else 0 for i in range(n_labels)]
    d = _write_cifar10(root, data, labels)
    valid = ndim == 2 and width == 3072 and n_labels == n and (n == 0 or 0 <= label_max <= 9)
    try:
        train, val = get_dataset("cifar10", str(root))
    except DataError as e:
        assert not valid, e
        assert str(d) in str(e)
        return
    assert valid and len(train) == 5 * n and train.input_shape == (3, 32, 32)


def test_wrong_cifar_shape_on_the_command_line(tmp_path, capsys):
    d = _write_cifar10(tmp_path / "c", np.zeros((4, 3000), np.uint8), [0, 1, 2, 3])
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "c"),
                              "--model", "plain_mlp", "--out", str(out)])
    _assert_clean_failure(code, err, [str(d / "data_batch_1")], out)
    assert "(N, 3072)" in err


def _image_folder(root, bad_in: str, payload: bytes):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (6, 6), (40 * i, 80, 120 if c == "a" else 0)).save(d / f"{i}.png")
    bad = root / bad_in / "a" / "broken.png"
    bad.write_bytes(payload)
    return bad


_broken_images = st.one_of(st.just(b""), st.binary(min_size=1, max_size=64),
                           st.just(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20))


@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_broken_images)
def test_unreadable_training_image(tmp_path_factory, capsys, payload):
    root = tmp_path_factory.mktemp("img")
    bad = _image_folder(root, "train", payload)
    out = root / uuid.uuid4().hex
    code, err = _run(capsys, ["train", "--dataset", "imagefolder", "--data-dir", str(root),
                              "--dataset-arg", "image_size=8", "--model", "plain_mlp", "--depth", "4",
                              "--width", "8", "--epochs", "1", "--batch-size", "4", "--out", str(out)])
    _assert_clean_failure(code, err, [str(bad)], out)


def test_unreadable_validation_image_met_mid_run_leaves_only_whole_files(tmp_path, capsys):
    bad = _image_folder(tmp_path, "val", b"not an image")
    out = tmp_path / uuid.uuid4().hex
    code, err = _run(capsys, ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path),
                              "--dataset-arg", "image_size=8", "--model", "plain_mlp", "--depth", "4",
                              "--width", "8", "--epochs", "2", "--batch-size", "4", "--no-progress",
                              "--out", str(out)])
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"pnnh: error: cannot read image {bad}: " + \
        err.strip().splitlines()[-1].split(f"{bad}: ", 1)[1]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["config.yaml", "summary.json"]  # no metrics line, no checkpoint, no temp
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and str(bad) in summary["error"]
    yaml.safe_load((out / "config.yaml").read_text())


def test_every_user_error_class_is_a_pnnh_error():
    for cls in (ConfigError, DataError):
        assert issubclass(cls, PnnhError) and cls("x").exit_code == 2
    with pytest.raises(ConfigError, match="option names"):
        from_dict({"model_args": {3: 1}})


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    code, err = _run(capsys, ["train", *BASE, "--out", str(out)])
    assert code == 2 and err.strip() == f"pnnh: error: out: {out} exists and is not a directory"
    assert out.read_text() == "mine"
