"""Label noise as data (``dynbatch.data.noise``): the measured rate is the asked one within sampling error, each
kind moves labels where it says, the same seed gives the same labels, and bad specifications are one line."""
import math

import numpy as np
import pytest

from dynbatch.data.noise import CIFAR10_FLIPS, LabelNoise, corrupt_labels, noise_rate, parse_label_noise
from dynbatch.options import OptionError

N = 20_000


def _labels(c=10, seed=0):
    return np.random.default_rng(seed).integers(0, c, N)


def _within_sampling_error(measured, p, n):
    return abs(measured - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12  # 4 sigma of a binomial proportion


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45])
def test_measured_rate_is_the_asked_one(kind, rate):
    y = _labels()
    noisy = corrupt_labels(y, LabelNoise(kind, rate), 10, seed=3)
    assert noisy.dtype == np.int64 and noisy.shape == y.shape and noisy.min() >= 0 and noisy.max() <= 9
    assert _within_sampling_error(noise_rate(y, noisy), rate, N)


def test_symmetric_noise_goes_to_the_other_classes_uniformly():
    y = _labels()
    noisy = corrupt_labels(y, LabelNoise("symmetric", 0.5), 10, seed=1)
    moved = noisy != y
    offsets = (noisy[moved] - y[moved]) % 10
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0  # a flipped label is never its own class
    share = counts[1:] / counts[1:].sum()
    assert np.all(np.abs(share - 1 / 9) < 4 * math.sqrt((1 / 9) * (8 / 9) / counts[1:].sum()))


def test_pair_noise_moves_each_class_to_the_next():
    y = _labels(c=7)
    noisy = corrupt_labels(y, LabelNoise("pair", 0.3), 7, seed=2)
    moved = noisy != y
    assert np.array_equal(noisy[moved], (y[moved] + 1) % 7)


def test_asymmetric_noise_follows_the_cifar10_mapping():
    y = _labels()
    noisy = corrupt_labels(y, LabelNoise("asymmetric", 0.4), 10, seed=4)
    moved = noisy != y
    assert set(np.unique(y[moved])) == set(CIFAR10_FLIPS)  # only the five source classes move ...
    for src, dst in CIFAR10_FLIPS.items():  # ... each to its own target (cat and dog swap)
        assert np.all(noisy[moved & (y == src)] == dst)
        assert _within_sampling_error(np.mean(moved[y == src]), 0.4, int(np.sum(y == src)))


def test_the_same_seed_gives_the_same_labels():
    y = _labels()
    a = corrupt_labels(y, LabelNoise("symmetric", 0.4), 10, seed=7)
    assert np.array_equal(a, corrupt_labels(y, LabelNoise("symmetric", 0.4), 10, seed=7))
    assert not np.array_equal(a, corrupt_labels(y, LabelNoise("symmetric", 0.4), 10, seed=8))


@pytest.mark.parametrize("text, needle", [
    ("gaussian:0.2", "is not KIND:RATE"),
    ("symmetric", "is not KIND:RATE"),
    ("pair:abc", "is not a number"),
    ("pair:1", "must be in [0, 1)"),
    ("symmetric:-0.1", "must be in [0, 1)"),
])
def test_bad_specifications_are_one_line_with_the_fix(text, needle):
    with pytest.raises(OptionError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        parse_label_noise(text)
    assert e.value.for_cli().startswith("--label-noise ") and "e.g." in str(e.value) and "\n" not in str(e.value)


def test_kinds_that_do_not_fit_the_data_are_refused():
    with pytest.raises(OptionError, match="at least two classes"):
        corrupt_labels(np.zeros(10, dtype=np.int64), LabelNoise("pair", 0.2), 1, seed=0)
    with pytest.raises(OptionError, match="needs 10 classes"):
        corrupt_labels(_labels(c=100), LabelNoise("asymmetric", 0.2), 100, seed=0)
    assert parse_label_noise("none") is None and str(parse_label_noise("pair:0.45")) == "pair:0.45"


# ---- as a run's data option ------------------------------------------------------------------------------------------
def test_a_run_trains_on_noisy_labels_and_records_the_rates(tmp_path):
    """Only the training labels change (the same images as a clean run: subsets are drawn from the true labels),
    the clean ones are kept beside them, and config.json records the asked and the measured rate."""
    import json

    import torch

    from dynbatch.train.config import TrainConfig
    from dynbatch.train.trainer import Trainer

    def trainer(noise, out):
        cfg = TrainConfig(train_samples=600, batch_size=50, epochs=1, progress=False, util_interval=5.0, seed=5,
                          label_noise=noise)
        return Trainer.new(cfg, tmp_path / out, log=lambda m: None)

    clean, noisy = trainer("", "clean"), trainer("symmetric:0.4", "noisy")
    assert noisy.data.train.y_clean is not None and clean.data.train.y_clean is None
    assert torch.equal(noisy.data.train.y_clean, clean.data.train.y)  # same images, their true labels
    assert torch.equal(noisy.data.test.y, clean.data.test.y)  # test labels untouched
    measured = int((noisy.data.train.y != noisy.data.train.y_clean).sum()) / 600
    assert _within_sampling_error(measured, 0.4, 600)
    recorded = json.loads((tmp_path / "noisy" / "config.json").read_text())["label_noise"]
    assert recorded == {"asked": "symmetric:0.4", "measured": measured}
    assert json.loads((tmp_path / "clean" / "config.json").read_text())["label_noise"] is None


@pytest.mark.parametrize("args, needle", [
    (("--label-noise", "gaussian:0.2"), "--label-noise 'gaussian:0.2' is not KIND:RATE"),
    (("--label-noise", "symmetric:1.0"), "--label-noise 'symmetric:1.0': the rate must be in [0, 1)"),
    (("--label-noise", "asymmetric:0.3", "--data", "npz:{npz}"), "--label-noise asymmetric:0.3 is CIFAR-10's"),
])
def test_bad_label_noise_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    from cli_helpers import assert_one_line_error, run_cli

    npz = tmp_path / "five.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8), y_train=np.arange(20) % 5,
             x_test=rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8), y_test=np.arange(5))
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "train", "--out", out, *[a.format(npz=npz) for a in args])
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


