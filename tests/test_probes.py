"""The probe contract (``pnnh.probes``): every registered probe has one shape, one runner writes
its records, and the pieces the probes share exist once."""

import argparse
import json
import types
from pathlib import Path

import pytest
import torch

from pnnh import probes
from pnnh.cli import PROBES as CLI_PROBES
from pnnh.cli import build_parser
from pnnh.errors import ConfigError
from pnnh.probes.common import ProbeResult, first_tensor, unwrap

SMALL = ["--model", "plain_mlp", "--depth", "4", "--width", "8", "--num-samples", "16"]
EXTRA = {"hessian": ["--dense", "always", "--slq-runs", "1", "--slq-steps", "5",
                     "--hutchinson-samples", "4", "--max-iter", "20"],
         "skips": ["--model", "resnet_mlp"]}  # a plain MLP has no skip to record


def _args(name: str, out: Path) -> argparse.Namespace:
    argv = ["probe", name, *SMALL, *EXTRA.get(name, []), "--out", str(out)]
    args = build_parser(argv).parse_args(argv)
    args.model_args = {}  # what `pnnh probe` parses from --model-arg
    return args


@pytest.mark.parametrize("name", sorted(probes.PROBES))
def test_every_probe_declares_the_contract(name):
    mod = probes.probe(name)
    assert mod.NAME == name
    assert mod.DESCRIPTION == CLI_PROBES[name]  # `pnnh probe --help` says what the module says
    assert callable(mod.add_cli_arguments) and callable(mod.run)


def test_the_command_line_offers_exactly_the_registered_probes():
    assert set(CLI_PROBES) == set(probes.PROBES)
    assert [line.split()[0] for line in probes.describe().splitlines()] == sorted(probes.PROBES)


def test_an_unknown_probe_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(ConfigError, match="unknown probe 'curvature'; known: dissipation, "
                                          "hessian, jacobian, norms, skips"):
        probes.probe("curvature")


@pytest.mark.parametrize("name", sorted(probes.PROBES))
def test_the_runner_writes_the_records_the_probe_returns(name, tmp_path, capsys):
    out = tmp_path / name
    result = probes.run_cli(name, _args(name, out))
    assert isinstance(result, ProbeResult) and result.records
    written = json.loads((out / f"{name}.json").read_text())
    assert len(written) == len(result.records)
    assert written[0].keys() == result.records[0].keys()
    header = (out / f"{name}.csv").read_text().splitlines()[0].split(",")
    assert header == (result.columns or list(result.records[0]))
    for f in result.files:
        assert Path(f).is_file() and Path(f).parent == out
    printed = capsys.readouterr().out.splitlines()
    assert printed[-len(result.notes):] == result.notes


def test_run_that_breaks_the_contract_is_named(monkeypatch, tmp_path):
    fake = types.ModuleType("pnnh.probes.fake")
    fake.NAME, fake.DESCRIPTION = "fake", "returns a list"
    fake.run = lambda targets, args, out: [{"a": 1}]
    monkeypatch.setitem(probes.PROBES, "fake", "pnnh.probes.fake")
    monkeypatch.setitem(__import__("sys").modules, "pnnh.probes.fake", fake)
    with pytest.raises(TypeError, match="probe fake: run\\(\\) returned list, not a ProbeResult"):
        probes.run_cli("fake", _args("norms", tmp_path))
    assert not (tmp_path / "fake.json").exists()


def test_first_tensor_is_the_one_helper_of_every_probe():
    t = torch.ones(2)
    assert first_tensor(t) is t
    assert first_tensor((None, t, torch.zeros(1))) is t
    assert first_tensor([]) is None and first_tensor({"x": t}) is None
    src = Path(probes.__file__).parent
    assert [p.name for p in src.glob("*.py") if "def _first_tensor" in p.read_text()] == []


def test_unwrap_sees_through_torch_compile_wrappers():
    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.Module()
    wrapper._orig_mod = inner
    assert unwrap(wrapper) is inner and unwrap(inner) is inner
