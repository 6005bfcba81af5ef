"""DDP with torchrun on CPU (gloo, 2 processes on loopback): equal to single-process training on the same global
batches, EDBA choosing one subset on every rank, resume, and the world-size guard."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import REPO, rows, run_cli, without_timing
from dynbatch.cli import main
from dynbatch.distributed import Dist
from dynbatch.train.trainer import Trainer

pytestmark = pytest.mark.slow
# GroupNorm: per-sample normalisation (SyncBatchNorm is CUDA-only). Weight comparisons run without augmentation:
# zero-padded random crops create activations exactly on ReLU kinks, where rounding-level differences between a
# 16-sample and two 8-sample backward passes flip a subgradient (measured: 2.8e-4 after 5 steps with crops, 1.2e-7
# without). The augmented batches themselves are identical, which the per-step losses below show. Precision is pinned
# to fp32: on a CPU with native bf16, `--amp auto` picks bf16 autocast, whose rounding (5e-4 in the second step's
# loss, measured on a Zen 4) is far above the fp32 level these comparisons are about.
COMMON = ("--model", "preresnet20_gn", "--batch-size", "16", "--epochs", "1", "--no-progress", "--util-interval", "5",
          "--amp", "none", "--channels-last", "off")
EXACT = (*COMMON, "--no-augment")


def torchrun(*argv, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "dynbatch", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def weights(run):
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if wa[k].is_floating_point():
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5, msg=k)
        else:
            assert torch.equal(wa[k], wb[k]), k


def test_fixed_policy_two_ranks_equal_one_process(tmp_path, capsys, tiny_npz):
    args = ("train", "--data", f"npz:{tiny_npz}", "--stop-after-steps", "5", *EXACT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert run_cli(capsys, *args, "--out", single)[0] == 0
    torchrun(*args, "--out", ddp)
    assert_same_weights(single, ddp)
    assert [r["batch_size"] for r in rows(ddp, "step")] == [16] * 5
    # With augmentation: the same augmented global batch (same loss at the shared initial weights), and
    # trajectories that stay together once a kink flip has moved them apart by rounding-level amounts.
    aug = ("train", "--data", f"npz:{tiny_npz}", "--stop-after-steps", "5", *COMMON)
    assert run_cli(capsys, *aug, "--out", tmp_path / "s_aug")[0] == 0
    torchrun(*aug, "--out", tmp_path / "d_aug")
    sa, da = rows(tmp_path / "s_aug", "step"), rows(tmp_path / "d_aug", "step")
    assert da[0]["train_loss"] == pytest.approx(sa[0]["train_loss"], rel=1e-6)
    assert [b["train_loss"] for b in da] == pytest.approx([a["train_loss"] for a in sa], rel=1e-3)


def test_edba_two_ranks_choose_the_single_process_subsets_and_resume(tmp_path, capsys, tiny_npz):
    args = ("train", "--data", f"npz:{tiny_npz}", "--policy", "edba", "--subsets", "512", *EXACT)
    single, ddp, resumed = tmp_path / "single", tmp_path / "ddp", tmp_path / "resumed"
    assert run_cli(capsys, *args, "--epochs", "1", "--out", single)[0] == 0
    # A disagreement between ranks raises inside the policy, so a clean exit means every rank chose alike.
    torchrun(*args, "--epochs", "1", "--out", ddp)
    pick = lambda run: [(r["subset_index"], r["chosen_size"], r["batch_size"]) for r in rows(run, "step")]  # noqa: E731
    assert pick(ddp) == pick(single)
    assert_same_weights(single, ddp)
    torchrun(*args, "--epochs", "1", "--out", resumed, "--stop-after-steps", "3")
    torchrun("train", "--resume", resumed)
    for kind in ("step", "epoch"):
        assert without_timing(rows(resumed, kind)) == without_timing(rows(ddp, kind))
    epoch = rows(ddp, "epoch")[0]
    assert "util_rank1_cpu_percent_mean" in epoch and "util_cpu_percent_mean" in epoch


def test_resume_refuses_another_world_size(tmp_path, capsys, tiny_npz):
    run = tmp_path / "ddp"
    torchrun("train", "--data", f"npz:{tiny_npz}", "--out", run, "--stop-after-steps", "2", *COMMON)
    rc, _, err = run_cli(capsys, "train", "--resume", run)
    assert rc == 2 and "trained on 2 process(es)" in err and len(err.strip().splitlines()) == 1


def test_ddp_gradients_keep_the_bucket_layout_by_default(tmp_path, tiny_npz):
    """Channels-last is the CPU default for convolutional models, decided before DDP builds its buckets: the
    1x1 convolution gradients then match the bucket strides, so DDP neither warns nor copies them each step (with
    contiguous weights on CPU it warned 'Grad strides do not match bucket view strides')."""
    out = torchrun("train", "--data", f"npz:{tiny_npz}", "--model", "preresnet20", "--batch-size", "16", "--epochs",
                   "1", "--stop-after-steps", "2", "--no-progress", "--out", tmp_path / "r")
    assert "Grad strides do not match" not in out.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["channels_last"] is True


def test_a_selection_method_two_ranks_choose_and_train_as_one_process(tmp_path, capsys, tiny_npz):
    """Importance sampling with a threshold low enough to sample by importance from the second step: every rank
    scores the gathered global batch, draws the same rows, trains on its share of them with their weights, and
    the executor's normalisation over ranks gives the single process's update."""
    args = ("train", "--data", f"npz:{tiny_npz}", "--policy", "importance", "--tau-threshold", "1.0001",
            "--label-noise", "pair:0.3", "--stop-after-steps", "4", *EXACT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert run_cli(capsys, *args, "--out", single)[0] == 0
    torchrun(*args, "--out", ddp)
    keys = ("kept", "importance_on", "mislabeled_batch", "mislabeled_trained", "trained_samples")
    assert [[r[k] for k in keys] for r in rows(ddp, "step")] == [[r[k] for k in keys] for r in rows(single, "step")]
    assert any(r["importance_on"] for r in rows(single, "step"))
    assert_same_weights(single, ddp)


def test_leaving_the_group_waits_for_every_rank_only_when_all_are_known_to_be_there(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: calls.append("destroy"))
    Dist(0, 2).close(all_ranks_here=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    Dist(0, 2).close()  # after an error a peer may never arrive: a barrier would hang until gloo's timeout
    assert calls == ["destroy"]


def test_the_trainer_waits_for_its_peers_after_training_but_not_after_an_error(tmp_path, capsys, tiny_npz,
                                                                              monkeypatch):
    closed = []
    monkeypatch.setattr(Dist, "close", lambda self, all_ranks_here=False: closed.append(all_ranks_here))
    args = ("train", "--data", f"npz:{tiny_npz}", *EXACT)
    assert run_cli(capsys, *args, "--stop-after-steps", "2", "--out", tmp_path / "a")[0] == 0
    assert run_cli(capsys, *args, "--out", tmp_path / "b")[0] == 0  # to the end of its epoch
    monkeypatch.setattr(Trainer, "_train_step", lambda self: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([str(a) for a in (*args, "--out", tmp_path / "c")])
    assert closed == [True, True, False]


@pytest.mark.parametrize("policy", [("infobatch", "--ib-delta", "0", "--epochs", "2"),
                                    ("proxy", "--proxy-every", "2", "--epochs", "1")], ids=["infobatch", "proxy"])
def test_infobatch_and_proxy_two_ranks_follow_one_process_and_resume(tmp_path, capsys, tiny_npz, policy):
    """InfoBatch: every rank holds the global table (the batch's losses gathered), so the ranks prune what one
    process prunes; the proxy: every rank filters the global batch with its own identical proxy."""
    args = ("train", "--data", f"npz:{tiny_npz}", "--policy", *policy, *EXACT)
    single, ddp, resumed = tmp_path / "single", tmp_path / "ddp", tmp_path / "resumed"
    assert run_cli(capsys, *args, "--out", single)[0] == 0
    torchrun(*args, "--out", ddp)
    s, d = rows(single, "step"), rows(ddp, "step")
    assert [r["trained_samples"] for r in d] == [r["trained_samples"] for r in s]
    assert [r["train_loss"] for r in d] == pytest.approx([r["train_loss"] for r in s], rel=1e-3)
    assert_same_weights(single, ddp)
    torchrun(*args, "--out", resumed, "--stop-after-steps", "4")
    torchrun("train", "--resume", resumed)
    for kind in ("step", "epoch"):
        assert without_timing(rows(resumed, kind)) == without_timing(rows(ddp, kind))
