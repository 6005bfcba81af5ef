"""Every bad input is one line, ``dynbatch: error: <problem>; <fix>``, exit code 2, no traceback, nothing written.

Four tables: command-line options, npz contents, run-folder contents (resume), and plot inputs. A case is
(arguments, a phrase the message must contain); run-folder and npz cases also build what they feed in.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_line_error, run_cli

FAST = ("--model", "preresnet20", "--no-progress", "--util-interval", "5")


# ---- command-line options (a new run in a fresh folder: nothing may be created) ----------------------------------
CLI = [
    (("--model", "resnet9000"), "unknown model"),
    (("--data", "mnist"), "unknown data set"),
    (("--data", "npz:"), "unknown data set"),
    (("--policy", "magic"), "unknown policy"),
    (("--batch-size", "0"), "--batch-size must be positive"),
    (("--batch-size", "-3"), "--batch-size must be positive"),
    (("--batch-size", "2.5"), "is not a whole number"),
    (("--epochs", "-1"), "--epochs must be positive"),
    (("--epochs", "0"), "--epochs must be positive"),
    (("--epochs", "three"), "is not a whole number"),
    (("--train-samples", "0"), "--train-samples must be positive"),
    (("--train-samples", "100000"), "--train-samples 100000 is outside"),
    (("--train-fraction", "1.5"), "--train-fraction must be in (0, 1]"),
    (("--train-fraction", "0"), "--train-fraction must be in (0, 1]"),
    (("--train-fraction", "nan"), "is not a finite number"),
    (("--train-samples", "10", "--train-fraction", "0.5"), "either --train-samples or --train-fraction"),
    (("--micro-batch", "0"), "--micro-batch must be positive"),
    (("--data", "npz:/nonexistent/file.npz"), "data file not found"),
    (("--num-classes", "5"), "labels go up to 9"),
    (("--num-classes", "1"), "--num-classes must be at least 2"),
    (("--num-classes", "10000000000"), "above the supported"),
    (("--lr", "-0.1"), "--lr must be positive"),
    (("--lr", "0"), "--lr must be positive"),
    (("--lr", "nan"), "is not a finite number"),
    (("--lr", "inf"), "is not a finite number"),
    (("--lr=-inf",), "is not a finite number"),
    (("--lr", "abc"), "is not a number"),
    (("--weight-decay", "nan"), "is not a finite number"),
    (("--weight-decay", "-1"), "--weight-decay must be non-negative"),
    (("--momentum", "1"), "--momentum must be in [0, 1)"),
    (("--momentum", "-0.1"), "--momentum must be in [0, 1)"),
    (("--momentum", "nan"), "is not a finite number"),
    (("--nesterov", "ture"), "is not true or false"),
    (("--nesterov", "true", "--momentum", "0"), "--nesterov needs a positive --momentum"),
    (("--schedule", "linear"), "unknown schedule"),
    (("--gamma", "-1"), "--gamma must be in (0, 1]"),
    (("--gamma", "0"), "--gamma must be in (0, 1]"),
    (("--gamma", "2"), "--gamma must be in (0, 1]"),
    (("--gamma", "nan"), "is not a finite number"),
    (("--milestones", "a,b"), "comma-separated list of epochs"),
    (("--milestones", "10,nan"), "comma-separated list of epochs"),
    (("--milestones", "-5"), "--milestones must be epochs >= 0"),
    (("--warmup-epochs", "-1"), "--warmup-epochs must be non-negative"),
    (("--warmup-epochs", "inf"), "is not a finite number"),
    (("--label-smoothing", "1"), "--label-smoothing must be in [0, 1)"),
    (("--label-smoothing", "nan"), "is not a finite number"),
    (("--seed", "-1"), "--seed must be in 0.."),
    (("--seed", "99999999999999999999"), "--seed must be in 0.."),
    (("--seed", "-5", "--train-samples", "100"), "--seed must be in 0.."),
    (("--seed", "1.5"), "is not a whole number"),
    (("--device", "tpu"), "unknown device"),
    (("--device", "cuda:abc"), "unknown device"),
    (("--amp", "fp8"), "--amp must be auto, bf16 or none"),
    (("--channels-last", "maybe"), "--channels-last must be auto, on or off"),
    (("--redraw-subset", "sometimes"), "--redraw-subset must be never, on-resize or every-epoch"),
    (("--redraw-subset", "every-epoch"), "--redraw-subset redraws a --train-samples"),
    (("--policy", "edba", "--grad-metric", "median"), "--grad-metric must be mean or sum"),
    (("--policy", "edba", "--bs-rule", "margin"), "--bs-rule must be loss or share"),
    (("--policy", "edba", "--bs-rule", "share", "--share-grow", "0.4"), "need 0 <= --share-shrink <= --share-grow"),
    (("--eval-batch", "0"), "--eval-batch must be positive"),
    (("--eval-every", "0"), "--eval-every must be positive"),
    (("--util-interval", "0"), "--util-interval must be positive"),
    (("--util-interval", "nan"), "is not a finite number"),
    (("--util-interval", "-1"), "--util-interval must be positive"),
    (("--stop-after-steps", "0"), "--stop-after-steps must be positive"),
    (("--on-nonfinite", "explode"), "--on-nonfinite must be stop or skip"),
    (("--nonfinite-limit", "0"), "--nonfinite-limit must be positive"),
    (("--subsets", "0"), "--subsets is an option of --policy edba, not of --policy fixed"),
    (("--criterion", "max"), "--criterion is an option of --policy split"),
    (("--policy", "edba", "--resize-every", "5"), "--resize-every is an option of --policy adabatch"),
    (("--policy", "split", "--reuse-forward"), "--reuse-forward is an option of --policy edba"),
    (("--policy", "edba", "--subsets", "0"), "--subsets must be in 1.."),
    (("--policy", "edba", "--subsets", "2000000"), "--subsets must be in 1.."),
    (("--policy", "edba", "--subset-mode", "gaussian"), "--subset-mode must be bernoulli or uniform_size"),
    (("--policy", "edba", "--subset-p", "0"), "--subset-p must be in (0, 1]"),
    (("--policy", "edba", "--subset-p", "nan"), "is not a finite number"),
    (("--policy", "edba", "--ema-decay", "1"), "--ema-decay must be in [0, 1)"),
    (("--policy", "edba", "--bs-min", "0"), "--bs-min <= --bs-max"),
    (("--policy", "edba", "--bs-min", "50", "--bs-max", "20"), "--bs-min <= --bs-max"),
    (("--policy", "edba", "--bs-factor", "1"), "--bs-factor must be above 1"),
    (("--policy", "edba", "--bs-factor", "inf"), "is not a finite number"),
    (("--policy", "edba", "--margin-eps", "0"), "--margin-eps must be positive"),
    (("--policy", "edba", "--selection-backend", "cuda"), "--selection-backend must be"),
    (("--policy", "edba", "--grow-below", "-1"), "--grow-below must be non-negative"),
    (("--policy", "split", "--splits", "1,x"), "--splits must be comma-separated integers"),
    (("--policy", "split", "--splits", "0,1"), "--splits must be distinct positive integers"),
    (("--policy", "split", "--splits", "1,1"), "--splits must be distinct positive integers"),
    (("--policy", "split", "--criterion", "median"), "--criterion must be min, max or random"),
    (("--policy", "split", "--split-update", "parallel"), "--split-update must be sequential or original"),
    (("--policy", "split", "--split-clip", "0"), "--split-clip must be positive"),
    (("--policy", "split", "--base-batch", "0"), "--base-batch must be positive"),
    (("--policy", "split", "--base-batch", "100", "--splits", "1,3"), "must divide the base batch"),
    (("--policy", "adabatch", "--resize-every", "0"), "--resize-every must be positive"),
    (("--policy", "adabatch", "--lr-factor", "nan"), "is not a finite number"),
    (("--policy", "adabatch", "--lr-factor", "0"), "--lr-factor must be positive"),
    (("--policy", "adabatch", "--max-batch", "64", "--batch-size", "128"), "exceeds --max-batch"),
    (("--policy", "adabatch", "--resize-factor", "0"), "--resize-factor must be positive"),
    (("--autoresume",), "--autoresume needs a run folder"),
    (("--sync-bn",), "--sync-bn needs CUDA"),
    (("--frobnicate",), "unrecognized arguments"),
    (("--data", "cifar10", "--data-dir", "/nonexistent/cifar"), "cannot load cifar10"),
]


@pytest.mark.parametrize("args, needle", CLI, ids=[" ".join(a) for a, _ in CLI])
def test_bad_option(tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    argv = ("train", *args) if "--autoresume" in args else ("train", "--out", out, *args)
    rc, _, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


def test_resume_and_out_together(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--resume", tmp_path, "--out", tmp_path / "x")[::2], "not both")


# ---- where --out cannot be ---------------------------------------------------------------------------------------
def test_out_under_proc(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--out", "/proc/dynbatch-run", *FAST)[::2], "cannot create the run folder")


def test_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(*run_cli(capsys, "train", "--out", f / "run", *FAST)[::2], "cannot create the run folder")
    assert f.read_text() == "x"


def test_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(*run_cli(capsys, "train", "--out", f, *FAST)[::2], "is a file")


def test_out_on_a_read_only_filesystem(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--out", "/sys/dynbatch-run", *FAST)[::2], "cannot create the run folder")


# ---- npz contents ----------------------------------------------------------------------------------------------
def _good(n=8, h=4, w=4, c=3):
    return dict(x_train=np.zeros((n, h, w, c), np.uint8), y_train=np.arange(n) % 2,
                x_test=np.zeros((4, h, w, c), np.uint8), y_test=np.arange(4) % 2)


NPZ = {
    "not a zip": (b"PK\x03\x04 this is not a zip archive at all", "unreadable or corrupted"),
    "missing arrays": ({"x_train": np.zeros((2, 4, 4, 3), np.uint8)}, "lacks y_train, x_test, y_test"),
    "float images": ({**_good(), "x_train": np.zeros((8, 4, 4, 3), np.float32)}, "expected uint8"),
    "3-d images": ({**_good(), "x_train": np.zeros((8, 4, 4), np.uint8)}, "expected uint8 (N, H, W, C)"),
    "0x0 images": (_good(h=0, w=0), "at least one pixel and one channel"),
    "0 channels": (_good(c=0), "at least one pixel and one channel"),
    "float labels": ({**_good(), "y_train": np.zeros(8, np.float32)}, "must be integer labels"),
    "2-d labels": ({**_good(), "y_train": np.zeros((8, 1), np.int64)}, "must be integer labels"),
    "label count": ({**_good(), "y_train": np.zeros(5, np.int64)}, "one per image"),
    "empty train": (_good(n=0), "is empty"),
    "negative labels": ({**_good(), "y_test": np.array([0, -1, 0, 1])}, "negative labels"),
    "uint64 labels >= 2**63": ({**_good(), "y_train": np.full(8, 2**63, np.uint64)}, "beyond the supported"),
    "huge labels": ({**_good(), "y_train": np.full(8, 10**9, np.int64)}, "beyond the supported"),
    "shapes differ": ({**_good(), "x_test": np.zeros((4, 5, 5, 3), np.uint8)}, "differ in shape"),
    "object arrays": ({**_good(), "y_train": np.array([object()] * 8)}, "unreadable or corrupted"),
    "a renamed .npy": ("npy", "a single array, not an .npz archive"),
}


@pytest.mark.parametrize("case", list(NPZ))
def test_bad_npz(tmp_path, capsys, case):
    content, needle = NPZ[case]
    path = tmp_path / "data.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((3, 4, 4, 3), np.uint8))
    else:
        with open(path, "wb") as f:
            np.savez(f, **content)  # allow_pickle is only refused on load
    out = tmp_path / "never"
    assert_one_line_error(*run_cli(capsys, "train", "--data", f"npz:{path}", "--out", out, *FAST)[::2], needle)
    assert not out.exists()


def test_npz_path_is_a_folder(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--data", f"npz:{tmp_path}", *FAST)[::2], "data file not found")


# ---- run-folder contents (resume): the folder must be left exactly as it was ----------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    from dynbatch.cli import main

    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--out", str(run), "--epochs", "2", "--train-samples", "40", "--batch-size", "20",
                 *FAST]) == 0
    return run


def _json(run, f):
    c = json.loads((run / "config.json").read_text())
    f(c)
    (run / "config.json").write_text(json.dumps(c))


class _Planted:
    def __reduce__(self):
        return (print, ("this ran",))


def _ckpt(run, f):
    s = torch.load(run / "checkpoint.pt", weights_only=True)
    s = f(s)
    torch.save(s, run / "checkpoint.pt")


FOLDERS = {
    "checkpoint missing keys": (lambda r: _ckpt(r, lambda s: {k: v for k, v in s.items() if k != "sampler"}),
                                "lacks sampler"),
    "checkpoint garbage": (lambda r: (r / "checkpoint.pt").write_bytes(b"garbage"), "corrupted"),
    "checkpoint empty": (lambda r: (r / "checkpoint.pt").write_bytes(b""), "corrupted"),
    "checkpoint a list": (lambda r: torch.save([1, 2], r / "checkpoint.pt"), "not a dynbatch checkpoint"),
    "checkpoint planted": (lambda r: torch.save({"x": _Planted()}, r / "checkpoint.pt"), "refusing"),
    "checkpoint old version": (lambda r: _ckpt(r, lambda s: {**s, "version": 1}), "incompatible dynbatch version"),
    "checkpoint ill-typed progress": (lambda r: _ckpt(r, lambda s: {**s, "progress": [1]}), "does not fit"),
    "config binary": (lambda r: (r / "config.json").write_bytes(b"\xff\xfe\x00binary"), "unreadable"),
    "config a list": (lambda r: (r / "config.json").write_text("[1, 2]"), "has no 'config' object"),
    "config ill-typed epochs": (lambda r: _json(r, lambda c: c["config"].update(epochs="x")), "epochs = 'x'"),
    "config ill-typed milestones": (lambda r: _json(r, lambda c: c["config"].update(milestones=["a"])),
                                    "milestones must be numbers"),
    "config NaN lr": (lambda r: (r / "config.json").write_text(
        (r / "config.json").read_text().replace('"lr": 0.05', '"lr": NaN')), "lr = nan"),
    "config another model": (lambda r: _json(r, lambda c: c["config"].update(model="preresnet56")), "does not fit"),
    "config unknown model": (lambda r: _json(r, lambda c: c["config"].update(model="nope")), "unknown model"),
    "config missing": (lambda r: (r / "config.json").unlink(), "no checkpoint.pt and config.json"),
    "metrics a folder": (lambda r: ((r / "metrics.jsonl").unlink(), (r / "metrics.jsonl").mkdir()), "is missing"),
    "metrics emptied": (lambda r: (r / "metrics.jsonl").write_bytes(b""), "rows were lost"),
    "metrics truncated": (lambda r: (r / "metrics.jsonl").write_bytes((r / "metrics.jsonl").read_bytes()[:100]),
                          "rows were lost"),
    "metrics missing": (lambda r: (r / "metrics.jsonl").unlink(), "is missing"),
    "metrics garbled": (lambda r: (r / "metrics.jsonl").write_bytes(b"{" * ((r / "metrics.jsonl").stat().st_size - 1) + b"\n"),
                        "line 1 is not a metrics row"),
    "no checkpoint yet": (lambda r: (r / "checkpoint.pt").unlink(), "stopped before its first checkpoint"),
}


@pytest.mark.parametrize("case", list(FOLDERS))
def test_bad_run_folder(tmp_path, capsys, base_run, case):
    damage, needle = FOLDERS[case]
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    damage(run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run)[::2], needle)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())


RESUME_ARGS = [
    (("--lr", "0.3"), "drop --lr"),
    (("--epochs", "0"), "--epochs must be positive"),
    (("--epochs", "1"), "below the 2 epoch(s)"),
    (("--policy", "edba"), "drop --policy"),
]


@pytest.mark.parametrize("args, needle", RESUME_ARGS, ids=[" ".join(a) for a, _ in RESUME_ARGS])
def test_bad_resume_arguments(tmp_path, capsys, base_run, args, needle):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run, *args)[::2], needle)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_a_missing_folder(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--resume", tmp_path / "nope")[::2], "no such run folder")


def test_out_holding_a_run(tmp_path, capsys, base_run):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert_one_line_error(*run_cli(capsys, "train", "--out", run, *FAST)[::2], "already holds a run")
    assert_one_line_error(*run_cli(capsys, "train", "--out", run, "--lr", "0.01", "--autoresume", *FAST)[::2],
                    "other settings")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


# ---- plot inputs ---------------------------------------------------------------------------------------------------
def _plot_folder(tmp_path, content: bytes | None) -> Path:
    d = tmp_path / "r"
    d.mkdir()
    if content is not None:
        (d / "metrics.jsonl").write_bytes(content)
    return d


PLOTS = {
    "no metrics": (None, "x.png", "not a run folder"),
    "binary metrics": (b"\x00\xff\xfe" * 100, "x.png", "holds no metrics rows"),
    "ill-typed rows": (b'[1, 2]\n"text"\n{"kind": 5}\n', "x.png", "holds no metrics rows"),
    "out not png": (b'{"kind": "epoch", "epoch": 0, "train_loss": 1.0}\n', "x.jpg", "must end in .png"),
    "out a folder": (b'{"kind": "epoch", "epoch": 0, "train_loss": 1.0}\n', "folder.png", "is a folder"),
    "out under proc": (b'{"kind": "epoch", "epoch": 0, "train_loss": 1.0}\n', "/proc/x/y.png", "cannot write"),
}


@pytest.mark.parametrize("case", list(PLOTS))
def test_bad_plot_input(tmp_path, capsys, case):
    content, out, needle = PLOTS[case]
    run = _plot_folder(tmp_path, content)
    target = Path(out) if out.startswith("/") else tmp_path / out
    if out == "folder.png":
        target.mkdir()
    assert_one_line_error(*run_cli(capsys, "plot", run, "--out", target)[::2], needle)
    assert not any(p.name.endswith(".tmp.png") for p in tmp_path.iterdir())


def test_plot_metrics_is_a_folder(tmp_path, capsys):
    d = tmp_path / "r"
    (d / "metrics.jsonl").mkdir(parents=True)
    assert_one_line_error(*run_cli(capsys, "plot", d, "--out", tmp_path / "x.png")[::2], "not a run folder")


def test_plot_bad_axis(tmp_path, capsys):
    assert_one_line_error(*run_cli(capsys, "plot", tmp_path, "--out", tmp_path / "x.png", "--x", "steps")[::2],
                    "invalid choice")


def test_plot_tolerates_ill_typed_values(tmp_path, capsys):
    """Rows of the right kind with values of the wrong type are left out of the curves, not a traceback."""
    run = _plot_folder(tmp_path, b'{"kind": "epoch", "epoch": "x", "train_loss": null}\n'
                                 b'{"kind": "epoch", "epoch": 0, "train_loss": 1.0, "test_acc": true}\n')
    (run / "config.json").write_bytes(b"\xff binary")
    rc, out, err = run_cli(capsys, "plot", run, "--out", tmp_path / "ok.png")
    assert rc == 0 and (tmp_path / "ok.png").stat().st_size > 0, err


def test_the_tables_hold_at_least_a_hundred_cases():
    n = len(CLI) + len(NPZ) + len(FOLDERS) + len(RESUME_ARGS) + len(PLOTS) + 11  # + the single-case tests
    assert n >= 100, n
