"""The fast recipe's parts as engine options (lookahead, parameter groups, decoupled hyperparameters, the triangle
schedule, whitening, dirac, BatchNorm settings, alternating flips and reflect translation, test-time augmentation)
and ``--recipe airbench94``."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_helpers import assert_one_line_error, rows, run_cli, without_timing
from dynbatch.models import build_model
from dynbatch.models.init import dirac_init, first_conv, patches, set_batchnorm, whiten_conv
from dynbatch.train.config import TrainConfig
from dynbatch.train.evaluation import tta_logits
from dynbatch.train.lookahead import Lookahead
from dynbatch.train.optim import build_optimizer
from dynbatch.train.schedules import scheduled_lr


def test_lookahead_equals_the_hand_computed_update():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    la = Lookahead(model, every=2, decay=0.5, power=1.0, start=0.0)
    la.after_step(1, 0.1, 0.1)  # not a multiple of every: nothing
    assert la.slow is None
    la.after_step(2, 0.2, 0.2)  # the first pull only takes the copy
    assert torch.equal(la.slow[0], torch.tensor([[1.0, 2.0]]))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 6.0]]))  # what two optimizer steps did
    la.after_step(4, 0.5, 0.5)
    rho = 0.5 ** 2 * 0.5  # decay^every x progress^power
    want = rho * torch.tensor([[1.0, 2.0]]) + (1 - rho) * torch.tensor([[3.0, 6.0]])
    torch.testing.assert_close(model.weight.detach(), want)
    torch.testing.assert_close(la.slow[0], want)
    again = Lookahead(model, every=2, decay=0.5, power=1.0, start=0.0)
    again.load_state_dict(la.state_dict())
    torch.testing.assert_close(again.slow[0], want)


def test_batchnorm_biases_get_their_own_group_with_the_same_decay_per_step():
    model = build_model("preresnet20", 10)
    opt = build_optimizer("sgd", model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, bias_lr_scale=64)
    biases, rest = opt.param_groups
    n_bn = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(biases["params"]) == n_bn and biases["lr"] == pytest.approx(6.4)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(rest["lr"] * rest["weight_decay"])
    assert len(biases["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_decoupled_hyperparameters_match_airbench_summed_loss_step():
    """One SGD step in the engine's form (mean loss, converted lr and decay) equals airbench's (summed loss, lr per
    1024 examples over Nesterov's gain, decay wd x batch / gain)."""
    cfg = TrainConfig(hyp_form="decoupled", lr=11.5, weight_decay=0.0153, momentum=0.85, nesterov=True,
                      batch_size=128)
    lr, wd = cfg.torch_hyperparameters()
    torch.manual_seed(0)
    x, y = torch.randn(128, 5), torch.randint(0, 3, (128,))
    ours, theirs = nn.Linear(5, 3), nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    gain = 1024 * (1 + 1 / (1 - 0.85))
    their_lr = 11.5 / gain
    steps = [(ours, torch.optim.SGD(ours.parameters(), lr=lr, momentum=0.85, nesterov=True, weight_decay=wd), "mean"),
             (theirs, torch.optim.SGD(theirs.parameters(), lr=their_lr, momentum=0.85, nesterov=True,
                                      weight_decay=0.0153 * 128 / gain / their_lr), "sum")]
    for model, opt, reduction in steps:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y, reduction=reduction).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_triangle_schedule():
    lr = lambda p: scheduled_lr(p, base_lr=1.0, schedule="triangle", epochs=10, triangle=(0.2, 0.25, 0.07))  # noqa: E731
    assert [lr(0), lr(2.5), lr(10)] == pytest.approx([0.2, 1.0, 0.07])
    assert lr(1.25) == pytest.approx(0.6) and lr(6.25) == pytest.approx((1 + 0.07) / 2)


def test_whitening_makes_the_patch_covariance_the_identity():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("nchw,dc->ndhw", torch.randn(200, 3, 10, 10), mix) + 0.5  # correlated channels
    model = build_model("airbench", 10)
    conv = first_conv(model)
    whiten_conv(conv, images, eps=0.0)
    assert not conv.weight.requires_grad
    out = F.conv2d(images, conv.weight[:12])  # the positive half: one channel per eigenvector
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / flat.shape[0]  # uncentred, as the whitening's
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-3)
    assert patches(images, (2, 2)).shape == (200 * 81, 12)


def test_dirac_and_batchnorm_settings():
    model = build_model("airbench", 10)
    assert dirac_init(model) == 7  # the whitening conv and the six group convs all have out >= in
    conv = model.groups[0].conv2  # 64 -> 64: the identity
    x = torch.randn(1, 64, 5, 5)
    torch.testing.assert_close(F.conv2d(x, conv.weight, padding=1), x)
    assert set_batchnorm(model, momentum=0.4, eps=1e-12, train_weight=False) == 6
    bn = model.groups[1].norm1
    assert bn.momentum == 0.4 and bn.eps == 1e-12 and not bn.weight.requires_grad and bn.bias.requires_grad


