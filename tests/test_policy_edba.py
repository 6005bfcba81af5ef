import pytest
import torch
from torch import nn

from cli_helpers import rows, run_cli
from dynbatch.errors import UserError
from dynbatch.models import build_model
from dynbatch.methods import ReuseStep, StepContext
from dynbatch.methods.edba import EDBAPolicy
from dynbatch.ops import random_subsets
from dynbatch.methods.edba import EDBAOptions, EDBAState, advance, next_batch_size

OPTS = dict(subsets=256, subset_mode="bernoulli", subset_p=0.5, ema_decay=0.9, margin_eps=1e-8, reuse_forward=False,
            bs_min=10, bs_max=1000, bs_factor=1.1, grow_below=0.05, shrink_above=0.05, selection_backend="auto")


def ctx_for(model, step=0):
    return StepContext(model=model, loss_fn=lambda z, y: nn.functional.cross_entropy(z, y, reduction="none"),
                       autocast=lambda: torch.autocast("cpu", enabled=False), device=torch.device("cpu"), step=step)


def test_batch_size_moves_in_the_intended_direction():
    o = EDBAOptions(**OPTS)
    assert next_batch_size(EDBAState(100), 5.0, o) == 100  # no trend yet
    s = EDBAState(100, loss_ema=1.0, grad_ema=0.1)
    assert next_batch_size(s, 1.5, o) == 91  # loss high (above trend): smaller
    assert next_batch_size(s, 0.5, o) == 110  # loss low (below trend): larger
    assert next_batch_size(s, 1.04, o) == 100  # within the thresholds: unchanged
    assert next_batch_size(EDBAState(10, 1.0, 0.1), 9.0, o) == 10  # floor
    assert next_batch_size(EDBAState(1000, 1.0, 0.1), 0.1, o) == 1000  # cap
    assert next_batch_size(EDBAState(11, 1.0, 0.1), 0.1, o) == 12  # always moves by at least one sample
    assert EDBAPolicy({**OPTS, "bs_min": 50}, batch_size=20).batch_size() == 50  # initial size clamped


def test_share_rule_follows_the_chosen_subsets_share_of_the_batch():
    o = EDBAOptions(**{**OPTS, "bs_rule": "share"})
    s = EDBAState(100, loss_ema=1.0, grad_ema=0.1)
    assert next_batch_size(s, 1.0, o, share=0.6) == 110  # most of the batch follows the trend: larger
    assert next_batch_size(s, 1.0, o, share=0.4) == 91  # a small part does: smaller
    assert next_batch_size(s, 1.0, o, share=0.5) == 100
    assert next_batch_size(EDBAState(100), 1.0, o, share=0.6) == 110  # needs no EMA
    assert advance(s, 1.0, 0.1, o, share=0.3).batch_size == 91


def test_share_rule_moves_the_batch_under_the_papers_optimizer(tmp_path, capsys):
    """Under lr 0.001 the loss rule holds the batch still for thousands of steps; the share rule moves it."""
    run_cli(capsys, "train", "--policy", "edba", "--bs-rule", "share", "--subsets", "256", "--train-samples", "400",
            "--epochs", "2", "--no-progress", "--out", tmp_path / "r")
    sizes = [r["policy_batch_size"] for r in rows(tmp_path / "r", "step")]
    assert len(set(sizes)) >= 3, sizes


def test_state_advances_after_the_choice_and_ignores_non_finite_steps():
    o = EDBAOptions(**OPTS)
    s = advance(EDBAState(100), 2.0, 0.5, o)
    assert s == EDBAState(100, 2.0, 0.5)  # the first step sets the EMAs
    s2 = advance(s, 1.0, 1.5, o)
    assert s2.loss_ema == pytest.approx(1.9) and s2.grad_ema == pytest.approx(0.6) and s2.batch_size == 110
    assert advance(s2, float("nan"), 1.0, o) == s2 and advance(s2, 1.0, float("inf"), o) == s2


