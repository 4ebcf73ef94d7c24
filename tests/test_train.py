import json
import math
import pickle

import pytest
import torch
import yaml

import pnnh
from pnnh.checkpoint import load_checkpoint, load_model
from pnnh.config import TrainConfig
from pnnh.errors import CheckpointError, TrainingDiverged
from pnnh.io import read_jsonl
from pnnh.train import lr_factor

TIME_FIELDS = ("images_per_s", "time_s")


def _small(out, **kw):
    base = dict(model="resnet_mlp", dataset="mnist1d", depth=4, width=32, epochs=3,
                batch_size=128, lr=3e-3, out=str(out), progress=False)
    base.update(kw)
    return base


def test_one_epoch_on_mnist1d_beats_chance_and_writes_the_run_files(tmp_path):
    summary = pnnh.train(_small(tmp_path / "r", depth=8, width=128, epochs=1))
    assert summary["final_val_acc"] > 0.25  # chance is 0.10
    out = tmp_path / "r"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "resnet_mlp" and cfg["depth"] == 8
    (line,) = read_jsonl(out / "metrics.jsonl")
    for field in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s",
                  "time_s"):
        assert field in line
    assert line["images_per_s"] > 0
    s = json.loads((out / "summary.json").read_text())
    assert s["params"] == pnnh.count_parameters(pnnh.create_model("resnet_mlp", depth=8, width=128))
    assert s["best_val_acc"] == s["final_val_acc"] == line["val_acc"]
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(out / "checkpoints" / name)["epoch"] == 1
    model, ckpt = load_model(out / "checkpoints" / "best.pt")
    x = torch.randn(3, 1, 40)
    assert model(x).shape == (3, 10)


