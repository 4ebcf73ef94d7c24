import pytest

from pnnh.cli import build_parser, train_config_from_args
from pnnh.config import TrainConfig, from_dict, load_yaml, parse_model_arg, resolve
from pnnh.errors import ConfigError


def _args(argv):
    return build_parser(["train", *argv]).parse_args(["train", *argv])


def test_flags_override_config_file_which_overrides_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 5\nlr: 0.1\noptimizer: sgd\nmodel_args: {zero_init_residual: true}\n")
    cfg = train_config_from_args(_args(["--config", str(cfg_file), "--lr", "0.01",
                                        "--model-arg", "foo=3"]))
    assert cfg.epochs == 5  # from the file
    assert cfg.lr == 0.01  # the flag wins
    assert cfg.optimizer == "sgd"
    assert cfg.batch_size == TrainConfig().batch_size  # default
    assert cfg.model_args == {"zero_init_residual": True, "foo": 3}


def test_unknown_key_and_wrong_type_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'epoch'") as e:
        from_dict({"epoch": 3})
    assert e.value.field == "epoch"
    with pytest.raises(ConfigError, match="epochs: expected int") as e:
        from_dict({"epochs": "many"})
    with pytest.raises(ConfigError, match="lr: expected float"):
        from_dict({"lr": [1, 2]})
    with pytest.raises(ConfigError, match="epochs: expected int"):
        from_dict({"epochs": 2.5})


@pytest.mark.parametrize("values,field", [
    ({"lr": -0.1}, "lr"), ({"lr": 0}, "lr"), ({"epochs": 0}, "epochs"),
    ({"batch_size": 0}, "batch_size"), ({"optimizer": "adam"}, "optimizer"),
    ({"schedule": "linear"}, "schedule"), ({"weight_decay": -1}, "weight_decay"),
    ({"label_smoothing": 1.5}, "label_smoothing"), ({"warmup_epochs": 20, "epochs": 3}, "warmup_epochs"),
    ({"device": "tpu"}, "device"), ({"momentum": 1.0}, "momentum"),
])
def test_bad_numbers_and_names(values, field):
    with pytest.raises(ConfigError) as e:
        resolve(values)
    assert e.value.field == field and field in str(e.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(lst)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(binary)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("epochs: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(evil)


def test_parse_model_arg():
    assert parse_model_arg("coder_ratio=0.5") == ("coder_ratio", 0.5)
    assert parse_model_arg("zero-init=true") == ("zero_init", True)
    assert parse_model_arg("name=abc") == ("name", "abc")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_model_arg("coder_ratio")


def test_every_config_field_has_a_flag():
    """Flags are generated from TrainConfig's fields: each field is settable from the command
    line, to a value other than its default."""
    import dataclasses

    from pnnh.cli import build_parser, train_config_from_args
    from pnnh.config import TrainConfig

    values = {int: "3", float: "0.5", str: "x"}
    special = {"optimizer": "sgd", "schedule": "step", "device": "cpu", "out": "runs/other",
               "epochs": "4", "warmup_epochs": "1", "num_samples": "300", "gamma": "0.5"}
    argv, expected = ["train"], {}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).split(" | ")[0]
        if f.name in ("model_args", "dataset_args", "lr_multipliers", "resume"):
            continue
        if kind == "bool":
            argv.append(flag if f.default is not True else "--no-" + flag[2:])
            expected[f.name] = f.default is not True
            continue
        text = special.get(f.name, values[{"int": int, "float": float, "str": str}[kind]])
        argv += [flag, text]
        expected[f.name] = {"int": int, "float": float, "str": str}[kind](text)
    argv += ["--model-arg", "coder_ratio=0.5", "--dataset-arg", "image_size=8", "--resume", "auto",
             "--lr-multiplier", "blocks=0.1"]
    cfg = train_config_from_args(build_parser(argv).parse_args(argv))
    for name, value in expected.items():
        assert getattr(cfg, name) == value != getattr(TrainConfig(), name), name
    assert cfg.model_args == {"coder_ratio": 0.5} and cfg.dataset_args == {"image_size": 8}
    assert cfg.resume == "auto" and cfg.lr_multipliers == {"blocks": 0.1}
    assert len(expected) == len(dataclasses.fields(TrainConfig)) - 4
