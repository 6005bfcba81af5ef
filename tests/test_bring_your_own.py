"""Your model (package.module:factory), your optimizer (adam, adamw), your images (imagefolder:PATH), your logger
(TensorBoard) in the CLI, and their bad inputs as one-line errors."""
import sys

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, rows, run_cli

FAST = ("--no-progress", "--util-interval", "5")

FACTORY = '''
from torch import nn

def make(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))

def broken(num_classes, in_channels):
    raise RuntimeError("no such layer")

def not_a_model(num_classes, in_channels):
    return 42
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A module of the user's, importable from the working folder (as from their project)."""
    (tmp_path / "byo_nets.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "byo_nets"
    sys.modules.pop("byo_nets", None)


def _scalar_steps(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


def test_own_model_with_adamw_from_a_yaml_config_writes_tensorboard_events(tmp_path, capsys, user_models):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"model: {user_models}:make\noptimizer: adamw\nlr: 0.003\npolicy: edba\nsubsets: 128\n"
                   "train-samples: 60\nbatch-size: 20\nepochs: 2\nlog: tensorboard\n")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--config", cfg, "--out", run, "--stop-after-steps", "4", *FAST)[0] == 0
    assert run_cli(capsys, "train", "--resume", run)[0] == 0
    steps = [r["step"] for r in rows(run, "step")]
    assert len(rows(run, "epoch")) == 2 and steps == list(range(len(steps)))
    assert _scalar_steps(run, "step/train_loss") == steps  # the resume logged nothing twice
    assert len(_scalar_steps(run, "epoch/test_acc")) == 2
    import json

    c = json.loads((run / "config.json").read_text())["config"]
    assert (c["model"], c["optimizer"], c["policy"]) == (f"{user_models}:make", "adamw", "edba")
    assert c["momentum"] is None  # SGD's option stays unset, so the config.json re-runs:
    again = tmp_path / "again"
    assert run_cli(capsys, "train", "--config", run / "config.json", "--out", again, "--epochs", "1", *FAST)[0] == 0


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_family_trains_and_skips_non_finite_steps(tmp_path, optimizer):
    import torch

    from dynbatch.train.config import TrainConfig
    from dynbatch.train.trainer import Trainer

    t = Trainer.new(TrainConfig(optimizer=optimizer, lr=1e-3, train_samples=40, batch_size=20, epochs=1,
                                on_nonfinite="skip", progress=False, util_interval=5.0), tmp_path / "r",
                    log=lambda m: None)
    clean = t.loss_fn
    t.ctx.loss_fn = lambda z, y: clean(z, y) * (float("nan") if t.step == 0 else 1.0)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.run()
    skipped = [r.get("nonfinite_skipped") for r in rows(t.out, "step")]
    assert skipped == [1, None]
    state = t.optimizer.state_dict()["state"]
    assert all(float(s["step"]) == 1.0 for s in state.values())  # the skipped step did not count
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def _png_tree(root, classes=("cat", "dog", "eel"), per_class=4, size=(12, 9)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for j in range(per_class):
                px = rng.integers(0, 60, (*size[::-1], 3)) + 80 * i
                Image.fromarray(px.astype(np.uint8)).save(d / f"{j}.png")


def test_image_folder_data(tmp_path, capsys):
    _png_tree(tmp_path / "imgs")
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--image-size", "16",
                           "--epochs", "2", "--batch-size", "6", "--out", run, *FAST)
    assert rc == 0, err
    import json

    d = json.loads((run / "config.json").read_text())["data"]
    assert d["num_classes"] == 3 and d["train_samples"] == 12 and d["image_shape"] == [3, 16, 16]
    assert rows(run, "epoch")[-1]["test_acc"] is not None


def _bad_tree(tmp_path, kind):
    root = tmp_path / "imgs"
    if kind == "missing":
        return tmp_path / "nope"
    if kind == "no test":
        (root / "train" / "a").mkdir(parents=True)
        return root
    if kind == "empty":
        (root / "train" / "a").mkdir(parents=True)
        (root / "test" / "a").mkdir(parents=True)
        return root
    if kind == "corrupt":
        _png_tree(root)
        (root / "train" / "cat" / "0.png").write_bytes(b"not a png")
        return root
    if kind == "new class in test":
        _png_tree(root)
        (root / "test" / "fox").mkdir()
        (root / "test" / "cat" / "0.png").rename(root / "test" / "fox" / "0.png")
        return root


@pytest.mark.parametrize("kind, needle", [
    ("missing", "not found"), ("no test", "lacks train/ or test/"), ("empty", "holds no readable images"),
    ("corrupt", "cannot read image"), ("new class in test", "classes the training folder lacks"),
])
def test_bad_image_folders(tmp_path, capsys, kind, needle):
    root = _bad_tree(tmp_path, kind)
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "train", "--data", f"imagefolder:{root}", "--out", out, *FAST)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (("--model", "no_such_module_xyz:make"), "cannot import no_such_module_xyz"),
    (("--model", "byo_nets:missing"), "has no callable 'missing'"),
    (("--model", "byo_nets:broken"), "the factory raised RuntimeError: no such layer"),
    (("--model", "byo_nets:not_a_model"), "returned int, not an nn.Module"),
    (("--optimizer", "adam", "--momentum", "0.5"), "--momentum is an option of --optimizer sgd"),
    (("--optimizer", "lion"), "unknown optimizer 'lion'"),
    (("--log", "wandb2"), "unknown logger 'wandb2'"),
    (("--image-size", "16"), "--image-size applies to --data imagefolder:PATH only"),
])
def test_bad_own_pieces(tmp_path, capsys, user_models, args, needle):
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "train", "--out", out, *args, *FAST)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()
