import csv
import json

from pnnh.cli import main
from pnnh.reproduce import EXPERIMENTS


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    for name in ("plain_mlp", "resnet_mlp", "pnnh_mlp"):
        assert name in printed
        for depth in (4, 12):
            summary = json.loads((out / "train" / f"{name}-{depth}" / "summary.json").read_text())
            assert summary["epochs"] == 1
    for depth in (4, 12):  # PNNH at its defaults has exactly the ResNet's parameters
        params = [json.loads((out / "train" / f"{n}-{depth}" / "summary.json").read_text())["params"]
                  for n in ("plain_mlp", "resnet_mlp", "pnnh_mlp")]
        assert params[0] == params[1] == params[2]
    html = (out / "report.html").read_text()
    for fig in ("dissipation_init.png", "dissipation_trained.png", "norms_ratio.png"):
        assert (out / "probes" / fig).exists()
        assert f"probes/{fig}" in html
    with open(out / "probes" / "dissipation.csv") as f:
        rows = list(csv.DictReader(f))
    stages = {(r["model"], r["stage"]) for r in rows}
    assert ("pnnh_mlp-12", "init") in stages and ("plain_mlp-12", "trained") in stages
    assert {"input_r2", "surviving_fraction", "cosine_collapse", "effective_rank"} <= set(rows[0])
    with open(out / "probes" / "norms.csv") as f:
        assert {"block", "grad_in_norm", "grad_out_norm", "ratio"} <= set(next(csv.DictReader(f)))
    assert (out / "report.md").exists()


def test_reproduce_list_names_every_experiment_with_time(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == len(EXPERIMENTS)
    for name in EXPERIMENTS:
        line = next(ln for ln in lines if ln.startswith(name))
        assert "min (cpu)" in line
