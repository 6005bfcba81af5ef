"""The online selection methods (importance, selective-backprop, small-loss, consensus): their pure rules, their
runs from the CLI with label noise (exact resume, the rows' label precision), and their one-line errors."""
import contextlib
import json
import runpy
import sys

import pytest
import torch

from cli_helpers import REPO, assert_one_line_error, example_diff, rows, run_cli, without_timing
from dynbatch.methods.base import ForwardStep, Plan, StepContext
from dynbatch.methods.consensus import consensus_mask
from dynbatch.methods.importance import ImportanceSampler, importance_draw, tau_of
from dynbatch.methods.selective_backprop import SelectiveBackprop, keep_mask, keep_probability
from dynbatch.methods.small_loss import SmallLoss, SmallLossOptions, forget_rate_at, kept_count
from dynbatch.ops import seeded_uniform

METHODS = ("importance", "selective-backprop", "small-loss", "consensus")


# ---- the pure rules ----------------------------------------------------------------------------------------------
def test_small_loss_ramps_the_forget_rate_and_keeps_the_lowest_losses():
    o = SmallLossOptions(forget_rate=0.4, ramp_epochs=10)
    assert [forget_rate_at(t, o) for t in (0, 5, 10, 30)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert kept_count(10, 0.4) == 6 and kept_count(1, 0.99) == 1
    losses = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0])
    assert sorted(SmallLoss(forget_rate=0.4, ramp_epochs=1).select(losses, epoch=3).tolist()) == [1, 2, 3]


def test_selective_backprop_keeps_by_percentile_power():
    history = torch.arange(100, dtype=torch.float32)
    p = keep_probability(torch.tensor([-1.0, 49.5, 1000.0]), history, beta=2.0)
    assert p.tolist() == pytest.approx([0.0, 0.25, 1.0])
    nothing = keep_mask(torch.zeros(4), torch.full((4,), 0.5), torch.tensor([1.0, 3.0, 2.0, 0.0]))
    assert nothing.tolist() == [False, True, False, False]  # the highest loss, never an empty step
    # beta = 1 keeps about half of exchangeable losses; the draws are a function of the seed alone
    sb = SelectiveBackprop(sb_beta=1.0, sb_history=4096)
    g = torch.Generator().manual_seed(0)
    kept = [sb.select(torch.rand(256, generator=g), seed=s).float().mean().item() for s in range(20)]
    assert 0.45 < sum(kept) / len(kept) < 0.55
    again = SelectiveBackprop(sb_beta=1.0, sb_history=4096)
    again.load_state_dict(sb.state_dict())
    x = torch.rand(64, generator=g)
    assert torch.equal(sb.select(x, seed=99), again.select(x, seed=99))


def test_importance_draw_is_proportional_and_unbiased():
    scores = torch.tensor([1.0, 3.0, 0.0, 6.0])
    losses = torch.tensor([2.0, 1.0, 7.0, 0.5])
    u = seeded_uniform(5, 200_000)
    rows, weight, p = importance_draw(scores, u.numel(), u)
    share = torch.bincount(rows, minlength=4).float() / u.numel()
    torch.testing.assert_close(share, torch.tensor([0.1, 0.3, 0.0, 0.6]), rtol=0, atol=5e-3)
    assert (weight * losses[rows]).mean().item() == pytest.approx((losses * (scores > 0)).mean().item(), rel=1e-2)
    assert tau_of(torch.full((8,), 1 / 8)).item() == pytest.approx(1.0)
    assert tau_of(torch.tensor([0.97, 0.01, 0.01, 0.01])).item() > 1.5


def test_importance_switches_on_past_the_cost_model_threshold():
    s = ImportanceSampler(128)  # presample 3: B = 384, tau_th = (384 + 384) / 384 = 2
    assert s.presample_size == 384 and s.threshold == pytest.approx(2.0) and not s.on
    rows, weight, tau = s.select(torch.ones(384), seed=1)
    assert weight is None and torch.equal(rows, torch.arange(128)) and tau.item() == pytest.approx(1.0)
    s.advance(3.0)
    assert s.on
    rows, weight, _ = s.select(torch.rand(384), seed=1)
    assert rows.shape == weight.shape == (128,)


