import pytest

from cli_helpers import rows, run_cli, without_timing
from dynbatch.methods.adabatch import AdaBatchPolicy
from dynbatch.train.config import TrainConfig
from dynbatch.train.schedules import scheduled_lr

OPTS = dict(resize_every=20, resize_factor=2, lr_factor=0.75, max_batch=4096, warmup_base=256)


def test_published_schedule_at_epoch_boundaries():
    p = AdaBatchPolicy(OPTS, batch_size=128)
    got = [(e, p.schedule.batch_size(e), p.schedule.lr_factor(e)) for e in (0, 19, 20, 39, 40, 60, 80, 99)]
    assert got == [(0, 128, 1.0), (19, 128, 1.0), (20, 256, 0.75), (39, 256, 0.75), (40, 512, 0.5625),
                   (60, 1024, 0.421875), (80, 2048, 0.31640625), (99, 2048, 0.31640625)]
    p.on_epoch_start(45)
    assert p.batch_size() == 512 and p.lr_factor(45.5) == 0.5625


def test_cap_moves_the_whole_decay_to_the_learning_rate():
    p = AdaBatchPolicy({**OPTS, "resize_every": 1, "max_batch": 300}, batch_size=128)
    assert [p.schedule.batch_size(e) for e in range(4)] == [128, 256, 300, 300]
    # 128 -> 256 and 256 -> 300 grew (x0.75 each); then capped: x0.375 per resize
    assert [p.schedule.lr_factor(e) for e in range(4)] == pytest.approx([1, 0.75, 0.5625, 0.5625 * 0.375])


def test_warmup_reaches_lr_times_batch_over_base():
    cfg = TrainConfig(warmup_epochs=2, lr=0.1, epochs=10, schedule="constant")
    p = AdaBatchPolicy(OPTS, batch_size=128, config=cfg)
    lr = lambda t: scheduled_lr(t, base_lr=0.1, schedule="constant", epochs=10, warmup_epochs=2) * p.lr_factor(t)  # noqa: E731
    assert lr(0) < 1e-4 and lr(1) == pytest.approx(0.025, rel=1e-3) and lr(2) == pytest.approx(0.05)
    assert AdaBatchPolicy(OPTS, batch_size=128, config=TrainConfig(warmup_epochs=0)).lr_factor(0) == 1.0


def test_adabatch_resume_mid_schedule_and_plot_fields(tmp_path, capsys):
    common = ("--policy", "adabatch", "--resize-every", "1", "--epochs", "3", "--batch-size", "16",
              "--train-samples", "96", "--no-progress", "--util-interval", "5")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, "train", "--out", a, *common)[0] == 0
    assert run_cli(capsys, "train", "--out", b, *common, "--stop-after-steps", "8")[0] == 0  # inside epoch 2
    assert run_cli(capsys, "train", "--resume", b)[0] == 0
    for kind in ("step", "epoch"):
        assert without_timing(rows(a, kind)) == without_timing(rows(b, kind))
    by_epoch = {r["epoch"]: (r["policy_batch_size"], r["lr"]) for r in rows(a, "step")}
    assert {e: b for e, (b, _) in by_epoch.items()} == {0: 16, 1: 32, 2: 64}
    assert [by_epoch[e][1] for e in range(3)] == pytest.approx([0.05, 0.0375, 0.028125])


@pytest.mark.slow
def test_adabatch_end_to_end_on_real_cifar(tmp_path, capsys, cifar_subset):
    out = tmp_path / "ada"
    rc, stdout, _ = run_cli(capsys, "train", "--policy", "adabatch", "--resize-every", "1", "--data",
                            f"npz:{cifar_subset}", "--train-samples", "1000", "--epochs", "3", "--batch-size", "32",
                            "--micro-batch", "48", "--out", out, "--no-progress")
    assert rc == 0, stdout
    sizes = sorted({r["policy_batch_size"] for r in rows(out, "step")})
    assert sizes == [32, 64, 128]
    ep = rows(out, "epoch")
    assert ep[-1]["test_acc"] > 0.2 and ep[-1]["train_loss"] < ep[0]["train_loss"]
