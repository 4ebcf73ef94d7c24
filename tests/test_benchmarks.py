"""Smoke tests of the peer benchmarks' --quick modes: each runs and writes JSON of the right
shape (the numbers themselves are for docs/BENCHMARKS.md, not asserted: no timed tests)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _main_keeping_threads(name: str, argv: list[str]) -> dict:
    """``benchmarks/<name>.py``'s ``main(argv)``; the torch thread count it sets is put back."""
    threads = torch.get_num_threads()
    try:
        return _load(name).main(argv)
    finally:
        torch.set_num_threads(threads)


def _check_common(path: Path, name: str) -> dict:
    data = json.loads(path.read_text())
    assert data["benchmark"] == name and data["config"]["quick"] is True
    m = data["machine"]
    assert m["nproc"] >= 1 and m["torch"] and m["torch_threads"] == 2
    assert len(m["loadavg_1_5_15"]) == 3 and len(m["loadavg_before"]) == 3
    return data


def test_throughput_quick(tmp_path):
    _load("throughput").main(["--quick", "--out", str(tmp_path)])
    data = _check_common(tmp_path / "throughput_quick.json", "throughput")
    got = {(r["mode"], r["model"]) for r in data["results"]}
    assert got == {("train", "resnet"), ("train", "plain"), ("train", "pnnh"),
                   ("infer", "resnet"), ("infer", "plain"), ("infer", "pnnh"),
                   ("infer", "plain (exported)"), ("infer", "pnnh (exported)")}
    for r in data["results"]:
        assert r["images_per_s"] > 0 and r["params"] > 0
        assert len(r["seconds"]) == data["config"]["repeats"]
        if r["model"] == "resnet":
            assert r["speed_vs_resnet"] == 1.0


def test_machine_ceiling_quick(tmp_path):
    _load("machine_ceiling").main(["--quick", "--out", str(tmp_path)])
    data = _check_common(tmp_path / "machine_ceiling_quick.json", "machine_ceiling")
    rows = {r["what"]: r for r in data["results"]}
    assert rows["gemm"]["flops_per_call"] == 2 * 256 ** 3 and rows["gemm"]["share_of_gemm"] == 1.0
    assert data["gemm_flops_per_s"] > 0
    pnnh = next(r for k, r in rows.items() if k.startswith("pnnh_mlp"))
    resnet = next(r for k, r in rows.items() if k.startswith("resnet_mlp"))
    # forward + backward of the same shapes: the default fixed coder costs no arithmetic
    # (AᵀA x = x is not computed), so PNNH counts exactly the ResNet's matmuls
    assert pnnh["flops_per_call"] == resnet["flops_per_call"] > 0
    assert all(0 < r["share_of_gemm"] and math.isfinite(r["flops_per_s"]) for r in rows.values())


def test_param_efficiency_quick(tmp_path):
    _load("param_efficiency").main(["--quick", "--out", str(tmp_path)])
    data = _check_common(tmp_path / "param_efficiency_quick.json", "param_efficiency")
    rows = data["results"]
    cells = [(r["family"], r["kind"], r["scale"]) for r in rows]
    assert cells == [(f, k, s) for f in ("mlp", "cnn1d") for s in (0.5, 1.0)
                     for k in ("resnet", "pnnh")]
    for r in rows:
        assert 0 <= r["mean"] <= 100 and len(r["val_acc"]) == data["config"]["seeds"]
        knob = "branch_width" if r["kind"] == "resnet" else "learner_width"
        assert r["model_args"][knob] == r["knob"] == round(r["scale"] * r["width"])
        assert r["model"] == f"{r['kind']}_{r['family']}"
        if r["kind"] == "pnnh":  # a trained coder adds its n x n matrix per block, or nothing
            assert r["params_coder_trained"] >= r["params"]
    for fam in ("mlp", "cnn1d"):  # each family's own knob changes its parameter count
        for kind in ("resnet", "pnnh"):
            p = [r["params"] for r in rows if (r["family"], r["kind"]) == (fam, kind)]
            assert p[0] < p[1]
    tol = data["config"]["tolerance"]

    def fewest(fam, kind, acc):
        ok = [q["params"] for q in rows if (q["family"], q["kind"]) == (fam, kind)
              and q["mean"] >= acc]
        return min(ok) if ok else None

    for r in rows:  # per PNNH point: P_resnet(a - tol) / P_pnnh(a - tol), a = its mean
        if r["kind"] != "pnnh":
            continue
        res, pn = fewest(r["family"], "resnet", r["mean"] - tol), fewest(r["family"], "pnnh",
                                                                        r["mean"] - tol)
        assert pn is not None and pn <= r["params"]
        assert r["param_ratio"] == (None if res is None else pytest.approx(res / pn))
    assert "| mlp-6 | 0.5x = 8 |" in data["table"]
    assert (tmp_path / "param_efficiency_quick.png").stat().st_size > 0


