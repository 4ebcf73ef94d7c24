"""The ``deep-plain`` experiment in its quick form: both depths train, the deepest net's
export is a plain ``nn.Sequential`` that computes the model's function, with no skip."""

import json

import pytest
import torch
import yaml
from torch import nn

from pnnh.reproduce import deep_plain as exp


def test_deep_plain_quick(tmp_path, monkeypatch):
    monkeypatch.setattr(exp, "CPU", exp.QUICK)
    summary = exp.run(tmp_path, "cpu", "cpu", 0)
    assert [r["depth"] for r in summary["rows"]] == list(exp.QUICK["depths"])
    assert all(0 <= r["final_test_acc"] <= 1 for r in summary["rows"])
    assert summary["gap_points"] == 100 * (summary["rows"][1]["final_test_acc"]
                                           - summary["rows"][0]["final_test_acc"])
    export = summary["export"]
    deep = exp.QUICK["depths"][-1]
    assert export["plain"] and export["skips"] == []
    assert export["outputs_equal"] and export["max_abs_diff"] <= 1e-5
    assert export["max_abs_diff_float32"] <= 1e-4 and export["float32_predictions_agree"] == 1.0
    assert export["weight_layers"] == deep  # stem + 2 per block + head
    # the fused training form adds x literally (A = I fixed): one skip per block, reported
    assert export["training_form_skips"] == (deep - 2) // 2
    assert export["module_types"] == ["Flatten", "Linear", "ReLU"]
    for f in ("results.csv", "results.json", "curves.csv", "export.json", "training_curves.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert json.loads((tmp_path / "export.json").read_text())["depth"] == deep
    # a second run reuses the finished runs (same numbers, no training)
    again = exp.run(tmp_path, "cpu", "cpu", 0)
    assert [r["final_test_acc"] for r in again["rows"]] == [r["final_test_acc"]
                                                           for r in summary["rows"]]


def test_check_export_can_fail(monkeypatch):
    """The check is not vacuous: an export that differs from the model, or that keeps a
    residual block, is reported as such."""
    import pnnh.export
    from pnnh.models import create_model

    model = create_model("pnnh_mlp", depth=6, width=8)
    x = torch.randn(16, 1, 40)
    good = exp.check_export(model, x, 1e-5)
    assert good["outputs_equal"] and good["plain"] and good["weight_layers"] == 6

    real = pnnh.export.to_plain

    def off_by_bias(m):
        plain = real(m)
        with torch.no_grad():
            plain[-1].bias += 1e-3
        return plain

    monkeypatch.setattr(pnnh.export, "to_plain", off_by_bias)
    bad = exp.check_export(model, x, 1e-5)
    assert not bad["outputs_equal"] and bad["max_abs_diff"] == pytest.approx(1e-3, rel=1e-2)

    resnet = create_model("resnet_mlp", depth=6, width=8)
    monkeypatch.setattr(pnnh.export, "to_plain",
                        lambda m: nn.Sequential(m.stem, *m.blocks, m.head).eval())
    skipped = exp.check_export(resnet, x, 1e-5)
    assert skipped["outputs_equal"] and not skipped["plain"] and len(skipped["skips"]) == 2


def test_depth_lr_rule_and_reuse_only_at_same_lr(tmp_path, monkeypatch):
    """The blocks' lr follows the documented rule, and a finished run is reused only at the
    lrs the rule now gives (a run trained at another lr is never taken for it)."""
    p, b = exp.CPU["lr_depth_power"], exp.CPU["block_lr"]
    assert exp.block_lr(exp.CPU, 100) == b
    assert exp.block_lr(exp.CPU, 1000) == pytest.approx(b * 0.1 ** p)
    assert exp.block_lr({**exp.CPU, "lr_depth_power": 0.0}, 1000) == b
    no_base = {k: v for k, v in exp.CPU.items() if k != "block_lr"}  # default: the stem's lr
    assert exp.block_lr(no_base, 100) == exp.CPU["train"]["lr"]
    q = exp.CPU["enc_lr_depth_power"]
    assert exp.encoder_lr(exp.CPU, 100) == b
    assert exp.encoder_lr(exp.CPU, 1000) == pytest.approx(b * 0.1 ** q)
    one_lr = {k: v for k, v in exp.CPU.items() if k != "enc_lr_depth_power"}
    assert exp.encoder_lr(one_lr, 1000) == exp.block_lr(one_lr, 1000)  # default: the block's

    monkeypatch.setattr(exp, "CPU", exp.QUICK)
    first = exp.run(tmp_path, "cpu", "cpu", 0)
    assert [r["block_lr"] for r in first["rows"]] == [exp.block_lr(exp.QUICK, d)
                                                     for d in exp.QUICK["depths"]]
    assert all(r["lr"] == exp.QUICK["train"]["lr"] for r in first["rows"])
    deep_cfg = yaml.safe_load((tmp_path / first["rows"][1]["run"] / "config.yaml").read_text())
    b_over_lr = exp.QUICK["block_lr"] / exp.QUICK["train"]["lr"]
    assert deep_cfg["lr_multipliers"] == {"blocks": pytest.approx(b_over_lr * (8 / 40) ** p),
                                          "blocks.*.enc": pytest.approx(b_over_lr * (8 / 40) ** q)}
    shallow_cfg = yaml.safe_load((tmp_path / first["rows"][0]["run"] / "config.yaml").read_text())
    assert shallow_cfg["lr_multipliers"] == {"blocks": pytest.approx(b_over_lr)}  # one lr at L0
    # the pattern reaches exactly the encoders: E and b1 at the encoder lr, D and b2 at the block's
    from pnnh.config import resolve as make_config
    from pnnh.models import create_model
    from pnnh.train import build_optimizer

    model = create_model("pnnh_mlp", depth=40, width=8, in_shape=(1, 40), num_classes=10)
    opt = build_optimizer(make_config(deep_cfg), model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    lr = exp.QUICK["train"]["lr"]
    for name, prm in model.named_parameters():
        want = (exp.encoder_lr(exp.QUICK, 40) if ".enc" in name else
                exp.block_lr(exp.QUICK, 40) if name.startswith("blocks.") else lr)
        assert lr_of[id(prm)] == pytest.approx(want), name
    monkeypatch.setattr(exp, "CPU", {**exp.QUICK, "lr_depth_power": p + 1.0})
    again = exp.run(tmp_path, "cpu", "cpu", 0)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 3  # the shallow run is shared (same lr), the deep one is new
    assert again["rows"][0]["run"] == first["rows"][0]["run"]
    assert again["rows"][1]["run"] != first["rows"][1]["run"]
    other_seed = exp.run(tmp_path, "cpu", "cpu", 1)
    assert len(list((tmp_path / "runs").iterdir())) == 5  # another seed is never reused
    assert {r["run"] for r in other_seed["rows"]}.isdisjoint(r["run"] for r in again["rows"])


def test_seed_statistics_match_each_run_and_count_the_test_sample(tmp_path, monkeypatch):
    """The multi-seed gap is the runs' own gaps (checkpoints re-scored on the test set), the
    tree may be moved, and a directory that is not a finished run is named in the error."""
    import importlib.util
    import shutil
    from pathlib import Path

    from pnnh import reproduce
    from pnnh.errors import ConfigError

    monkeypatch.setattr(exp, "CPU", exp.QUICK)
    dirs = []
    for s in (0, 1):
        d = tmp_path / f"deep-plain-s{s}"
        reproduce.run("deep-plain", d, "cpu", "cpu", s)  # as `pnnh reproduce` writes it
        dirs.append(d)
    moved = tmp_path / "moved-s1"
    shutil.move(dirs[1], moved)  # results.json still names the old run paths
    dirs[1] = moved
    st = exp.seed_statistics(dirs, boots=200)
    for d, gap in zip(dirs, st["gaps_points"]):
        summary = json.loads((d / "summary.json").read_text())
        assert gap == pytest.approx(summary["gap_points"], abs=1e-9)
    assert st["mean_gap_points"] == pytest.approx(sum(st["gaps_points"]) / 2)
    lo, hi = st["bootstrap_95"]
    assert lo <= st["mean_gap_points"] <= hi
    assert st["disagreement"] > 0 and st["gaps_points"] != [0.0, 0.0]  # a non-vacuous check
    assert st["test_sampling_se_points"] > 0 and st["bootstrap_se_points"] > 0

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "deep_plain_seeds.py"
    spec = importlib.util.spec_from_file_location("bench_deep_plain_seeds", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main([str(d) for d in dirs] + ["--boots", "50", "--out",
                                                          str(tmp_path / "res")])
    assert out["gaps_points"] == st["gaps_points"]
    assert (tmp_path / "res" / "deep_plain_seeds.json").exists()
    fresh = bench.main([str(d) for d in dirs] + ["--boots", "50", "--fresh", "300",
                                                 "--out", str(tmp_path / "res"), "--name", "f"])
    assert fresh["examples"] == 300 and fresh["test_sample"] == "fresh mnist1d, seed 2026"
    assert fresh["shallow_acc"] != st["shallow_acc"]  # scored on other examples
    with pytest.raises(ConfigError, match="summary.json"):
        exp.seed_statistics([tmp_path / "nothing-here"])
    with pytest.raises(SystemExit) as e:
        bench.main([str(tmp_path / "nothing-here")])
    assert e.value.code == 2


def test_reproduce_seeds_runs_each_seed_and_writes_the_statistics(tmp_path, monkeypatch, capsys):
    """``pnnh reproduce deep-plain --seeds 0 1``: one output per seed under OUT/s<seed>, then
    OUT/seeds.json with the same gaps as the per-seed summaries and the verdict on the mean;
    an experiment without multi-seed statistics, repeated seeds and --seed with --seeds are
    one-line errors before anything runs."""
    from pnnh.cli import main

    monkeypatch.setattr(exp, "CPU", exp.QUICK)
    out = tmp_path / "dp"
    assert main(["reproduce", "deep-plain", "--seeds", "0", "1", "--out", str(out)]) == 0
    st = json.loads((out / "seeds.json").read_text())
    gaps = [json.loads((out / f"s{s}" / "summary.json").read_text())["gap_points"] for s in (0, 1)]
    assert st["gaps_points"] == pytest.approx(gaps, abs=1e-9) and st["seed_values"] == [0, 1]
    assert st["within_1pt_on_mean"] == (st["mean_gap_points"] >= -1.0)
    assert "over 2 seeds: gaps" in capsys.readouterr().out
    assert main(["reproduce", "dissipation", "--seeds", "0", "1", "--out",
                 str(tmp_path / "x")]) == 2
    assert main(["reproduce", "deep-plain", "--seeds", "1", "1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "seeds: 'dissipation' has no multi-seed summary" in err and "distinct" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "deep-plain", "--seed", "3", "--seeds", "0"])
    assert e.value.code == 2