# ---- real noisy labels from a file (--label-noise file:PATH) ---------------------------------------------------------
def _five_class_npz(tmp_path, n=20):
    npz = tmp_path / "five.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), y_train=np.arange(n) % 5,
             x_test=rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8), y_test=np.arange(5))
    return npz


def _file_run(tmp_path, out, noise, *extra):
    from cli_helpers import run_cli

    return ["train", "--data", f"npz:{_five_class_npz(tmp_path)}", "--model", "dynbatch_bench.minimal_loops:tiny_mlp",
            "--batch-size", "10", "--epochs", "1", "--no-progress", "--label-noise", noise, "--out", str(out),
            *extra], run_cli


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt"])
def test_a_label_file_is_read_as_the_training_labels_and_its_real_rate_recorded(tmp_path, fmt):
    """The file's labels train; the data set's own labels stay the clean ones; config.json has the measured rate
    and the file's digest (the same in every format, the same labels)."""
    import json

    import torch

    from dynbatch.train.config import TrainConfig
    from dynbatch.train.trainer import Trainer

    clean = np.arange(20) % 5
    noisy = clean.copy()
    noisy[[1, 7, 12]] = (noisy[[1, 7, 12]] + 2) % 5  # 3 of 20 labels: a 15 % real rate
    path = tmp_path / f"labels.{fmt}"
    if fmt == "npy":
        np.save(path, noisy.astype(np.int16))
        spec = f"file:{path}"
    elif fmt == "npz":
        np.savez(path, worse_label=noisy, clean_label=clean)
        spec = f"file:{path}#worse_label"
    else:
        torch.save({"worse_label": torch.from_numpy(noisy), "clean_label": clean}, path)
        spec = f"file:{path}#worse_label"
    cfg = TrainConfig(data=f"npz:{_five_class_npz(tmp_path)}", model="dynbatch_bench.minimal_loops:tiny_mlp",
                      batch_size=10, epochs=1, progress=False, util_interval=5.0, label_noise=spec)
    t = Trainer.new(cfg, tmp_path / "run", log=lambda m: None)
    assert torch.equal(t.data.train.y.cpu(), torch.from_numpy(noisy))
    assert torch.equal(t.data.train.y_clean.cpu(), torch.from_numpy(clean))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["label_noise"]
    assert recorded["asked"] == spec and recorded["measured"] == pytest.approx(0.15)
    assert len(recorded["sha256"]) == 64


def test_an_index_map_picks_each_training_image_s_row_of_a_larger_file(tmp_path):
    from dynbatch.data.noise import LabelFile, read_label_file

    big = np.arange(100) % 7
    np.save(tmp_path / "big.npy", big)
    rows = np.arange(20) * 5 + 3  # the subset is every fifth row, from row 3
    np.save(tmp_path / "map.npy", rows)
    labels, digest = read_label_file(LabelFile(str(tmp_path / "big.npy")), 20, 7, str(tmp_path / "map.npy"))
    assert np.array_equal(labels, big[rows]) and labels.dtype == np.int64
    _, without_map = read_label_file(LabelFile(str(tmp_path / "big.npy")), 100, 7)
    assert digest != without_map  # the map is part of what a resume checks