def test_consensus_mask_threshold_share_and_never_empty():
    c = torch.tensor([0.5, -0.2, 0.1, -0.9])
    assert consensus_mask(c, 0.0).tolist() == [True, False, True, False]
    assert consensus_mask(c, 0.0, keep=0.25).tolist() == [True, False, False, False]
    assert consensus_mask(-c.abs() - 0.1, 0.0).sum() == 1


def test_class_consensus_never_rejects_on_non_negative_features():
    """Why --by-class ranks with --consensus-keep: two residuals of one label c have e_i . e_j = (1 - p_ic)(1 - p_jc)
    + sum over k != c of p_ik p_jk >= 0, and ReLU features a_i . a_j >= 0, so every pair term of c_i is >= 0 and
    threshold 0 keeps every sample that shares its label with another in the batch (the noisy study's
    consensus-class runs train on all they draw)."""
    from dynbatch.methods.consensus import ConsensusFilter
    from dynbatch.ops import sample_scores

    g = torch.Generator().manual_seed(0)
    features, logits = torch.randn(37, 19, generator=g), 3 * torch.randn(37, 7, generator=g)
    y = torch.randint(0, 7, (37,), generator=g)
    relu = sample_scores(logits, y, features.relu(), by_class=True, backend="torch")
    alone = torch.bincount(y, minlength=7)[y] == 1  # no other sample of its class: G_k - g_i = 0, c_i = 0
    assert alone.any() and relu.class_consensus.min() >= 0
    assert torch.equal(ConsensusFilter(by_class=True).select(relu), ~alone)
    assert ConsensusFilter(by_class=True, consensus_keep=0.5).select(relu).sum() == 18  # round(18.5), a share
    signed = sample_scores(logits, y, features, by_class=True, backend="torch")
    assert (signed.class_consensus < 0).any()  # the property is the features' sign, not the op's


# ---- the label precision of a step, on a hand-built batch --------------------------------------------------------
def test_mislabeled_fractions_of_a_hand_built_batch():
    from dynbatch.train.executor import PlanExecutor
    from dynbatch.train.metrics import Clock, MetricsSink, PendingStep

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ex = PlanExecutor(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    flags = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1], dtype=torch.bool)  # 4 of 8 mislabeled
    ctx = StepContext(model=model, loss_fn=lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none"),
                      autocast=contextlib.nullcontext, device=torch.device("cpu"), mislabeled=flags)
    rows_kept = torch.tensor([0, 2, 3])  # 2 of the 3 trained on are mislabeled
    plan = Plan([ForwardStep(x[rows_kept], y[rows_kept], rows=rows_kept),
                 ForwardStep(x[4:6], y[4:6], rows=slice(4, 6))])  # 0 of 2
    outcome = ex.run(plan, ctx, 0.1)
    written = []

    class Writer:
        def write(self, kind, row):
            written.append(row)

    sink = MetricsSink(Writer(), [], Clock(torch.device("cpu")))
    sink.queue(PendingStep(0, 0, 8, 8, 0.1, 8, 0.0, {}, outcome.parts, 0.0, 0.0))
    list(sink.flush())
    assert written[0]["mislabeled_batch"] == 0.5
    assert written[0]["mislabeled_trained"] == pytest.approx(2 / 5)


# ---- the methods from the CLI ------------------------------------------------------------------------------------
def _args(npz, out, method, *extra):
    return ("train", "--data", f"npz:{npz}", "--out", out, "--policy", method, "--model", "preresnet20",
            "--batch-size", "16", "--epochs", "2", "--label-noise", "symmetric:0.4", "--no-progress",
            "--util-interval", "5", *extra)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_with_label_noise_and_resumes_exactly(tmp_path, capsys, tiny_npz, method):
    extra = ("--by-class",) if method == "consensus" else ()
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, *_args(tiny_npz, a, method, *extra))[0] == 0
    assert run_cli(capsys, *_args(tiny_npz, b, method, *extra), "--stop-after-steps", "3")[0] == 0
    assert run_cli(capsys, "train", "--resume", b)[0] == 0
    steps = rows(a, "step")
    assert without_timing(steps) == without_timing(rows(b, "step"))
    for r in steps:
        assert 1 <= r["kept"] <= r["batch_size"] and r["trained_samples"] == min(r["kept"], 16)
        assert 0 <= r["mislabeled_trained"] <= 1 and 0 <= r["mislabeled_batch"] <= 1
    drawn = sum(r["mislabeled_batch"] * r["batch_size"] for r in steps) / sum(r["batch_size"] for r in steps)
    measured = json.loads((a / "config.json").read_text())["label_noise"]["measured"]
    assert drawn == pytest.approx(measured)  # every image drawn once an epoch