def test_tat_peer_quick(tmp_path):
    _load("tat_peer").main(["--quick", "--out", str(tmp_path)])
    data = _check_common(tmp_path / "tat_peer_quick.json", "tat_peer")
    rows = {r["model"]: r for r in data["results"]}
    assert set(rows) == {"plain + TAT", "pnnh", "resnet", "plain"}
    assert rows["plain + TAT"]["model_args"] == {"tat": True, "tat_eta": 0.7}  # depth 8: shallow
    assert rows["plain + TAT"]["params"] == rows["plain"]["params"]
    assert all(r["images_per_s"] > 0 and 0 <= r["mean"] <= 100 for r in rows.values())


def test_parity_quick(tmp_path):
    data = _load("parity").main(["--quick", "--out", str(tmp_path)])
    assert data == json.loads((tmp_path / "parity_quick.json").read_text())
    _check_common(tmp_path / "parity_quick.json", "parity")
    got = {(r["config"], r["mode"], r["model"]) for r in data["results"]}
    assert got == {("cifar20", "train", "resnet"), ("cifar20", "train", "pnnh"),
                   ("mlp8", "train", "resnet"), ("mlp8", "train", "pnnh"),
                   ("cifar20", "infer", "resnet"), ("cifar20", "infer", "pnnh"),
                   ("cifar20", "infer", "pnnh export (lean)"),
                   ("cifar20", "infer", "pnnh export (full)")}
    rows = {(r["config"], r["mode"], r["model"]): r for r in data["results"]}
    for r in data["results"]:
        assert r["images_per_s"] > 0 and len(r["seconds"]) == data["config"]["repeats"]
    # parameters are exact counts: default PNNH <= the ResNet; the lean export < the full one
    assert rows[("mlp8", "train", "pnnh")]["param_ratio"] == 1.0
    assert rows[("cifar20", "train", "pnnh")]["param_ratio"] <= 1.0
    assert (rows[("cifar20", "infer", "pnnh export (lean)")]["params"]
            < rows[("cifar20", "infer", "pnnh export (full)")]["params"])
    assert rows[("cifar20", "train", "resnet")]["speed_vs_resnet"] == 1.0


def test_profile_step_quick():
    out = _load("profile_step").main(["--model", "quick", "--steps", "1", "--warmup", "0",
                                      "--top", "5"])
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 5 and "**all operators**" in out


def test_hessian_vs_pyhessian_quick(tmp_path):
    pytest.importorskip("pyhessian")
    data = _load("hessian_vs_pyhessian").main(["--quick", "--threads", "2", "--out",
                                               str(tmp_path)])
    saved = _check_common(tmp_path / "hessian_vs_pyhessian_quick.json", "hessian_vs_pyhessian")
    assert saved["extremes"]["reference"]["iterations"] >= 2
    for q in (data["small"]["trace"], data["small"]["density"], data["extremes"]["lambda_max"],
              data["extremes"]["lambda_min"]):
        assert {r["tool"] for r in q["rows"]} == {"pyhessian", "pnnh"}
        assert all(math.isfinite(r["error"]) and r["best"] > 0 for r in q["rows"])
        assert len(q["equal_error"]) == sum(r["tool"] == "pyhessian" for r in q["rows"])
    trace_settings = {r["setting"] for r in data["small"]["trace"]["rows"] if r["tool"] == "pnnh"}
    assert {"hutchinson 8", "xtrace 16", "hutch++ 12"} <= trace_settings
    assert (tmp_path / "hessian_quick.png").stat().st_size > 1000