class _Interrupt:
    """Simulates a crash at the first step of a given epoch."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_step(self, epoch, **_):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in records]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    full = _small(tmp_path / "full")
    pnnh.train(full)
    part = _small(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        pnnh.train(part, callbacks=[_Interrupt(epoch=3)])
    assert [r["epoch"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl")] == [1, 2]
    summary = pnnh.train({**part, "resume": True})
    assert summary["resumed_from_epoch"] == 2
    a = _strip(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    b = _strip(read_jsonl(tmp_path / "part" / "metrics.jsonl"))
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert a == b  # bit-identical on CPU
    wa = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _PoisonWeights:
    def __init__(self, step):
        self.step = step

    def on_step(self, step, model, **_):
        if step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_checkpoint(tmp_path):
    cfg = _small(tmp_path / "nan", epochs=3)
    steps_per_epoch = math.ceil(8000 / 128)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2.*last good checkpoint"):
        pnnh.train(cfg, callbacks=[_PoisonWeights(steps_per_epoch + 3)])
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    s = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert s["status"] == "diverged" and s["diverged_epoch"] == 2


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"format": "pnnh-checkpoint", "model": Evil()}, path, pickle_protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_foreign_checkpoints(tmp_path):
    pnnh.train(_small(tmp_path / "r", epochs=1))
    good = (tmp_path / "r" / "checkpoints" / "last.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a pnnh checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_lr_schedule_warmup_cosine_step():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, schedule="cosine")
    f = [lr_factor(cfg, s, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)
    assert f[20] == pytest.approx(1.0) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[20:], f[21:]))
    step = TrainConfig(epochs=10, schedule="step", step_size=3, gamma=0.5)
    assert [lr_factor(step, e * 10, 10) for e in (0, 2, 3, 6, 9)] == [1, 1, 0.5, 0.25, 0.125]
    assert lr_factor(TrainConfig(schedule="constant"), 50, 10) == 1.0


def test_sgd_step_schedule_label_smoothing_and_digits(tmp_path):
    s = pnnh.train(_small(tmp_path / "d", dataset="digits", model="plain_mlp", optimizer="sgd",
                          lr=0.05, schedule="step", step_size=1, label_smoothing=0.1,
                          weight_decay=1e-4, epochs=2))
    assert s["final_val_acc"] > 0.5
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "d" / "metrics.jsonl")]
    assert lrs == pytest.approx([0.005, 0.0005])


def test_augmentation_on_image_data(tmp_path):
    s = pnnh.train(_small(tmp_path / "s", dataset="synthetic", num_samples=200, epochs=1,
                          augment=True, model="plain_mlp",
                          dataset_args={"input_shape": [3, 8, 8], "num_classes": 4}))
    assert s["status"] == "finished"
    from pnnh.errors import ConfigError

    with pytest.raises(ConfigError, match="augment"):
        pnnh.train(_small(tmp_path / "s2", augment=True, epochs=1))
    with pytest.raises(ConfigError, match="dataset_args"):
        pnnh.train(_small(tmp_path / "s3", dataset_args={"colour": 1}, epochs=1))


def test_num_workers_load_imagefolder_batches_in_worker_processes(tmp_path, monkeypatch):
    """Item-by-item datasets go through a DataLoader with ``num_workers`` processes; the
    batches (and so the whole run) are the same as those read in the main process."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 4)):
        for c in ("a", "b", "c"):
            d = tmp_path / "img" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    made, real = [], torch.utils.data.DataLoader

    def loader(*args, **kwargs):
        made.append(kwargs.get("num_workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", loader)
    runs = {}
    for workers in (0, 2):
        runs[workers] = pnnh.train(dict(
            model="plain_mlp", depth=4, width=16, dataset="imagefolder",
            data_dir=str(tmp_path / "img"), dataset_args={"image_size": 8}, epochs=2,
            batch_size=8, num_workers=workers, out=str(tmp_path / f"w{workers}"), progress=False))
    a, b = (_strip(read_jsonl(tmp_path / f"w{w}" / "metrics.jsonl")) for w in (0, 2))
    assert len(a) == 2 and a == b
    assert made == [2, 2]  # one loader an epoch, only when workers were asked for


def test_an_error_in_a_loader_worker_is_one_line():
    from pnnh.errors import DataError
    from pnnh.train import _one_line_errors

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise DataError(f"cannot read image /data/{i}.png: truncated")

    loader = torch.utils.data.DataLoader(Broken(), batch_sampler=[[0, 1]], num_workers=1)
    with pytest.raises(DataError) as e:
        list(_one_line_errors(loader))
    assert str(e.value) == "cannot read image /data/0.png: truncated"


def test_lr_multipliers_scale_a_submodules_step(tmp_path):
    """``lr_multipliers`` puts a top-level submodule's parameters at ``lr * factor``: one SGD
    step without momentum moves them by exactly ``factor`` times the gradient step."""
    from pnnh.config import resolve as make_config
    from pnnh.errors import ConfigError
    from pnnh.models import create_model
    from pnnh.train import build_optimizer

    cfg = make_config(_small(tmp_path, optimizer="sgd", momentum=0.0, lr=0.5,
                             lr_multipliers={"blocks": 0.1}))
    model = create_model("resnet_mlp", depth=4, width=8)
    opt = build_optimizer(cfg, model)
    assert opt.param_groups[0]["lr"] == 0.5  # the base lr first (it is the one logged)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(16, 1, 40)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        lr = 0.05 if n.startswith("blocks.") else 0.5
        torch.testing.assert_close(p.detach(), before[n] - lr * grads[n], rtol=0, atol=1e-7)
    with pytest.raises(ConfigError, match="lr_multipliers: resnet_mlp has no submodule 'body'"):
        build_optimizer(make_config(_small(tmp_path, lr_multipliers={"body": 0.1})), model)
    with pytest.raises(ConfigError, match="lr_multipliers: blocks: must be a positive number"):
        make_config(_small(tmp_path, lr_multipliers={"blocks": 0}))


def test_lr_multiplier_patterns_most_specific_wins(tmp_path):
    """``blocks.*.enc`` (a dotted pattern) overrides ``blocks`` for the encoders only."""
    from pnnh.config import resolve as make_config
    from pnnh.errors import ConfigError
    from pnnh.models import create_model
    from pnnh.train import build_optimizer, module_lr_factor

    mult = {"blocks": 0.01, "blocks.*.enc": 0.03}
    assert module_lr_factor("blocks.3.enc.weight", mult) == 0.03
    assert module_lr_factor("blocks.3.dec.weight", mult) == 0.01
    assert module_lr_factor("blocks.3.bias", mult) == 0.01 and module_lr_factor("head.weight", mult) == 1.0
    model = create_model("pnnh_mlp", depth=6, width=8)
    opt = build_optimizer(make_config(_small(tmp_path, lr=1.0, lr_multipliers=mult)), model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        want = 0.03 if ".enc." in n else 0.01 if n.startswith("blocks.") else 1.0
        assert lr_of[id(p)] == pytest.approx(want), n
    with pytest.raises(ConfigError, match="no submodule 'blocks.\\*.coder2'"):
        build_optimizer(make_config(_small(tmp_path, lr_multipliers={"blocks.*.coder2": 2})),
                        model)


def test_channels_last_is_the_default_for_2d_conv_nets_only():
    """``channels_last`` unset: on for a model with a 2-D convolution wider than 1x1 (the
    memory format that pays on this CPU, benchmarks/channels_last.py), off for an MLP or a
    1-D CNN; an explicit setting wins."""
    from pnnh import create_model
    from pnnh.train import use_channels_last

    cnn = create_model("resnet20", in_shape=(1, 28, 28), width=4)
    assert use_channels_last(None, cnn) is True
    assert use_channels_last(False, cnn) is False
    assert use_channels_last(None, create_model("pnnh_mlp", depth=4, width=8)) is False
    assert use_channels_last(None, create_model("plain_cnn1d", depth=4, width=4)) is False
    assert use_channels_last(True, create_model("pnnh_mlp", depth=4, width=8)) is True
