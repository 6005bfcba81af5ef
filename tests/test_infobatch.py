"""InfoBatch (dynbatch.methods.infobatch) against the paper's statements: the epoch's expected gradient is the full
one, the last ceil(delta E) epochs see every sample, the first prunes nothing; r = 0 is the fixed policy; exact
resume mid-epoch and at an epoch's end; bad options are one line; the sampler's restriction keeps the stream."""
import itertools

import pytest
import torch

from cli_helpers import assert_one_line_error, rows, run_cli, without_timing
from dynbatch.data import VariableBatchSampler
from dynbatch.methods.infobatch import InfoBatch, full_epochs, prune


def test_expected_gradient_of_an_epoch_equals_the_full_one():
    """Exact expectation over every pruning outcome of a hand-built epoch: 6 samples of a linear softmax model, 3
    below the mean score, each pruned with probability r; sum over outcomes of P(outcome) x the weighted gradient,
    in float64 against the full epoch's gradient by autograd (tolerance 1e-12: rounding only)."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    losses = torch.nn.functional.cross_entropy(x @ w, y, reduction="none")
    grads = torch.stack([torch.autograd.grad(l, w, retain_graph=True)[0] for l in losses])  # (6, 4, 3)
    scores, r = torch.tensor([0.1, 2.0, 0.2, 3.0, 0.3, 1.5]), 0.75  # mean 1.18: rows 0, 2, 4 below; weight 4 exact
    expected = torch.zeros_like(w)
    for pruned in itertools.product([False, True], repeat=3):
        u = torch.ones(6)
        u[[0, 2, 4]] = torch.tensor([0.0 if p else 0.99 for p in pruned])
        keep, weight = prune(scores, r, u)
        assert keep.tolist() == [not pruned[0], True, not pruned[1], True, not pruned[2], True]
        prob = r ** sum(pruned) * (1 - r) ** (3 - sum(pruned))
        expected += prob * (keep.double() * weight.double())[:, None, None].mul(grads).sum(0)
    torch.testing.assert_close(expected, grads.sum(0), rtol=0, atol=1e-12)


def test_seeded_draws_prune_about_r_of_the_low_scores_and_weigh_the_kept_ones_up():
    ib = InfoBatch(4000, epochs=8, ib_ratio=0.5, seed=3)
    ib.scores = torch.arange(4000.0)  # 2,000 below the mean
    keep = ib.prune(1)
    assert 900 < ib.pruned < 1100 and ib.pruned + ib.rescaled == 2000 and int(keep.sum()) == 4000 - ib.pruned
    assert set(ib.weight.unique().tolist()) == {1.0, 2.0} and keep[2000:].all()
    again = InfoBatch(4000, epochs=8, ib_ratio=0.5, seed=3)
    again.scores = torch.arange(4000.0)
    assert torch.equal(again.prune(1), keep) and not torch.equal(again.prune(2), keep)  # a function of (seed, epoch)


@pytest.mark.parametrize("epochs, delta, full", [(10, 0.125, 2), (8, 0.125, 1), (1, 0.125, 1), (10, 0.0, 0),
                                                 (4, 1.0, 4)])
def test_the_last_ceil_delta_epochs_see_every_sample_unweighted(epochs, delta, full):
    assert full_epochs(epochs, delta) == full
    ib = InfoBatch(50, epochs=epochs, ib_delta=delta, seed=1)
    for epoch in range(epochs):
        ib.scores = torch.linspace(0, 1, 50)  # half below the mean: a pruning epoch prunes some
        keep = ib.prune(epoch)
        annealing = epoch >= epochs - full
        assert bool(keep.all()) == annealing and (ib.weight == 1).all() == annealing


def test_the_first_epoch_prunes_nothing_and_observe_records_the_losses():
    ib = InfoBatch(10, epochs=5, seed=0)
    assert ib.prune(0).all() and ib.pruned == 0
    weight = ib.observe(torch.tensor([2, 7]), torch.tensor([0.5, 3.0]))
    assert ib.scores[[2, 7]].tolist() == [0.5, 3.0] and weight.tolist() == [1.0, 1.0]


def test_restrict_keeps_the_order_and_the_generator_stream():
    a, b = VariableBatchSampler(12, seed=5), VariableBatchSampler(12, seed=5)
    keep = torch.tensor([i % 3 != 0 for i in range(12)])
    perm = a.perm.clone()
    a.restrict(keep)
    assert a.n == 8 and a.perm.tolist() == [i for i in perm.tolist() if i % 3 != 0]
    while not a.epoch_done:
        a.next(5)
    while not b.epoch_done:
        b.next(5)
    a.new_epoch(), b.new_epoch()  # the next epoch's permutation: the unrestricted stream's
    assert torch.equal(a.perm, b.perm)


# ---- from the CLI --------------------------------------------------------------------------------------------------
def _args(npz, out, *extra):
    return ("train", "--data", f"npz:{npz}", "--out", out, "--model", "preresnet20", "--batch-size", "16",
            "--epochs", "3", "--no-progress", "--util-interval", "5", "--amp", "none", *extra)


@pytest.mark.slow
def test_ratio_zero_writes_the_fixed_policy_rows(tmp_path, capsys, tiny_npz):
    fixed, ib = tmp_path / "fixed", tmp_path / "ib"
    assert run_cli(capsys, *_args(tiny_npz, fixed, "--epochs", "2"))[0] == 0
    assert run_cli(capsys, *_args(tiny_npz, ib, "--epochs", "2", "--policy", "infobatch", "--ib-ratio", "0"))[0] == 0
    def drop(rs):
        return [{k: v for k, v in r.items() if not k.startswith("ib_")} for r in without_timing(rs)]

    for kind in ("step", "epoch"):
        assert drop(rows(ib, kind)) == drop(rows(fixed, kind))


@pytest.mark.slow
@pytest.mark.parametrize("stop", [3, 6])  # mid-epoch 0; the end of epoch 0 (96 samples: 6 steps of 16)
def test_resume_continues_exactly(tmp_path, capsys, tiny_npz, stop):
    opts = ("--policy", "infobatch", "--ib-delta", "0.3", "--ib-ratio", "0.7")
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, *_args(tiny_npz, a, *opts))[0] == 0
    assert run_cli(capsys, *_args(tiny_npz, b, *opts), "--stop-after-steps", str(stop))[0] == 0
    assert run_cli(capsys, "train", "--resume", b)[0] == 0
    for kind in ("step", "epoch"):
        assert without_timing(rows(a, kind)) == without_timing(rows(b, kind))
    epochs = rows(a, "epoch")
    assert epochs[0]["ib_pruned"] == 0 and epochs[1]["ib_pruned"] > 0 and epochs[2]["ib_pruned"] == 0  # last: full
    assert epochs[1]["trained_samples"] == round(96 * (1 - epochs[1]["ib_pruned"]))
    assert epochs[1]["steps"] == -(-epochs[1]["trained_samples"] // 16)


@pytest.mark.parametrize("argv, needle", [
    (("--ib-ratio", "1"), "--ib-ratio must be in [0, 1)"),
    (("--ib-delta", "1.5"), "--ib-delta must be in [0, 1]"),
    (("--ib-initial", "nan"), "--ib-initial"),
    (("--train-samples", "50", "--redraw-subset", "every-epoch"), "drop --redraw-subset"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, needle):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", "--policy", "infobatch", *argv)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "r").exists()