@pytest.mark.parametrize("argv, needle", [
    (("--policy", "small-loss", "--by-class"), "--by-class is an option of --policy consensus"),
    (("--policy", "small-loss", "--forget-rate", "1"), "--forget-rate must be in [0, 1)"),
    (("--policy", "consensus", "--consensus-keep", "0"), "--consensus-keep must be in (0, 1]"),
    (("--policy", "importance", "--presample", "0.5"), "--presample must be in [1, 64]"),
    (("--policy", "selective-backprop", "--sb-beta", "0"), "--sb-beta must be positive"),
    (("--policy", "fixed", "--selection-control"), "--selection-control needs a selection policy"),
])
def test_bad_method_options_are_one_line(tmp_path, capsys, argv, needle):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", *argv)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["importance_loop.py", "selective_backprop_loop.py", "small_loss_loop.py",
                                  "consensus_loop.py", "infobatch_loop.py", "proxy_loop.py"])
def test_each_method_example_runs_and_differs_from_the_plain_loop_by_at_most_fifteen_lines(name, capsys,
                                                                                            monkeypatch):
    changed = example_diff(name)
    assert 0 < len(changed) <= 15, changed
    # In this process (the EDBA example's test runs them as scripts): a process start costs more than 3 steps.
    monkeypatch.setattr(sys, "argv", [name, "--steps", "3"])
    runpy.run_path(str(REPO / "examples" / name), run_name="__main__")
    assert "step 3: loss" in capsys.readouterr().out


def test_auroc_is_the_pairwise_probability():
    from dynbatch.train.checkpoint_scores import auroc

    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (60,), generator=g).numpy().astype(float)  # many ties
    positive = (torch.rand(60, generator=g) < 0.3).numpy()
    pos, neg = score[positive], score[~positive]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(score, positive) == pytest.approx(pairs)
    assert auroc(score, positive & False) is None


@pytest.mark.slow
def test_score_writes_every_sample_and_the_noise_aurocs(tmp_path, capsys, tiny_npz):
    import numpy as np

    run = tmp_path / "r"
    assert run_cli(capsys, *_args(tiny_npz, run, "fixed"), "--epochs", "1")[0] == 0
    rc, out, _ = run_cli(capsys, "score", run, "--batch", "40")
    assert rc == 0 and "AUROC class_consensus" in out
    arrays = np.load(run / "scores" / "step-6.npz")
    summary = json.loads((run / "scores" / "step-6.json").read_text())
    assert arrays["loss"].shape == (96,) and arrays["mislabeled"].mean() == pytest.approx(summary["mislabeled"])
    assert set(summary["auroc"]) == {"loss", "residual_norm", "grad_norm", "feature_norm", "agreement", "consensus",
                                     "class_agreement", "class_consensus"}
    assert all(0 <= v <= 1 for v in summary["auroc"].values())
    # the feature norm is ||g|| / ||e||: the head's input with its bias column, so never below 1
    assert np.allclose(arrays["feature_norm"] * arrays["residual_norm"], arrays["grad_norm"], rtol=1e-5)
    assert arrays["feature_norm"].min() >= 1 - 1e-5
    assert (arrays["label"] != arrays["clean_label"]).tolist() == arrays["mislabeled"].tolist()
    assert run_cli(capsys, "train", "--resume", run, "--epochs", "2")[0] == 0  # the run is left resumable
    assert_one_line_error(*run_cli(capsys, "score", tmp_path / "none")[::2], "holds no checkpoint.pt")