def test_tta_equals_the_mean_of_the_explicit_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, x.flip(-1)]
    shifted = [padded[..., :8, :8], padded[..., :8, :8].flip(-1), padded[..., 2:, 2:], padded[..., 2:, 2:].flip(-1)]
    want = 0.5 * torch.stack([model(v) for v in views]).mean(0) + 0.5 * torch.stack([model(v) for v in shifted]).mean(0)
    torch.testing.assert_close(tta_logits(model, x, 2), want)
    torch.testing.assert_close(tta_logits(model, x, 1), torch.stack([model(v) for v in views]).mean(0))


def test_alternate_flips_invert_every_other_epoch_and_reflect_pads():
    from dynbatch.data.device_data import DeviceSplit
    import numpy as np

    x = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1) * 7
    split = DeviceSplit(x, np.zeros(2, dtype=np.int64), (0.0,), (1 / 255,), torch.device("cpu"), 0, True,
                        flip_mode="alternate", seed=1)
    idx = torch.arange(2)
    even, _ = split.batch(idx, torch.Generator().manual_seed(0), epoch=0)
    odd, _ = split.batch(idx, torch.Generator().manual_seed(0), epoch=1)
    torch.testing.assert_close(odd, even.flip(-1))
    reflect = DeviceSplit(x, np.zeros(2, dtype=np.int64), (0.0,), (1 / 255,), torch.device("cpu"), 2, True,
                          pad_mode="reflect")
    torch.testing.assert_close(reflect.x[0, :, :, 0].float(),
                               F.pad(torch.from_numpy(x[:1, :, :, 0]).float()[None], (2,) * 4, mode="reflect")[0, 0])


def test_mean_padding_is_the_mean_colour_so_that_padded_pixels_normalise_to_about_zero():
    """--pad-mode mean: the border a loop that pads its normalised tensors with zeros sees (within uint8 rounding:
    half a grey level over the std)."""
    from dynbatch.data.device_data import DeviceSplit
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    split = DeviceSplit(x, np.zeros(3, dtype=np.int64), mean, std, torch.device("cpu"), 2, False, pad_mode="mean")
    assert torch.equal(split.x[:, 2:-2, 2:-2], torch.from_numpy(x))  # the image itself untouched
    corner = split._normalise(split.x[:, :2, :2])  # (N, C, 2, 2) of border pixels
    assert corner.abs().max() <= 0.5 / 255 / min(std) + 1e-6
    zero = DeviceSplit(x, np.zeros(3, dtype=np.int64), mean, std, torch.device("cpu"), 2, False)
    assert int(zero.x[:, :2].max()) == 0  # the default stays black


@pytest.mark.slow
def test_the_recipe_trains_resumes_exactly_and_records_its_settings(tmp_path, capsys, tiny_npz):
    args = ("train", "--recipe", "airbench94", "--data", f"npz:{tiny_npz}", "--batch-size", "16", "--epochs", "2",
            "--lookahead-start", "0", "--whiten-bias-epochs", "1", "--no-progress", "--util-interval", "5")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, *args, "--out", a)[0] == 0
    assert run_cli(capsys, *args, "--out", b, "--stop-after-steps", "4")[0] == 0  # mid-epoch, past a pull
    assert run_cli(capsys, "train", "--resume", b)[0] == 0
    for kind in ("step", "epoch"):
        assert without_timing(rows(a, kind)) == without_timing(rows(b, kind))
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["config"]["model"] == "airbench" and cfg["config"]["lookahead"] == 5 and cfg["given"]["recipe"]
    assert cfg["config"]["batch_size"] == 16  # the flag over the recipe
    assert "test_acc_tta" in rows(a, "epoch")[-1]


@pytest.mark.parametrize("argv, needle", [
    (("--recipe", "airbench95"), "unknown recipe 'airbench95'"),
    (("--recipe", "airbench94", "--model", "preresnet20"), "--whiten needs a first convolution with"),
    (("--lookahead", "0"), "--lookahead must be at least 1"),
    (("--schedule", "triangle", "--triangle", "0.2,1.5,0.1"), "--triangle must be start,peak,end"),
])
def test_bad_recipe_input_is_one_line(tmp_path, capsys, tiny_npz, argv, needle):
    rc, _, err = run_cli(capsys, "train", "--data", f"npz:{tiny_npz}", "--out", tmp_path / "r", *argv)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "r").exists()
