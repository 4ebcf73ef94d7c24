import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pnnh.cli import main
from pnnh.errors import ConfigError


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_models_lists_names_families_and_parameter_counts(capsys):
    code, out, _ = run_cli(capsys, "models", "--filter", "mlp")
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["resnet_mlp"][1:3] == ["mlp", "resnet"]
    assert lines["plain_mlp"][3] == "105,610"  # depth 8, width 128 on (1, 40)


@pytest.mark.parametrize("argv,needle", [
    (["train", "--model", "resnet_mpl"], "unknown model 'resnet_mpl'"),
    (["train", "--dataset", "mnist2d", "--epochs", "1"], "unknown dataset 'mnist2d'"),
    (["train", "--lr", "-1"], "lr: must be positive"),
    (["train", "--epochs", "0"], "epochs: must be at least 1"),
    (["train", "--dataset", "cifar10", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["train", "--config", "/nonexistent/c.yaml"], "config file not found: /nonexistent/c.yaml"),
    (["train", "--model", "plain_mlp", "--depth", "7"], "depth must be 2 + 2*k"),
    (["train", "--model-arg", "bogus=1"], "does not take option(s) bogus"),
    (["train", "--model-arg", "a=NULL"], "does not take option(s) a"),  # a null value too
    (["train", "--lr-multiplier", "blocks=-1"], "lr_multipliers: blocks: must be a positive"),
    (["train", "--lr-multiplier", "blocks"], "--lr-multiplier expects KEY=VALUE"),
    (["train", "--lr-multiplier", "body=0.1", "--epochs", "1", "--num-samples", "100"],
     "lr_multipliers: resnet_mlp has no submodule 'body'"),
    (["probe", "norms", "--out", "x"], "give exactly one of --model"),
])
def test_user_errors_are_one_line_exit_2_no_traceback(capsys, tmp_path, argv, needle):
    code, out, err = run_cli(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 2
    assert needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_lr_multiplier_flags_reach_the_config():
    from pnnh.cli import build_parser, train_config_from_args

    args = build_parser().parse_args(["train", "--lr-multiplier", "blocks=0.1",
                                      "--lr-multiplier", "head=2",
                                      "--lr-multiplier", "blocks.*.enc=0.3"])
    assert train_config_from_args(args).lr_multipliers == {"blocks": 0.1, "head": 2,
                                                           "blocks.*.enc": 0.3}
    bad = build_parser().parse_args(["train", "--lr-multiplier", "blocks/0=0.3"])
    with pytest.raises(ConfigError, match="not a valid option name"):
        train_config_from_args(bad)


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--optimizer", "adam"])
    assert e.value.code == 2
    assert "invalid choice: 'adam'" in capsys.readouterr().err


def test_train_command_end_to_end_in_a_subprocess(tmp_path):
    """The installed console script, not a tty: plain one-line-per-epoch logs."""
    env = {**os.environ, "PNNH_CACHE_DIR": os.environ["PNNH_CACHE_DIR"]}
    exe = Path(sys.executable).with_name("pnnh")
    out = tmp_path / "x"
    p = subprocess.run([str(exe), "train", "--model", "resnet_mlp", "--dataset", "mnist1d",
                        "--depth", "8", "--epochs", "2", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "epoch 1/2" in p.stderr and "epoch 2/2" in p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_acc"] > 0.3
    assert (out / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("asked", ["cpu", "paper"])
def test_pnnh_quick_runs_reproduce_at_the_quick_scale(asked, monkeypatch):
    from pnnh.cli import apply_quick, build_parser

    argv = ["reproduce", "dissipation", "--scale", asked]
    args = build_parser(argv).parse_args(argv)
    monkeypatch.delenv("PNNH_QUICK", raising=False)
    apply_quick(args)
    assert args.scale == asked  # unset: the scale asked for
    monkeypatch.setenv("PNNH_QUICK", "1")
    apply_quick(args)
    assert args.scale == "quick"


def test_every_experiment_has_the_three_scales_and_others_are_refused(tmp_path):
    from pnnh import reproduce
    from pnnh.errors import ConfigError

    for name in reproduce.EXPERIMENTS:
        mod = reproduce.experiment(name)
        scales = getattr(mod, "SCALES", None)
        if isinstance(scales, dict):
            assert set(scales) == set(reproduce.SCALES), name
        else:  # modules with their own QUICK / CPU / PAPER configs
            assert hasattr(mod, "QUICK") and hasattr(mod, "CPU"), name
    with pytest.raises(ConfigError, match="scale: must be one of quick, cpu, paper"):
        reproduce.run("dissipation", tmp_path, scale="tiny")
