"""Reliability: divergence, safe checkpoint loading, run-folder integrity (lock, metrics, full disk), resume
semantics, restart without a human. Each test names the defect it guards against."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import REPO, assert_one_line_error, rows, run_cli, spawn, without_timing
from dynbatch.errors import Diverged
from dynbatch.train import run_folder
from dynbatch.train.config import TrainConfig
from dynbatch.train.trainer import Trainer

FAST = ("--model", "preresnet20", "--no-progress", "--util-interval", "5")
TINY = ("--train-samples", "60", "--batch-size", "20", *FAST)  # 3 steps an epoch


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != run_folder.LOCK}


# ---- resume semantics --------------------------------------------------------------------------------------------
def test_train_fraction_run_resumes_exactly(tmp_path, capsys):
    """Defect 1: config.json held train_fraction and the resolved train_samples; resume refused the pair."""
    common = ("--train-fraction", "0.05", "--batch-size", "24", "--epochs", "2", *FAST)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, "train", "--out", a, *common)[0] == 0
    assert run_cli(capsys, "train", "--out", b, *common, "--stop-after-steps", "4")[0] == 0
    cfg = json.loads((b / "config.json").read_text())
    assert cfg["config"]["train_samples"] is None and cfg["data"]["train_samples"] == 72
    assert run_cli(capsys, "train", "--resume", b)[0] == 0
    for kind in ("step", "epoch"):
        assert without_timing(rows(a, kind)) == without_timing(rows(b, kind))


def test_epochs_on_resume_is_the_new_total_whatever_its_value(tmp_path, capsys):
    """Defect 2: --epochs 30 (the default) was ignored on resume; --epochs below the epochs done was accepted."""
    run = tmp_path / "r"
    args = ("--train-samples", "20", "--batch-size", "20", "--eval-every", "50", *FAST)
    assert run_cli(capsys, "train", "--out", run, "--epochs", "2", *args)[0] == 0
    config_before = (run / "config.json").read_bytes()
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run, "--epochs", "1")[::2], "below the 2 epoch(s)")
    assert (run / "config.json").read_bytes() == config_before  # refused before anything was written
    rc, out, _ = run_cli(capsys, "train", "--resume", run, "--epochs", "30")
    assert rc == 0
    assert [r["epoch"] for r in rows(run, "epoch")] == list(range(30))
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 30
    # Extension re-plans the cosine schedule over the new total, and says so.
    assert "cosine schedule is re-planned over 30 epochs" in out
    step2 = [r for r in rows(run, "step") if r["step"] == 2][0]
    from dynbatch.train.schedules import scheduled_lr

    assert step2["lr"] == pytest.approx(scheduled_lr(2.0, base_lr=0.05, schedule="cosine", epochs=30))
    rc, out, _ = run_cli(capsys, "train", "--resume", run, "--epochs", "30")
    assert rc == 0 and "nothing to do" in out


# ---- metrics.jsonl --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "missing", "garbled"])
def test_damaged_metrics_are_refused_never_padded(tmp_path, capsys, damage):
    """Defect 3: an emptied or truncated metrics.jsonl was padded with NUL bytes on resume, exit 0."""
    run = tmp_path / "r"
    assert run_cli(capsys, "train", "--out", run, "--epochs", "2", *TINY, "--stop-after-steps", "4")[0] == 0
    m = run / "metrics.jsonl"
    data = m.read_bytes()
    if damage == "empty":
        m.write_bytes(b"")
    elif damage == "truncated":
        m.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        m.unlink()
    else:
        m.write_bytes(b"x" * len(data))
    before = snapshot(run)
    rc, _, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line_error(rc, err, "metrics.jsonl")
    assert "--overwrite" in err
    assert snapshot(run) == before
    assert b"\x00" not in (m.read_bytes() if m.exists() else b"")


# ---- divergence -----------------------------------------------------------------------------------------------
def test_huge_learning_rate_stops_with_a_clear_error(tmp_path, capsys):
    """Defect 4: --lr 1e6 gave NaN rows, NaN checkpoints and 'done ... exit 0'."""
    run = tmp_path / "r"
    rc, _, err = run_cli(capsys, "train", "--out", run, "--epochs", "3", "--lr", "1e6", *TINY)
    assert_one_line_error(rc, err, "training diverged", code=3)
    assert "--lr" in err
    if (run / "checkpoint.pt").exists():
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _trainer(tmp_path, **kw) -> Trainer:
    cfg = TrainConfig(train_samples=60, batch_size=20, epochs=3, progress=False, util_interval=5.0, **kw)
    return Trainer.new(cfg, tmp_path / "run", log=lambda m: None)


def _poison_from(trainer: Trainer, step: int, until: int | None = None):
    """Make the training loss NaN from ``step`` (to ``until``, exclusive): a divergence at a known step."""
    clean = trainer.loss_fn

    def loss_fn(logits, y):
        losses = clean(logits, y)
        if step <= trainer.step and (until is None or trainer.step < until):
            losses = losses * float("nan")
        return losses

    trainer.ctx.loss_fn = loss_fn  # the step's loss function (the trainer's evaluation keeps its own)


def test_divergence_keeps_the_last_checkpoint_and_the_weights_finite(tmp_path):
    t = _trainer(tmp_path)
    _poison_from(t, step=4)  # epochs end after steps 2 and 5: the checkpoint of epoch 1 is the last good one
    ckpt = t.out / "checkpoint.pt"
    with pytest.raises(Diverged, match=r"at step 4 .*checkpoint \(step 3\) is intact"):
        t.run()
    state = torch.load(ckpt, weights_only=True)
    assert state["progress"]["step"] == 3
    for v in (*t.model.state_dict().values(), *state["model"].values()):
        if v.is_floating_point():
            assert torch.isfinite(v).all()


def test_skip_mode_skips_counts_and_undoes_buffer_updates(tmp_path):
    t = _trainer(tmp_path, on_nonfinite="skip")
    _poison_from(t, step=1, until=3)
    summary = t.run()
    assert summary["interrupted"] is None
    skipped = {r["step"]: r.get("nonfinite_skipped") for r in rows(t.out, "step")}
    assert skipped[1] == skipped[2] == 1 and skipped[0] is None and skipped[3] is None
    for v in t.model.state_dict().values():  # BatchNorm running statistics included
        if v.is_floating_point():
            assert torch.isfinite(v).all()


def test_skip_mode_stops_after_the_limit(tmp_path):
    t = _trainer(tmp_path, on_nonfinite="skip", nonfinite_limit=3)
    _poison_from(t, step=1)
    with pytest.raises(Diverged, match="for 3 steps in a row"):
        t.run()


# ---- safe loading ------------------------------------------------------------------------------------------------
class _Planted:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["DYNBATCH_PLANTED_MARKER"]), "ran"))


def test_planted_checkpoint_runs_no_code(tmp_path, capsys, monkeypatch):
    """Defect 5: resume loaded checkpoints with weights_only=False."""
    run = tmp_path / "r"
    assert run_cli(capsys, "train", "--out", run, "--epochs", "1", *TINY)[0] == 0
    marker = tmp_path / "marker"
    monkeypatch.setenv("DYNBATCH_PLANTED_MARKER", str(marker))
    torch.save({"version": 2, "model": _Planted()}, run / "checkpoint.pt")
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run)[::2], "refusing")
    assert not marker.exists()


# ---- the lock ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_running_run_cannot_be_resumed_or_overwritten(tmp_path, capsys):
    """Defect 9: resuming a run still training gave exit 0 from both and duplicated rows."""
    run = tmp_path / "r"
    p = spawn("train", "--out", run, "--epochs", "200", *TINY)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoint.pt").exists():
            time.sleep(0.2)
        assert (run / "checkpoint.pt").exists(), p.stderr.read() if p.poll() is not None else "no checkpoint"
        assert_one_line_error(*run_cli(capsys, "train", "--resume", run)[::2], "in use by another dynbatch process")
        assert_one_line_error(*run_cli(capsys, "train", "--out", run, "--overwrite", *TINY)[::2], "in use")
        assert (run / "config.json").exists()
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    assert run_cli(capsys, "train", "--resume", run, "--stop-after-steps", "1")[0] == 0
    steps = [r["step"] for r in rows(run, "step")]
    assert steps == sorted(set(steps))  # no duplicated rows


# ---- full disk -----------------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """Defect 6: a full disk left .checkpoint.pt.tmp behind and ended in a traceback."""
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "3m")  # a PreResNet-20 checkpoint is ~2.2 MB: the second one cannot be staged
    try:
        if not mounted:  # no privilege to mount: a filesystem-size shim on checkpoint writes
            real = torch.save
            calls = {"n": 0}

            def small_disk(obj, f, *a, **k):
                calls["n"] += 1
                if calls["n"] > 1:
                    f.write(b"x" * 1000)
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(obj, f, *a, **k)

            monkeypatch.setattr(torch, "save", small_disk)
        run = disk / "r"
        rc, _, err = run_cli(capsys, "train", "--out", run, "--epochs", "3", *TINY)
        assert_one_line_error(rc, err, "the disk is full", code=1)
        assert "--resume" in err
        assert sorted(p.name for p in run.iterdir()) == [run_folder.LOCK, "checkpoint.pt", "config.json",
                                                          "metrics.jsonl"]
        first = torch.load(run / "checkpoint.pt", weights_only=True)
        assert first["progress"]["epoch"] == 1
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        else:
            monkeypatch.undo()
        assert run_cli(capsys, "train", "--resume", run)[0] == 0
        assert [r["epoch"] for r in rows(run, "epoch")] == [0, 1, 2]
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)])


# ---- output, restarts ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_closed_stdout_does_not_stop_the_run(tmp_path):
    """Defect 6: `dynbatch train ... | head -1` ended in BrokenPipeError and an unresumable folder."""
    run = tmp_path / "r"
    p = spawn("train", "--out", run, "--epochs", "3", *TINY)
    p.stdout.readline()
    p.stdout.close()  # what `| head -1` does after its line
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert [r["epoch"] for r in rows(run, "epoch")] == [0, 1, 2]


def test_a_run_stopped_before_its_first_checkpoint_can_start_again(tmp_path, capsys):
    """Defect 7: --resume pointed at --out and --out pointed at --resume."""
    run = tmp_path / "r"
    assert run_cli(capsys, "train", "--out", run, "--epochs", "1", *TINY)[0] == 0
    (run / "checkpoint.pt").unlink()  # what a kill before the first epoch end leaves
    assert_one_line_error(*run_cli(capsys, "train", "--resume", run)[::2], "--overwrite")
    assert_one_line_error(*run_cli(capsys, "train", "--out", run, "--epochs", "1", *TINY)[::2], "--overwrite")
    assert run_cli(capsys, "train", "--out", run, "--epochs", "1", *TINY, "--autoresume")[0] == 0
    assert (run / "checkpoint.pt").is_file() and len(rows(run, "epoch")) == 1


def test_autoresume_starts_continues_and_refuses_other_settings(tmp_path, capsys):
    run = tmp_path / "r"
    cmd = ("train", "--out", run, "--epochs", "2", *TINY, "--autoresume")
    assert run_cli(capsys, *cmd, "--stop-after-steps", "4")[0] == 0
    rc, out, _ = run_cli(capsys, *cmd)
    assert rc == 0 and "resuming" in out
    assert [r["step"] for r in rows(run, "step")] == list(range(6))
    rc, _, err = run_cli(capsys, "train", "--out", run, "--epochs", "2", *TINY, "--lr", "0.01", "--autoresume")
    assert_one_line_error(rc, err, "other settings (lr: 0.05 there, 0.01 now)")


def test_autoresume_continues_a_run_written_before_a_setting_existed(tmp_path, capsys):
    """A setting added to dynbatch after a run started compares as its default: the run still continues."""
    run = tmp_path / "r"
    cmd = ("train", "--out", run, "--epochs", "2", *TINY, "--autoresume")
    assert run_cli(capsys, *cmd, "--stop-after-steps", "4")[0] == 0
    saved = json.loads((run / "config.json").read_text())
    del saved["config"]["pad_mode"], saved["config"]["lookahead"]  # as an older dynbatch wrote it
    (run / "config.json").write_text(json.dumps(saved))
    rc, out, _ = run_cli(capsys, *cmd)
    assert rc == 0 and "resuming" in out


def _torchrun(*argv, max_restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "-m", "dynbatch", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_torchrun_max_restarts_with_autoresume_recovers_a_killed_rank(tmp_path, tiny_npz):
    """Killing one of two gloo ranks at a random step: torchrun reruns the same command, --autoresume continues
    the run, and its metrics equal an uninterrupted run's."""
    import psutil

    args = ("train", "--data", f"npz:{tiny_npz}", "--model", "preresnet20_gn", "--batch-size", "16", "--epochs", "4",
            "--no-progress", "--util-interval", "5", "--no-augment")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    p = _torchrun(*args, "--out", clean)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    kill_at = int(torch.randint(7, 20, (1,)).item())  # 6 steps an epoch: after the first checkpoint, mid-epoch
    p = _torchrun(*args, "--out", killed, "--autoresume", max_restarts=1)
    deadline = time.time() + 300
    while time.time() < deadline:
        m = killed / "metrics.jsonl"
        if m.exists() and sum(1 for line in m.read_text().splitlines() if '"step"' in line) >= kill_at:
            break
        time.sleep(0.05)
    workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "dynbatch" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].kill()
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert "resuming" in out
    for kind in ("step", "epoch"):
        assert without_timing(rows(killed, kind)) == without_timing(rows(clean, kind))


