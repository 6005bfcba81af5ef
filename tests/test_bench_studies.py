"""The side-by-side studies' own arithmetic: the fast recipe's paired time ratio, and the plain noisy loop's
augmentation (a plain loop the engine is compared with must crop and flip as it says)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fast_recipe import paired  # noqa: E402
from bench.plain_noisy import augment  # noqa: E402


def _result(seconds, acc):
    return {"epochs": [{"epoch": 1, "train_s": seconds, "test_acc": acc}], "test_acc_tta": None}


def test_the_time_ratio_is_the_geometric_mean_of_the_per_seed_ratios_with_a_t_interval():
    results = {"seeds": [0, 1, 2], "engine": [_result(s, a) for s, a in ((90, .70), (110, .72), (100, .71))],
               "plain": [_result(s, a) for s, a in ((100, .71), (100, .71), (100, .70))]}
    text = "\n".join(paired(results))
    logs = [math.log(0.9), math.log(1.1), 0.0]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 2)
    half = 4.302652729749462 * sd / math.sqrt(3)
    assert f"**{math.exp(mean):.2f}×** [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}]" in text
    assert "| 0 | 90 | 100 | 0.90× | -1.0 |" in text and "+0.3 [-2.5, +3.2] points** (paired t)" in text


def test_the_plain_loops_crops_are_windows_of_the_zero_padded_image_flipped_or_not():
    x = torch.arange(4 * 3 * 32 * 32, dtype=torch.float32).reshape(4, 3, 32, 32)
    out = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(4):
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_plain_loops_augmentation_is_seeded(seed):
    x = torch.randn(8, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(seed))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(seed)))


def plain_name(name: str) -> str:
    """The plain loop's name of the engine's PreResNet-20 tensor ``name`` (the two modules name the stem and the
    projection shortcut differently)."""
    return ("stem." + name[5:] if name.startswith("conv.") else name).replace("shortcut", "project")


def test_the_engines_preresnet20_and_sgd_step_are_the_plain_loops_bit_for_bit():
    """The baseline question's engine arm and plain arm differ only in their random streams (initial draw, order,
    augmentation) and the loop around the step: from the same weights the model's forward and three SGD steps
    (lr 0.05, momentum 0.9, weight decay 5e-4 on every parameter) agree exactly."""
    import torch.nn.functional as F

    from bench.plain_noisy import PreResNet20
    from dynbatch.models import build_model
    from dynbatch.train.optim import build_optimizer

    torch.manual_seed(0)
    engine, plain = build_model("preresnet20", 10), PreResNet20(10)
    plain.load_state_dict({plain_name(k): v for k, v in engine.state_dict().items()})
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    assert torch.equal(engine(x), plain(x))
    opt_e = build_optimizer("sgd", engine, lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        for model, opt in ((engine, opt_e), (plain, opt_p)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    plain_params = dict(plain.named_parameters())
    assert all(torch.equal(p, plain_params[plain_name(k)]) for k, p in engine.named_parameters())


def test_the_plain_loop_as_engine_ends_with_the_engines_weights_bit_for_bit(tmp_path, capsys):
    """``bench/plain_noisy.py --as-engine --fused`` is the engine's fixed arm written as a plain loop: from one seed,
    over epochs with a partial last batch, a new order each epoch, crops and flips, its weights equal the run's."""
    import numpy as np

    from bench.noisy_study import NOISY_OPT
    from bench.plain_noisy import fit
    from dynbatch.cli import main
    from dynbatch.train.run_folder import load_checkpoint

    rng = np.random.default_rng(0)
    data, labels = tmp_path / "data.npz", tmp_path / "labels.npy"
    np.savez(data, x_train=rng.integers(0, 256, (160, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, 160),
             x_test=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y_test=np.arange(40) % 10)
    np.save(labels, rng.integers(0, 10, 160).astype(np.uint8))
    # the baseline question's engine arm: the noisy study's settings, the fixed policy, the labels from a file
    assert main(["train", "--no-progress", "--data", f"npz:{data}", "--out", str(tmp_path / "run"), *NOISY_OPT,
                 "--policy", "fixed", "--epochs", "2", "--seed", "3", "--label-noise", f"file:{labels}"]) == 0
    capsys.readouterr()
    model, _ = fit(str(data), str(labels), 3, epochs=2, as_engine=True, fused=True, log=lambda _: None)
    engine = load_checkpoint(tmp_path / "run" / "checkpoint.pt", ("model",))["model"]
    plain = model.state_dict()
    assert all(torch.equal(v, plain[plain_name(k)]) for k, v in engine.items())


@pytest.mark.parametrize("lo, hi, expected", [(-0.5, 0.8, "agrees"), (-1.0, 1.0, "agrees"), (-1.5, 0.2, "undecided"),
                                              (1.2, 2.0, "differs"), (-3.0, -1.1, "differs")])
def test_a_precision_setting_agrees_when_its_paired_interval_lies_within_a_point(lo, hi, expected):
    from bench.paired_precision import band_verdict
    from bench.verdicts import Interval

    assert band_verdict(Interval((lo + hi) / 2, lo, hi, "paired t", "3"), reference=False) == expected
    assert band_verdict(None, reference=True) == "reference"