def test_the_random_control_trains_on_as_many_samples_as_the_method_chose(tmp_path, capsys, tiny_npz):
    method, control = tmp_path / "method", tmp_path / "control"
    args = ("--forget-rate", "0.5", "--ramp-epochs", "1")
    assert run_cli(capsys, *_args(tiny_npz, method, "small-loss", *args))[0] == 0
    assert run_cli(capsys, *_args(tiny_npz, control, "small-loss", *args, "--selection-control"))[0] == 0
    m, c = rows(method, "step"), rows(control, "step")
    assert [r["trained_samples"] for r in m] == [r["trained_samples"] for r in c]
    assert [r["mislabeled_trained"] for r in m] != [r["mislabeled_trained"] for r in c]
    epoch = rows(method, "epoch")[-1]  # the epoch's label precision, from its steps
    assert epoch["mislabeled_trained"] == pytest.approx(
        sum(r["mislabeled_trained"] * r["trained_samples"] for r in m if r["epoch"] == 1)
        / sum(r["trained_samples"] for r in m if r["epoch"] == 1))


@pytest.mark.parametrize("hyp_form", ["torch", "decoupled"])
@pytest.mark.parametrize("method, options", [("small-loss", {"forget_rate": 0.5, "ramp_epochs": 1}),
                                             ("edba", {"subsets": 64})])
def test_a_step_on_part_of_the_batch_scales_the_lr_only_in_the_decoupled_form(hyp_form, method, options):
    """Per example of a summed loss (decoupled), a step on k of B samples takes k / B of the full step's rate;
    in torch's form the rate is the schedule's whatever was kept."""
    from dynbatch.methods import policy_class
    from dynbatch.train.config import TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    b = 40
    cfg = TrainConfig(policy=method, batch_size=b, hyp_form=hyp_form, momentum=0.9, policy_options=options)
    policy = policy_class(method)(options, batch_size=b, config=cfg)
    ctx = StepContext(model=model, loss_fn=lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none"),
                      autocast=contextlib.nullcontext, device=torch.device("cpu"), epoch=1)
    x, y = torch.randn(b, 3, 2, 2), torch.randint(0, 3, (b,))
    (step,) = policy.plan(x, y, ctx).steps
    kept = step.y.shape[0]
    assert 0 < kept < b
    assert step.lr_scale == (kept / b if hyp_form == "decoupled" else 1.0)


def test_a_control_of_a_method_that_keeps_everything_is_the_same_step_in_another_order():
    """The study's A/A pair (consensus keeping every sample, and its random control): the control trains on the
    same rows, unweighted, at the same rate, only permuted, so a step's gradient differs by rounding alone (fp32:
    within 1e-5 relative; BatchNorm's batch statistics do not depend on the row order)."""
    from dynbatch.methods import policy_class
    from dynbatch.train.config import TrainConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 7))
    b, options = 37, {"consensus_keep": 1.0}
    ctx = StepContext(model=model, loss_fn=lambda z, t: torch.nn.functional.cross_entropy(z, t, reduction="none"),
                      autocast=contextlib.nullcontext, device=torch.device("cpu"), epoch=1, step=3, seed=5)
    x, y = torch.randn(b, 3, 6, 6), torch.randint(0, 7, (b,))
    steps = []
    for control in (False, True):
        cfg = TrainConfig(policy="consensus", batch_size=b, selection_control=control, policy_options=options)
        (step,) = policy_class("consensus")(options, batch_size=b, config=cfg).plan(x, y, ctx).steps
        steps.append(step)
    method, control = steps
    assert method.rows.tolist() == list(range(b)) and control.rows.tolist() != list(range(b))
    assert sorted(control.rows.tolist()) == list(range(b))
    assert method.sample_weight is None and control.sample_weight is None and method.lr_scale == control.lr_scale

    def gradient(step):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(step.x), step.y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g_method, g_control = gradient(method), gradient(control)
    assert (g_method - g_control).norm() <= 1e-5 * g_method.norm()
