import json
import signal
import time

import pytest

from dynbatch.info import cpu_name
from cli_helpers import assert_one_line_error, rows, run_cli, spawn, without_timing

FAST = ("--model", "preresnet20", "--no-progress", "--util-interval", "5")


def test_train_default_data_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(capsys, "train", "--out", out, "--epochs", "3", "--train-samples", "300",
                            "--batch-size", "32", *FAST)
    assert rc == 0, stdout
    assert f"run folder: {out}" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["lr"] == 0.05 and cfg["versions"]["torch"] and cfg["device"]["type"] == "cpu"
    assert cfg["device"]["name"] == cpu_name() != ""  # the CPU's model, so a run says which machine it timed
    steps, epochs = rows(out, "step"), rows(out, "epoch")
    assert len(epochs) == 3 and sum(r["batch_size"] for r in steps) == 900
    for k in ("step", "epoch", "batch_size", "lr", "train_loss", "samples_seen", "wall_s"):
        assert k in steps[0]
    for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_s", "util_samples"):
        assert k in epochs[0]
    assert epochs[-1]["test_acc"] > 0.3  # chance is 0.1
    assert (out / "checkpoint.pt").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0


def test_resume_reproduces_an_uninterrupted_run(tmp_path, capsys):
    common = ("--epochs", "3", "--train-samples", "200", "--batch-size", "48", *FAST)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, "train", "--out", a, *common)[0] == 0
    # Interrupt mid-epoch (200 / 48 -> 5 steps an epoch), twice, then finish.
    assert run_cli(capsys, "train", "--out", b, *common, "--stop-after-steps", "7")[0] == 0
    assert run_cli(capsys, "train", "--resume", b, "--stop-after-steps", "4")[0] == 0
    rc, stdout, _ = run_cli(capsys, "train", "--resume", b)
    assert rc == 0 and "resuming" in stdout
    for kind in ("step", "epoch"):
        assert without_timing(rows(a, kind)) == without_timing(rows(b, kind))


def test_resume_can_extend_epochs(tmp_path, capsys):
    out = tmp_path / "r"
    run_cli(capsys, "train", "--out", out, "--epochs", "1", "--train-samples", "100", *FAST)
    assert run_cli(capsys, "train", "--resume", out, "--epochs", "2")[0] == 0
    assert [r["epoch"] for r in rows(out, "epoch")] == [0, 1]


def test_resume_without_checkpoint_and_out_with_a_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(*run_cli(capsys, "train", "--resume", empty)[::2], "no checkpoint.pt")
    run = tmp_path / "run"
    assert run_cli(capsys, "train", "--out", run, "--epochs", "1", "--train-samples", "50", *FAST)[0] == 0
    before = (run / "metrics.jsonl").read_bytes()
    assert_one_line_error(*run_cli(capsys, "train", "--out", run)[::2], "already holds a run")
    assert (run / "metrics.jsonl").read_bytes() == before  # refused: nothing touched
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run, "--lr", "0.3")[::2], "drop --lr")
    assert run_cli(capsys, "train", "--resume", run)[0] == 0  # the refusal broke nothing
    assert run_cli(capsys, "train", "--out", run, "--overwrite", "--epochs", "1", "--train-samples", "50", *FAST)[0] == 0
    assert len(rows(run, "epoch")) == 1


def test_plot_and_info(tmp_path, capsys):
    runs = []
    for lr in ("0.05", "0.02"):
        r = tmp_path / f"lr{lr}"
        run_cli(capsys, "train", "--out", r, "--epochs", "1", "--train-samples", "60", "--lr", lr, *FAST)
        runs.append(r)
    rc, out, _ = run_cli(capsys, "plot", *runs, "--out", tmp_path / "cmp.png")
    assert rc == 0 and (tmp_path / "cmp.png").stat().st_size > 10_000
    assert_one_line_error(*run_cli(capsys, "plot", tmp_path, "--out", tmp_path / "x.png")[::2], "not a run folder")
    rc, out, _ = run_cli(capsys, "info")
    assert rc == 0 and "torch" in out and "kernel backends" in out and "reference" in out


def test_info_into_a_closed_pipe_stops_quietly():
    p = spawn("info")
    p.stdout.close()  # the reader left, as `dynbatch info | head -1` does once it has its line
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    run = tmp_path / "sig"
    p = spawn("train", "--out", run, "--epochs", "50", "--batch-size", "32", *FAST)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "checkpoint saved" in out + err
    assert (run / "checkpoint.pt").is_file()
    p = spawn("train", "--resume", run, "--stop-after-steps", "3")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err


@pytest.mark.slow
def test_cli_end_to_end_on_real_cifar_subset(tmp_path, capsys, cifar_subset):
    out = tmp_path / "cifar"
    rc, stdout, _ = run_cli(capsys, "train", "--data", f"npz:{cifar_subset}", "--train-samples", "1000",
                            "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--out", out, *FAST)
    assert rc == 0, stdout
    ep = rows(out, "epoch")
    assert len(ep) == 3 and ep[-1]["test_acc"] > 0.2  # chance is 0.1 on the 1,017 real test images
    assert ep[-1]["train_loss"] < ep[0]["train_loss"]


def test_gpu_check_refuses_in_one_line_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --gpu-check would run")
    rc, _, err = run_cli(capsys, "bench", "--gpu-check")
    assert_one_line_error(rc, err, "--gpu-check needs a CUDA GPU")