def _bad_label_files(tmp_path):
    import torch

    np.save(tmp_path / "short.npy", np.arange(12) % 5)
    np.save(tmp_path / "long.npy", np.arange(40) % 5)
    np.save(tmp_path / "float.npy", np.zeros(20, np.float32))
    np.save(tmp_path / "twod.npy", np.zeros((20, 1), np.int64))
    np.save(tmp_path / "range.npy", np.arange(20) % 6)
    np.save(tmp_path / "negative.npy", np.arange(20) % 5 - 1)
    np.savez(tmp_path / "keys.npz", worse_label=np.arange(20) % 5)
    torch.save({"clean": torch.zeros(20, dtype=torch.long)}, tmp_path / "keys.pt")
    (tmp_path / "broken.npy").write_bytes(b"not an array")
    np.save(tmp_path / "map_short.npy", np.arange(5))
    np.save(tmp_path / "map_range.npy", np.arange(20) + 30)


@pytest.mark.parametrize("noise, extra, needle", [
    ("file:{d}/missing.npy", (), "no such file"),
    ("file:{d}/labels.csv", (), "must be .npy, or .npz / .pt with #KEY"),
    ("file:{d}/keys.npz", (), "name the array in the .npz file with #KEY"),
    ("file:{d}/short.npy#y", (), "a .npy file holds one array, so no #KEY"),
    ("file:{d}/short.npy", (), "12 labels for 20 training images; it must hold one label per training image"),
    ("file:{d}/long.npy", (), "40 labels for 20 training images; give --label-index-map"),
    ("file:{d}/float.npy", (), "labels must be a 1-d integer array (got float32"),
    ("file:{d}/twod.npy", (), "labels must be a 1-d integer array (got int64 of shape (20, 1))"),
    ("file:{d}/range.npy", (), "labels must be in 0..4 (got 0..5)"),
    ("file:{d}/negative.npy", (), "labels must be in 0..4 (got -1..3)"),
    ("file:{d}/keys.npz#worse", (), "no array 'worse' in the file (it has 'worse_label')"),
    ("file:{d}/keys.pt#worse_label", (), "no array 'worse_label' in the file (it has 'clean')"),
    ("file:{d}/broken.npy", (), "cannot read the file"),
    ("file:{d}/long.npy", ("--label-index-map", "{d}/map_short.npy"), "needs 20 integer rows"),
    ("file:{d}/long.npy", ("--label-index-map", "{d}/map_range.npy"), "rows must be in 0..39"),
    ("file:{d}/long.npy", ("--label-index-map", "{d}/nomap.npy"), "--label-index-map"),
    ("symmetric:0.2", ("--label-index-map", "{d}/map_short.npy"), "give --label-noise file:PATH"),
])
def test_a_bad_label_file_is_one_line_and_writes_nothing(tmp_path, capsys, noise, extra, needle):
    from cli_helpers import assert_one_line_error

    _bad_label_files(tmp_path)
    out = tmp_path / "never"
    args, run_cli = _file_run(tmp_path, out, noise.format(d=tmp_path), *[a.format(d=tmp_path) for a in extra])
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


def test_a_run_on_a_label_file_resumes_exactly_and_refuses_a_changed_file(tmp_path, capsys):
    import json

    from cli_helpers import assert_one_line_error, rows, without_timing

    labels = tmp_path / "labels.npy"
    np.save(labels, (np.arange(20) * 3) % 5)
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    args, run_cli = _file_run(tmp_path, whole, f"file:{labels}", "--epochs", "2")
    assert run_cli(capsys, *args)[0] == 0
    args, _ = _file_run(tmp_path, stopped, f"file:{labels}", "--epochs", "2", "--stop-after-steps", "3")
    assert run_cli(capsys, *args)[0] == 0
    assert run_cli(capsys, "train", "--resume", str(stopped))[0] == 0

    for kind in ("step", "epoch"):
        assert without_timing(rows(stopped, kind)) == without_timing(rows(whole, kind))
    assert json.loads((stopped / "config.json").read_text())["label_noise"]["measured"] == pytest.approx(0.8)
    np.save(labels, (np.arange(20) * 2) % 5)
    args, _ = _file_run(tmp_path, stopped, f"file:{labels}", "--epochs", "3")
    rc, _, err = run_cli(capsys, "train", "--resume", str(stopped), "--epochs", "3")
    assert_one_line_error(rc, err, "changed since the run started")