def test_hessian_memory_quick(tmp_path):
    data = _load("hessian_memory").main(["--quick", "--out", str(tmp_path)])
    saved = _check_common(tmp_path / "hessian_memory_tiny_cnn_quick.json",
                          "hessian_memory_tiny_cnn")
    assert [r["stage"] for r in saved["rows"]] == ["setup", "gradient", "hvp", "lanczos",
                                                   "trace", "slq"]
    assert all(r["peak_rss_mb"] > 0 for r in data["rows"])


def test_hessian_ddp_quick(tmp_path):
    pytest.importorskip("torch.distributed")
    data = _load("hessian_ddp").main(["--quick", "--out", str(tmp_path)])
    saved = _check_common(tmp_path / "hessian_ddp_quick.json", "hessian_ddp")
    # 1 rank, 2 ranks, then the largest shard alone on 1 rank; the all-reduce timed apart
    assert [(r["ranks"], r["samples_per_rank"]) for r in saved["rows"]] == [(1, 8), (2, 4), (1, 4)]
    assert all(r["seconds_per_hvp"] > 0 for r in data["rows"])
    assert [r["seconds_per_all_reduce"] is not None for r in saved["rows"]] == [False, True, False]


def test_gpu_check_script_runs_its_steps_on_cpu(tmp_path):
    # the GPU script is run rarely and for minutes: its steps, limits and packing are checked
    # here at smoke size on the CPU, so a lent GPU's time is not spent on the script's bugs
    import subprocess
    import sys
    import tarfile

    steps = "machine cuda_tests hessian parity train_fp32 train_amp torchrun torchrun_resume probe"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DEVICE": "cpu", "QUICK": "1",
           "PY": sys.executable, "ONLY": steps, "SKIP_TESTS": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "300"], env=env,
                       cwd=BENCH.parent, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == steps.split()
    assert all(" rc=0 " in line for line in summary), summary
    with tarfile.open(out / "results.tgz") as tar:
        names = set(tar.getnames())
    assert {"./hessian/hessian_vs_pyhessian_quick.json", "./parity/parity_cuda_quick.json",
            "./torchrun_resume.log", "./runs/probe/hessian.json"} <= names
    assert not any(n.endswith(".pt") for n in names)
    assert "resuming from" in r.stdout


def test_plain_cost_quick(tmp_path):
    data = _load("plain_cost").main(["--quick", "--out", str(tmp_path)])
    _check_common(tmp_path / "plain_cost_quick.json", "plain_cost")
    (row,) = data["rows"]
    assert row["max_abs_diff"] <= 1e-4
    assert row["plain"]["params"] > row["plain"]["nonzero_params"]
    assert row["plain"]["macs"] > row["original"]["macs"]
    assert {"torch/original", "torch/plain"} <= set(row["times_s"]["1"])


@pytest.mark.ecosystem
def test_hessian_real_quick(tmp_path):
    """The real-model curvature benchmark end to end on the tiny CNN: every contender runs in
    its own process, cold then warm, profiled; ratios at equal error; the trace table."""
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    threads = torch.get_num_threads()
    try:
        _load("hessian_real").main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "hessian_real_quick.json").read_text())
    lam = data["lambda_max"]["tiny_cnn"]
    assert {r["tool"] for r in lam["rows"]} == {"pyhessian", "pnnh", "curvlinops"}
    for r in lam["rows"]:
        for when in ("cold", "warm"):
            run = r[when]
            assert run["hvps"] == len(run["per_hvp"]) > 0 and 0 <= run["setup"] < run["seconds"]
            assert run["error"] == pytest.approx(
                abs(run["value"] - lam["reference"]["lambda_max"]) / lam["reference"]["lambda_max"])
    assert all(q["ratio"] is None or q["ratio"] > 0 for q in lam["equal_error"]["pyhessian cold"])
    trace = data["trace"]["tiny_cnn"]
    assert {r["ran"] for r in trace["rows"] if r["tool"] == "pnnh"} <= {"hutchinson", "hutch++",
                                                                         "xtrace"}
    assert all(len(r["values"]) == 2 for r in trace["rows"])  # --quick: 2 seeds