# ---- fault injection -------------------------------------------------------------------------------------------
KILL_IN_CHECKPOINT = """
import os, signal, sys
import torch
real = torch.save
def save(obj, f, *a, **k):  # write part of the checkpoint, then die as kill -9 would
    if hasattr(f, "write") and os.environ.get("DIE_IN_CHECKPOINT") == "1":
        real(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
torch.set_num_threads(2)  # as the in-process reference run (conftest): thread counts change rounding
from dynbatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("policy, faults", [
    ((), ["term", "int", "kill", "ckpt"] * 2),
    # The policies with state of their own beside the model's (InfoBatch's score table, the proxy's network and
    # optimizer): one fault of each kind.
    (("--policy", "infobatch", "--ib-delta", "0.25"), ["term", "int", "kill", "ckpt"]),
    (("--policy", "proxy", "--proxy-every", "2"), ["term", "int", "kill", "ckpt"]),
], ids=["fixed", "infobatch", "proxy"])
def test_fault_injection_every_resume_matches_an_uninterrupted_run(tmp_path, capsys, policy, faults):
    """Interruptions at seeded random moments, by SIGTERM, SIGINT and kill -9, some inside a checkpoint write (eight
    for fixed, four for the policies with their own state: each costs a process start, and the suite has a 15-minute
    budget); after each, the run resumes, and in the end every row equals an uninterrupted run's."""
    import random

    args = ("--epochs", "8", "--train-samples", "60", "--batch-size", "12", *FAST, *policy)  # 5 steps an epoch
    clean, run = tmp_path / "clean", tmp_path / "faulty"
    assert run_cli(capsys, "train", "--out", clean, *args)[0] == 0
    reference = {k: without_timing(rows(clean, k)) for k in ("step", "epoch")}
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(KILL_IN_CHECKPOINT)
    rng = random.Random(1234)
    rng.shuffle(faults)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    landed = 0
    m = run / "metrics.jsonl"
    for fault in faults:
        # The same command every time, as a scheduler reruns it: --autoresume starts, restarts or resumes.
        p = subprocess.Popen([sys.executable, str(wrapper), "train", "--out", str(run), *args, "--autoresume"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**env, "DIE_IN_CHECKPOINT": "1" if fault == "ckpt" else "0"})
        if fault != "ckpt":
            target = (len(m.read_bytes().splitlines()) if m.exists() else 0) + rng.randint(1, 6)
            deadline = time.time() + 120
            while time.time() < deadline and p.poll() is None:
                if m.exists() and len(m.read_bytes().splitlines()) >= target:
                    break
                time.sleep(0.01)
            if p.poll() is None:
                p.send_signal({"term": signal.SIGTERM, "int": signal.SIGINT, "kill": signal.SIGKILL}[fault])
        _, err = p.communicate(timeout=180)
        assert "Traceback" not in err, err
        if p.returncode == 0:  # the run finished before this fault could land
            break
        assert p.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGKILL), (fault, err)
        landed += 1
        # What the run has written so far is a prefix of the uninterrupted run (rows past the last checkpoint
        # included: they are cut on resume and computed again identically).
        so_far = without_timing([r for r in run_folder.read_metrics(run) if r["kind"] == "step"])
        assert so_far == reference["step"][: len(so_far)]
    assert landed >= len(faults) - 2
    assert run_cli(capsys, "train", "--out", run, *args, "--autoresume")[0] == 0
    for kind in ("step", "epoch"):
        assert without_timing(rows(run, kind)) == reference[kind]


@pytest.mark.parametrize("mode", ["every-epoch", "on-resize"])
def test_redrawn_subset_resumes_exactly_and_counts_distinct_images(tmp_path, capsys, mode):
    """--redraw-subset (a protocol reading): new subsets at epoch boundaries, recorded, and resumed exactly."""
    args = ["--train-samples", "60", "--batch-size", "20", "--epochs", "4", "--redraw-subset", mode, "--no-progress"]
    if mode == "on-resize":
        args += ["--policy", "edba", "--bs-rule", "share", "--subsets", "64", "--bs-min", "10"]
    run_cli(capsys, "train", *args, "--out", tmp_path / "a")
    run_cli(capsys, "train", *args, "--out", tmp_path / "b", "--stop-after-steps", "4")
    run_cli(capsys, "train", "--resume", tmp_path / "b")
    for kind in ("step", "epoch"):
        assert without_timing(rows(tmp_path / "a", kind)) == without_timing(rows(tmp_path / "b", kind))
    distinct = [r["distinct_train_images"] for r in rows(tmp_path / "a", "epoch")]
    assert distinct[0] == 60 and distinct == sorted(distinct)
    if mode == "every-epoch":
        assert distinct[-1] > 150  # four draws of 60 from the digits' ~1,400 training images
