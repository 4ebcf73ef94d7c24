"""The curvature estimators' memory budget: what they hold grows with ``max_memory``, not with
the number of HVPs, and the accuracy of the bounded Lanczos matches the exact Hessian."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pnnh.errors import ConfigError
from pnnh.probes.hessian import HessianOperator, estimate_trace, lanczos
from pnnh.probes.hessian.memory import MAX_MEMORY, parse_memory
from pnnh.probes.hessian.trace import plan_trace


def conv_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(dtype)


def conv_batch(dtype=torch.float64, n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_parse_memory():
    assert parse_memory(None) == MAX_MEMORY == 2**30
    assert parse_memory("2G") == parse_memory("2gb") == 2 * 2**30
    assert parse_memory("500M") == 500 * 2**20
    assert parse_memory("1.5GB") == int(1.5 * 2**30)
    assert parse_memory(4096) == parse_memory("4096") == 4096
    for bad in ("lots", "2 parsecs", "-1G", "0"):
        with pytest.raises(ConfigError, match="max-memory"):
            parse_memory(bad)


def test_cli_rejects_a_bad_max_memory_in_one_line(tmp_path, capsys):
    from pnnh.cli import main

    rc = main(["probe", "hessian", "--model", "shortcut_linear", "--depth", "4", "--width", "6",
               "--input-shape", "6", "--num-samples", "8", "--max-memory", "lots",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "max-memory" in err and "Traceback" not in err


def test_cli_records_the_budget_and_runs_quietly(tmp_path, capsys):
    from pnnh.cli import main

    rc = main(["probe", "hessian", "--model", "shortcut_linear", "--depth", "4", "--width", "6",
               "--input-shape", "6", "--num-samples", "8", "--dense", "never", "--max-iter", "6",
               "--hutchinson-samples", "4", "--slq-runs", "1", "--slq-steps", "4",
               "--max-memory", "64M", "--quiet", "--out", str(tmp_path)])
    assert rc == 0 and capsys.readouterr().err == ""
    (rec,) = json.loads((tmp_path / "hessian.json").read_text())
    assert rec["max_memory"] == 64 * 2**20 and rec["lanczos_vectors"] >= 7


def test_hvp_chunk_grows_with_the_budget_not_with_the_number_of_vectors():
    """The rows of one batched HVP pass are at most ``hvp_chunk()``, which scales with
    ``max_memory``; asking for 4x as many HVPs makes more passes, not bigger ones."""
    x, y = conv_batch()
    ops = {mem: HessianOperator(conv_net(), (x, y), max_memory=mem) for mem in (2**23, 2**25)}
    small, large = ops[2**23].hvp_chunk(), ops[2**25].hvp_chunk()
    assert 1 <= small < large and 3.5 <= large / small <= 4.5
    op = ops[2**23]
    op.batched = True
    seen: list[int] = []
    block = op._hvp_block
    op._hvp_block = lambda b: (seen.append(b.shape[0]), block(b))[1]
    for n in (2 * small, 8 * small):
        seen.clear()
        vs = torch.randn(n, op.dim, dtype=torch.float64)
        out = op.hvp_many(vs)
        assert max(seen) <= small and sum(seen) >= n - 1  # the first row resolves the kind
        ref = torch.stack([op.hvp(v) for v in vs[:3]])
        torch.testing.assert_close(out[:3], ref, rtol=1e-9, atol=1e-11)


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from torch import nn
    from pnnh.probes.hessian import HessianOperator
    stage, count, mem = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    width = 512  # 167k parameters: 0.67 MB a float32 vector, 1.3 MB a float64 one
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 256), nn.Tanh(),
                          nn.Linear(256, 10))
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    op = HessianOperator(model, (x, y), max_memory=mem)
    op.hvp(torch.randn(op.dim))  # the graph, before the baseline

    def status(key):  # kB
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])

    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
        f.write("5")
    before = status("VmRSS")
    if stage == "lanczos":
        r = op.extreme_eigenvalues(tol=0.0, max_iter=count)
        info = {"hvps": r["hvps"], "kept": r["lanczos_vectors"]}
    else:
        r = op.trace(count, method="xtrace")
        info = {"hvps": r["hvps"], "method": r["trace_method"]}
    info["grew_mb"] = (status("VmHWM") - before) / 1024
    print(json.dumps(info))
""")