def test_hessian_ceiling_quick(tmp_path):
    """The ceilings under hessian_real's ratios, on the tiny CNN: bare autograd setup and HVP
    per fresh process; the zero-overhead ratio is the HVP-count arithmetic of the equal-error
    rows; the deflated trace agrees with plain Hutchinson on the same samples."""
    real = tmp_path / "hessian_real_quick.json"
    real.write_text(json.dumps({"lambda_max": {"tiny_cnn": {
        "reference": {"lambda_max": 1.0},
        "rows": [{"tool": "pyhessian", "setting": "tol 0.01", "cold": {"hvps": 20},
                  "warm": {"hvps": 20}},
                 {"tool": "pnnh", "setting": "tol 0.01", "cold": {"hvps": 5}, "warm": {"hvps": 5}}],
        "equal_error": {f"pyhessian {w}": [{"setting": "tol 0.01", "seconds": 1.0, "error": 1e9,
                                             "pnnh": "tol 0.01", "pnnh_seconds": 0.5,
                                             "ratio": 2.0}] for w in ("cold", "warm")}}}}))
    data = _main_keeping_threads("hessian_ceiling",
                                 ["--quick", "--real", str(real), "--out", str(tmp_path)])
    assert json.loads((tmp_path / "hessian_ceiling_quick.json").read_text())["trace"]
    lam = data["lambda_max"]["tiny_cnn"]
    for when in ("cold", "warm"):
        b = lam["bare"][when]
        assert b["setup"] > 0 and b["hvp"] > 0 and len(b["per_hvp"]) == 2
        (row,) = [r for r in lam["rows"] if r["when"] == when]
        s, h = b["setup"], b["hvp"]
        assert row["bare_both"] == pytest.approx((s + 20 * h) / (s + 5 * h))
        assert row["bare_pnnh"] == pytest.approx(1.0 / (s + 5 * h))
        assert row["lanczos_hvps"] == 1  # the first HVP whose error is within PyHessian's 1e9
        assert row["ideal_both"] == pytest.approx((s + 20 * h) / (s + h))
    errors = lam["lanczos_errors"]  # one per HVP up to PyHessian's 20, against the reference
    assert len(errors) == 20 and all(e >= 0 for e in errors)
    tr = data["trace"]["tiny_cnn"]
    assert tr["rho"] > 0 and tr["max_speedup"] == pytest.approx(1 / tr["rho"])
    spread = 4 * ((tr["sd_plain"] ** 2 + tr["sd_deflated"] ** 2) / tr["samples"]) ** 0.5
    assert abs(tr["trace_deflated"] - tr["trace_plain"]) <= spread
    assert tr["speedup_at"]["10"] == pytest.approx(10 / (4 + 10 * tr["rho"]))


def test_hessian_overhead_quick(tmp_path):
    """The overhead check end to end on the tiny CNN: a cold λmax call per bound in a fresh
    process against bare autograd's setup and HVP from other fresh processes; the ratio is
    T / (S + k·h) of the numbers it records."""
    data = _main_keeping_threads("hessian_overhead", ["--quick", "--out", str(tmp_path)])
    model = data["models"]["tiny_cnn"]
    rows = model["rows"]
    assert [(r["allocator"], r["reorth"], r["bound"]) for r in rows] == [
        (a, o, b) for a in ("default", "cli") for o in ("partial", "full")
        for b in ("residual", "gap")]
    for r in rows:
        assert r["hvps"] > 0 and r["converged"] and r["seconds"] >= r["hvp_seconds"] > 0
        assert r["reorthogonalisation"].split(":")[0] == r["reorth"]
        assert r["ratio"] == pytest.approx(r["seconds"] / (r["bare_setup"]
                                                           + r["hvps"] * r["bare_hvp"]))
        same = model["bare"][r["allocator"]]["best"]  # the ratio against bare autograd under
        assert r["ratio_same_allocator"] == pytest.approx(  # the same allocator setting
            r["seconds"] / (same["setup"] + r["hvps"] * same["hvp"]))
    assert model["bare"]["default"]["best"]["setup"] == rows[0]["bare_setup"]
    assert (tmp_path / "hessian_overhead_quick.json").is_file()


