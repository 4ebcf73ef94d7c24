"""`pnnh reproduce image-depth` end to end at its quick scale, on Fashion-MNIST files written
here in the real format: every run trains, is probed (paper 2's gradient-norm ratios, paper 1's
dissipation at init and after training) and lands in the tables; and the default PNNH CNN,
drawn under the ResNet's seed, trains as the ResNet does, step for step."""

import json

import pytest
from _helpers import write_idx_set

from pnnh.reproduce import image_depth


@pytest.fixture
def fashion_files(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.setenv("PNNH_DATA_DIR", str(tmp_path / "data"))
    return tmp_path


def test_quick_study_trains_probes_and_tables_every_run(fashion_files, capsys):
    out = fashion_files / "study"
    result = image_depth.run(out, "quick")
    rows = json.loads((out / "results_curves.json").read_text())
    assert [r["variant"] for r in rows] == ["plain", "resnet", "pnnh", "pnnh_zero_init_decoder"]
    for r in rows:
        for key in ("norm_log_init", "norm_log_trained", "input_r2_init", "input_r2_trained",
                    "cosine_init", "cosine_trained"):
            assert r[key] == r[key], (r["variant"], key)  # measured (not NaN)
        assert -0.5 < r["input_r2_init"] <= 1 and 0 <= r["cosine_trained"] <= 1
    by = {r["variant"]: r for r in rows}
    # The default PNNH-20 holds resnet20's weights under the same seed and runs the same
    # operations on them (x + branch, then ReLU; the 1x1 stride-2 S and its BatchNorm), so its
    # curve is the ResNet's: equal where the kernels are the same (measured: bit for bit), and
    # within float32 rounding (~1e-7 relative per operation, a few steps) where a kernel could
    # associate a sum differently; the zero-init variant, another start, is far away
    for key in ("train_loss_curve", "train_error_curve"):
        assert by["pnnh"][key] == pytest.approx(by["resnet"][key], rel=1e-4, abs=1e-6)
    assert by["pnnh"]["test_acc"] == pytest.approx(by["resnet"]["test_acc"], abs=0.011)
    assert by["pnnh"]["params"] == by["resnet"]["params"]
    assert by["pnnh_zero_init_decoder"]["train_loss_curve"] != pytest.approx(
        by["resnet"]["train_loss_curve"], rel=1e-2)
    printed = capsys.readouterr().out
    assert "input R² at the last block" in printed and result["dissipation_table"] in printed
    assert (out / "curves.png").stat().st_size > 10_000


def test_quick_vit_study_trains_and_probes_the_three_transformers(fashion_files):
    from pnnh.reproduce import image_vit

    out = fashion_files / "vit"
    result = image_vit.run(out, "quick")
    rows = json.loads((out / "results_curves.json").read_text())
    assert [r["variant"] for r in rows] == ["vit", "pnnh_vit", "plain_vit"]
    for r in rows:
        assert r["depth"] == 4 and len(r["train_loss_curve"]) == 2
        assert r["input_r2_trained"] == r["input_r2_trained"]  # measured (not NaN)
    by = {r["variant"]: r for r in rows}
    assert by["pnnh_vit"]["params"] == by["vit"]["params"]  # PNNH-ViT's default: A = I, fixed
    assert "| pnnh_vit | 4 |" in result["table"]