def _peak_growth(stage: str, count: int, mem: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, stage, str(count), str(mem)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's resettable peak RSS (/proc/self/clear_refs)")
@pytest.mark.parametrize("stage", ["lanczos", "trace"])
def test_peak_memory_grows_with_the_budget_not_with_the_hvp_count(stage):
    """Peak RSS of a fresh process (``VmHWM``, reset before the call) over one estimator
    call on a 167k-parameter MLP: with an 8 MB budget, 4x the HVPs add no more than a few
    MB; a budget that lets Lanczos keep every vector and XTrace its whole sketch costs far
    more."""
    mib = 2**20
    few = _peak_growth(stage, 20, 8 * mib)
    many = _peak_growth(stage, 80, 8 * mib)
    roomy = _peak_growth(stage, 80, 512 * mib)
    assert many["hvps"] >= 4 * few["hvps"] - 8
    # "a few MB": glibc's heap keeps some of what 60 more steps' small temporaries (the
    # tridiagonal eigh, the step's scalars) freed; measured 4-7 MB under one thread with
    # MKL_CBWR=COMPATIBLE, against the 25 MB or more the roomy budget's vectors add (below)
    assert many["grew_mb"] <= 8 + 12 and many["grew_mb"] <= few["grew_mb"] + 8, (few, many)
    assert roomy["grew_mb"] >= many["grew_mb"] + 25, (many, roomy)
    if stage == "trace":
        assert many["method"] == "hutchinson" and roomy["method"] == "xtrace"
    else:
        assert many["kept"] < 20 < roomy["kept"]


def dense_extremes(model, x, y) -> tuple[float, float]:
    lam = torch.linalg.eigvalsh(HessianOperator(model.double(), (x.double(), y)).dense())
    return float(lam[-1]), float(lam[0])


def test_float32_storage_matches_the_exact_hessian_and_float64_storage():
    """A float32 model: Lanczos keeps its vectors in float32 (half of float64's memory) and
    gets the same extremes as with float64 vectors, both within tol of the dense Hessian."""
    x, y = conv_batch(torch.float32)
    op = HessianOperator(conv_net(torch.float32), (x, y))
    assert op.vector_dtype == torch.float32
    r32 = op.extreme_eigenvalues(tol=1e-4, max_iter=100)
    res64 = lanczos(op.hvp, op.dim, 100, tol=1e-4, v0=op.start_vector("mixed", 0),
                    dtype=torch.float64)
    hi, lo = dense_extremes(conv_net(torch.float32), x, y)
    scale = max(abs(hi), abs(lo))
    assert r32["converged"] and r32["reorthogonalisation"].startswith("partial")
    assert abs(r32["lambda_max"] - hi) <= 1e-4 * scale and abs(r32["lambda_min"] - lo) <= 1e-4 * scale
    assert abs(r32["lambda_max"] - float(res64["ritz"][-1])) <= 1e-5 * scale
    assert abs(r32["lambda_min"] - float(res64["ritz"][0])) <= 1e-5 * scale
    # full re-orthogonalisation: the same answer to the same tolerance
    f32 = op.extreme_eigenvalues(tol=1e-4, max_iter=100, reorth="full")
    assert f32["reorthogonalisation"] == "full" and f32["converged"]
    assert abs(f32["lambda_max"] - r32["lambda_max"]) <= 1e-5 * scale


def test_a_bounded_basis_still_finds_the_extremes():
    """With room for 8 vectors (local re-orthogonalisation past them) the extreme Ritz values
    still converge to the dense Hessian's extreme eigenvalues."""
    x, y = conv_batch()
    op = HessianOperator(conv_net(), (x, y), max_memory=12 * 8 * 659)
    full = HessianOperator(conv_net(), (x, y))
    assert op.dim == 659 and op.lanczos_vectors() == 8
    r = op.extreme_eigenvalues(tol=1e-8, max_iter=300)
    hi, lo = dense_extremes(conv_net(), x, y)
    scale = max(abs(hi), abs(lo))
    assert r["lanczos_vectors"] == 8 and r["reorthogonalisation"].startswith("local")
    assert r["converged"]
    assert abs(r["lambda_max"] - hi) <= 1e-6 * scale and abs(r["lambda_min"] - lo) <= 1e-6 * scale
    # full re-orthogonalisation needs fewer steps, not a different answer
    f = full.extreme_eigenvalues(tol=1e-8, max_iter=300, reorth="full")
    assert f["reorthogonalisation"] == "full" and f["iterations"] <= r["iterations"]


def test_trace_falls_back_to_what_fits_and_stays_within_its_error_bound():
    q = torch.linalg.qr(torch.randn(2000, 2000, generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64))[0]
    a = (q * torch.linspace(0.0, 10.0, 2000, dtype=torch.float64) ** 2) @ q.T
    exact = float(torch.trace(a))
    assert plan_trace("xtrace", 2000, 100, 16, None) == ("xtrace", 16, None, None)
    # 8 columns of float64 per xtrace column: 50 columns need 6.4 MB
    assert plan_trace("xtrace", 2000, 100, 16, 8 * 8 * 2000 * 50)[0] == "xtrace"
    method, chunk, k, why = plan_trace("xtrace", 2000, 100, 16, 5 * 8 * 2000 * 20)
    assert (method, k) == ("hutch++", 20) and "xtrace's sketch" in why
    method, chunk, k, why = plan_trace("xtrace", 2000, 100, 16, 4 * 8 * 2000 * 3)
    assert (method, chunk, k) == ("hutchinson", 3, None) and "over max_memory" in why
    for mem in (5 * 8 * 2000 * 20, 4 * 8 * 2000 * 3):
        out = estimate_trace(lambda v: v @ a, 2000, 100, max_memory=mem)
        assert out["trace_method_asked"] == "xtrace" and out["samples"] <= 100
        assert abs(out["trace"] - exact) <= 3 * out["error_bound"]


def test_progress_bars_show_each_stage_with_its_estimate_and_stay_off_when_asked(capsys):
    """``progress=True``: a bar per stage on stderr with the HVPs done and the current estimate
    and error bound; ``progress=False`` (``--quiet``) and the default off a terminal: nothing."""
    pytest.importorskip("tqdm")
    x, y = conv_batch()
    op = HessianOperator(conv_net(), (x, y), progress=True)
    import pnnh.probes.hessian.progress as prog

    seen: list[tuple[str, int]] = []
    postfix: list[str] = []
    real = prog.stage_bar

    def spy(on, desc, total):
        ctx = real(on, desc, total)
        bar = ctx.__enter__()
        bar.delay = 0
        bar.set_postfix_str = lambda text, refresh=True: postfix.append(text)
        seen.append((desc, total))
        class Wrap:
            def __enter__(self):
                return bar
            def __exit__(self, *exc):
                seen.append((desc, bar.n))
                return ctx.__exit__(*exc)
        return Wrap()

    import pnnh.probes.hessian.operator as operator_mod
    old = operator_mod.stage_bar
    operator_mod.stage_bar = spy
    try:
        ext = op.extreme_eigenvalues(tol=1e-6, max_iter=50)
        tr = op.trace(20, method="xtrace")
        op.spectral_density(1, 6)
    finally:
        operator_mod.stage_bar = old
    assert seen[0] == ("Lanczos", 50) and seen[1] == ("Lanczos", ext["hvps"])
    assert seen[2] == ("trace (xtrace)", 20) and seen[3] == ("trace (xtrace)", tr["hvps"])
    assert seen[4] == ("SLQ run 1/1", 6) and seen[5] == ("SLQ run 1/1", 6)
    assert any(t.startswith("λmax ") and "±" in t for t in postfix)
    assert any(t.startswith("trace ") and "±" in t for t in postfix)
    capsys.readouterr()
    quiet = HessianOperator(conv_net(), (x, y), progress=False)
    quiet.extreme_eigenvalues(max_iter=5)
    default = HessianOperator(conv_net(), (x, y))  # stderr is not a terminal under pytest
    default.trace(4)
    assert capsys.readouterr().err == ""