def test_hessian_overhead_profile_quick(tmp_path):
    """``--profile``: one cProfile'd call per allocator, split into the parts of a Lanczos step
    and the HVPs; the parts are inside the call, and the HVPs' backward passes inside them."""
    data = _main_keeping_threads("hessian_overhead",
                                 ["--quick", "--profile", "--out", str(tmp_path)])
    assert set(data["calls"]) == {"tiny_cnn default", "tiny_cnn cli"}
    for call in data["calls"].values():
        parts = call["profile"]
        hvps = parts["HVPs, each with its copy into its Lanczos row"]
        assert hvps["calls"] == call["hvps"] > 0
        assert 0 < hvps["seconds"] <= call["seconds"]
        dots = parts["float64 dots, all (alpha, Gram-Schmidt coefficients, norms)"]
        passes = parts["Gram-Schmidt passes over the kept rows (their dots, and w -= Q^T c)"]
        assert dots["calls"] > passes["calls"]  # partial: a pass at some steps, not all
        assert passes["calls"] <= call["hvps"]
        measured = parts["the residuals measured at the stop (partial: one sweep over the basis)"]
        assert measured["calls"] >= 1
        for v in parts.values():
            assert 0 <= v["seconds"] <= call["seconds"]
    assert (tmp_path / "hessian_overhead_profile_quick.json").is_file()


def test_lanczos_dots_quick(tmp_path):
    """pnnh's dots within ``n·2⁻⁵³·Σ|a_i b_i|`` of the exact ones (exact products, float64
    sums); the two float32-rounded ways printed beside it are not held to that."""
    data = _load("lanczos_dots").main(["--quick", "--out", str(tmp_path)])
    rows = {r["way"]: r for r in data["rows"]}
    assert set(rows) == {"pnnh", "sgemv", "mul to float64"}
    assert rows["pnnh"]["error"] <= 2**16 * 2.0**-53
    assert all(r["seconds"] > 0 for r in rows.values())
    assert (tmp_path / "lanczos_dots_quick.json").is_file()


def test_hvp_copy_quick(tmp_path):
    """Both copies of one HVP's products timed on the tiny CNN (the benchmark itself checks
    they give the same bits); the layouts counted add up."""
    data = _main_keeping_threads("hvp_copy", ["--quick", "--out", str(tmp_path)])
    m = data["models"]["tiny_cnn"]
    assert set(m["seconds"]) == {"copy_", "copy_product"}
    assert all(t > 0 for t in m["seconds"].values())
    assert 0 <= m["transposed_matrix"] <= m["other_layout"] <= m["entries"]
    assert (tmp_path / "hvp_copy_quick.json").is_file()


def test_fresh_memory_quick(tmp_path):
    """Every row timed on its first touch and again; the summary is of those times."""
    data = _load("fresh_memory").main(["--quick", "--out", str(tmp_path)])
    assert len(data["first_touch_ms"]) == len(data["again_ms"]) == 4
    assert all(t > 0 for t in data["first_touch_ms"] + data["again_ms"])
    assert data["row_mb"] == 1.0 and data["again_ms_per_mb"] > 0
    assert (tmp_path / "fresh_memory_quick.json").is_file()