def test_plan_trains_on_the_chosen_subset_and_leaves_buffers():
    torch.manual_seed(0)
    model = build_model("preresnet20", 10)
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 10, (40,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = EDBAPolicy(OPTS, batch_size=40)
    plan = p.plan(x, y, ctx_for(model, step=3))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no buffer, no weight moved
    (step,) = plan.steps
    mask = random_subsets(256, 40, seed=(0 << 32) + 3)[plan.record["subset_index"]]
    assert torch.equal(step.x, x[mask]) and torch.equal(step.y, y[mask])
    r = plan.record
    assert r["chosen_size"] == int(mask.sum()) > 0 and r["loss_ema"] is None  # first step: EMAs not yet set
    assert p.selector.state.loss_ema == pytest.approx(r["batch_loss"])
    assert p.selector.state.grad_ema == pytest.approx(r["grad_norm"])
    plan2 = p.plan(x, y, ctx_for(model, step=4))
    assert plan2.record["loss_ema"] == pytest.approx(r["batch_loss"]) and plan2.record["margin"] >= 0
    state = p.state_dict()
    q = EDBAPolicy(OPTS, batch_size=40)
    q.load_state_dict(state)
    assert q.state_dict() == state


def test_reuse_forward_masks_the_loss():
    torch.manual_seed(0)
    model = build_model("alexnet_cifar", 10).eval()  # eval: no dropout, so the forward is reproducible
    x, y = torch.randn(24, 3, 16, 16), torch.randint(0, 10, (24,))
    p = EDBAPolicy({**OPTS, "reuse_forward": True}, batch_size=24)
    (step,) = p.plan(x, y, ctx_for(model)).steps
    assert isinstance(step, ReuseStep) and step.losses.requires_grad
    with torch.no_grad():
        direct = nn.functional.cross_entropy(model(x), y, reduction="none")
    chosen = step.losses.detach()
    assert any(torch.allclose(chosen, direct[m]) for m in random_subsets(256, 24, seed=0) if m.sum() == len(chosen))


def test_model_without_linear_head_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError, match="no nn.Linear head"):
        EDBAPolicy(OPTS, batch_size=8).plan(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), ctx_for(model))


@pytest.mark.parametrize("args, needle", [
    (("--subsets", "0"), "--subsets must be in 1.."),
    (("--subsets", "2000000"), "--subsets must be in 1.."),
    (("--subset-mode", "gaussian"), "--subset-mode"),
    (("--bs-min", "50", "--bs-max", "20"), "--bs-min <= --bs-max"),
    (("--bs-factor", "0.9"), "--bs-factor must be above 1"),
])
def test_edba_bad_options(tmp_path, capsys, args, needle):
    rc, _, err = run_cli(capsys, "train", "--policy", "edba", "--out", tmp_path / "x", *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_edba_end_to_end_on_real_cifar(tmp_path, capsys, cifar_subset):
    out = tmp_path / "edba"
    rc, stdout, _ = run_cli(capsys, "train", "--policy", "edba", "--data", f"npz:{cifar_subset}", "--model",
                            "preresnet20", "--train-samples", "1000", "--epochs", "4", "--lr", "0.05",
                            "--subsets", "1024", "--out", out, "--no-progress")
    assert rc == 0, stdout
    steps, epochs = rows(out, "step"), rows(out, "epoch")
    sizes = {r["policy_batch_size"] for r in steps}
    assert len(sizes) > 1 and steps[0]["policy_batch_size"] == 100  # the batch size moved from its start
    assert all(0 < r["chosen_size"] <= r["batch_size"] for r in steps)
    assert all(r["trained_samples"] == r["chosen_size"] for r in steps)
    for k in ("margin", "grad_norm", "loss_ema", "grad_ema", "selection_s", "subset_index"):
        assert k in steps[1]
    # Chance is 0.10 on the 1,017 test images (one standard error: 0.009); EDBA trains on ~half of each batch.
    assert epochs[-1]["test_acc"] > 0.15 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    # resume mid-run keeps the policy state
    rc, _, _ = run_cli(capsys, "train", "--resume", out, "--epochs", "5")
    assert rc == 0 and len(rows(out, "epoch")) == 5