def test_hessian_stopping_quick(tmp_path):
    """The stopping-rule check end to end on the tiny CNN: a float64 reference, then each
    (bound, tol) call scored against it; a declared stop with an error above tol is counted."""
    data = _main_keeping_threads("hessian_stopping", ["--quick", "--out", str(tmp_path)])
    rows = data["models"]["tiny_cnn"]["rows"]
    assert {(r["bound"], r["tol"]) for r in rows} == {(b, t) for b in ("residual", "gap")
                                                     for t in (1e-1, 1e-2)}
    for r in rows:
        assert r["broken"] == (r["converged"] and r["error"] > r["tol"])
        assert r["hvps"] > 0 and r["error_bound"] > 0


def test_channels_last_quick(tmp_path):
    data = _load("channels_last").main(["--quick", "--out", str(tmp_path)])
    assert {r["model"] for r in data["rows"]} == {"plain20", "vit_tiny"}
    for r in data["rows"]:
        assert r["nchw_images_per_s"] > 0 and r["nhwc_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["nhwc_images_per_s"] / r["nchw_images_per_s"])


@pytest.mark.ecosystem
def test_hessian_limit_quick(tmp_path):
    """The one-run table on the tiny CNN: every peer setting gets the fastest pnnh call with no
    larger error, the bare limit of the HVPs that call used, and the ratios computed from the
    numbers the run recorded."""
    pytest.importorskip("pyhessian")
    pytest.importorskip("curvlinops")
    data = _main_keeping_threads("hessian_limit", ["--quick", "--out", str(tmp_path)])
    assert {r["peer"] for r in data["rows"]} == {"pyhessian", "curvlinops"}
    for r in data["rows"]:
        if r["pnnh"] is None:
            continue
        assert r["pnnh_error"] <= r["error"] * 1.01
        limit = r["bare_setup"] + r["pnnh_hvps"] * r["bare_hvp"]
        assert r["bare_limit"] == pytest.approx(limit)
        assert r["overhead"] == pytest.approx(r["pnnh_seconds"] / limit)
        assert r["speedup"] == pytest.approx(r["peer_seconds"] / r["pnnh_seconds"])
        assert r["ceiling"] == pytest.approx(
            (r["bare_setup"] + r["peer_hvps"] * r["bare_hvp"]) / limit)
    assert "| tiny_cnn |" in data["table"]
    assert (tmp_path / "hessian_limit_quick.json").is_file()


def test_param_efficiency_images_quick(tmp_path, monkeypatch):
    """Accuracy against parameters on images, end to end on IDX files written here: each family
    on its own knob (the ResNet's width, PNNH's learner ratio), the parameter counts those knobs
    give, the ratio column from the table's own points, and the figure."""
    from _helpers import write_idx_set

    write_idx_set(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.setenv("PNNH_DATA_DIR", str(tmp_path / "data"))
    data = _main_keeping_threads("param_efficiency_images", ["--quick", "--out", str(tmp_path),
                                                             "--runs", str(tmp_path / "runs")])
    rows = {(r["kind"], r["value"]): r for r in data["results"]}
    assert set(rows) == {("resnet", 8), ("resnet", 16), ("pnnh", 0.5), ("pnnh", 1.0)}
    # PNNH at learner ratio 1 is ResNet-20 at width 16 laid out plain: the same parameters;
    # a narrower learner (or a narrower ResNet) has fewer
    assert rows[("pnnh", 1.0)]["params"] == rows[("resnet", 16)]["params"]
    assert rows[("pnnh", 0.5)]["params"] < rows[("pnnh", 1.0)]["params"]
    assert rows[("resnet", 8)]["params"] < rows[("resnet", 16)]["params"]
    for r in data["results"]:
        assert r["min"] <= r["mean"] <= r["max"] and len(r["test_acc"]) == 1
        if r["kind"] == "pnnh" and r["param_ratio"] is not None:
            match = rows[("resnet", r["resnet_match"])]
            assert match["mean"] >= r["mean"] - 0.5
            assert r["param_ratio"] == pytest.approx(match["params"] / min(
                q["params"] for q in data["results"]
                if q["kind"] == "pnnh" and q["mean"] >= r["mean"] - 0.5))
    assert (tmp_path / "param_efficiency_images_quick.png").stat().st_size > 0
    assert len(list((tmp_path / "runs").iterdir())) == 4
