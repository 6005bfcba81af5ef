import copy

import pytest
import torch
from torch import nn

from cli_helpers import rows, run_cli
from dynbatch.models import build_model
from dynbatch.methods import StepContext
from dynbatch.methods.split import SplitPolicy
from dynbatch.methods.split import candidate_forwards, choose_split, pick
from dynbatch.train.executor import PlanExecutor

OPTS = dict(base_batch=None, splits="1,2,4", criterion="min", split_update="sequential", split_clip=5.0,
            split_reuse_first=False)
CE = lambda z, y: nn.functional.cross_entropy(z, y, reduction="none")  # noqa: E731
NOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def ctx_for(model, step=0, seed=0):
    return StepContext(model=model, loss_fn=CE, autocast=NOCAST, device=torch.device("cpu"), step=step, seed=seed)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 5))


def data(b=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 4, 4, generator=g), torch.randint(0, 5, (b,), generator=g)


@pytest.mark.parametrize("criterion", ["min", "max"])
def test_choice_follows_recomputed_losses(criterion):
    torch.manual_seed(0)
    model = build_model("preresnet20", 5).train()  # BatchNorm, no dropout: deterministic, chunk-dependent losses
    x, y = data(16)
    p = SplitPolicy({**OPTS, "criterion": criterion}, batch_size=16)
    plan = p.plan(x, y, ctx_for(model))
    recomputed = {}
    for k in (1, 2, 4):
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            recomputed[k] = float(torch.cat([CE(fresh(xc), yc) for xc, yc in zip(x.chunk(k), y.chunk(k))]).mean())
    want = (min if criterion == "min" else max)(recomputed, key=recomputed.get)
    assert plan.record["chosen_split"] == want
    for k in (1, 2, 4):
        assert plan.record[f"cand_loss_{k}"] == pytest.approx(recomputed[k], rel=1e-5)
    assert len(plan.steps) == want and all(s.lr_scale == 1 / want for s in plan.steps)
    assert torch.equal(torch.cat([s.x for s in plan.steps]), x)


def test_candidates_leave_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = build_model("preresnet20", 5).train()
    before = copy.deepcopy(model.state_dict())
    x, y = data(16)
    candidate_forwards(model, x, y, (1, 2, 4), CE, NOCAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deterministic_candidates_without_batchnorm_tie():
    model = mlp()
    x, y = data(16)
    losses = candidate_forwards(model, x, y, (1, 2, 4), CE, NOCAST)
    means = [float(torch.cat(losses[k]).mean()) for k in (1, 2, 4)]
    assert max(means) - min(means) < 1e-6  # per-sample independent: every split scores the same


def _run(policy, model, x, y, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    PlanExecutor(model, opt).run(policy.plan(x, y, ctx_for(model)), ctx_for(model), lr)
    return model


@pytest.mark.parametrize("reuse", [False, True])
def test_sequential_update_is_k_sgd_steps_at_lr_over_k(reuse):
    x, y = data(16)
    p = SplitPolicy({**OPTS, "criterion": "random", "split_reuse_first": reuse}, batch_size=16)
    k = pick({1: 0, 2: 0, 4: 0}, p.options.criterion, seed=0, step=0)
    got = _run(p, mlp(), x, y, lr=0.3)
    manual = mlp()
    for xc, yc in zip(x.chunk(k), y.chunk(k)):
        manual.zero_grad()
        CE(manual(xc), yc).mean().backward()
        with torch.no_grad():
            for q in manual.parameters():
                q -= 0.3 / k * q.grad
    for a, b in zip(got.parameters(), manual.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_original_update_matches_hand_computation():
    x, y = data(16)
    clip = 0.05  # small enough that clipping really happens
    p = SplitPolicy({**OPTS, "splits": "4", "split_update": "original", "split_clip": clip}, batch_size=16)
    got = _run(p, mlp(), x, y, lr=0.5)
    w0 = mlp()
    grads = []
    for xc, yc in zip(x.chunk(4), y.chunk(4)):  # all at the pre-step weights
        w0.zero_grad()
        CE(w0(xc), yc).mean().backward()
        grads.append([q.grad.clone() for q in w0.parameters()])
    manual = [q.detach().clone() for q in mlp().parameters()]
    acc = [torch.zeros_like(q) for q in manual]
    clipped = 0
    for g in grads:
        acc = [a + gi for a, gi in zip(acc, g)]
        norm = torch.sqrt(sum((a ** 2).sum() for a in acc))
        if norm > clip:
            acc = [a * clip / (norm + 1e-6) for a in acc]
            clipped += 1
        manual = [q - 0.5 / 4 * a for q, a in zip(manual, acc)]
    assert clipped > 0
    for a, b in zip(got.parameters(), manual):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_random_criterion_is_seeded_and_uses_every_split():
    picks = [pick({1: 0.0, 2: 5.0, 4: 1.0}, "random", seed=3, step=s) for s in range(60)]
    assert set(picks) == {1, 2, 4}
    assert picks == [pick({1: 0.0, 2: 5.0, 4: 1.0}, "random", seed=3, step=s) for s in range(60)]


def test_choose_split_in_a_plain_loop_matches_the_policy():
    """The public function and the policy make the same choice from the same batch."""
    x, y = data(16)
    model = mlp()
    for criterion in ("min", "max"):
        k, scores = choose_split(model, x, y, splits=(1, 2, 4), criterion=criterion)
        p = SplitPolicy({**OPTS, "criterion": criterion}, batch_size=16)
        plan = p.plan(x, y, ctx_for(model))
        assert plan.record["chosen_split"] == k and len(plan.steps) == k
        assert plan.record["cand_loss_2"] == pytest.approx(scores[2])


def test_short_last_batch_is_one_plain_step():
    p = SplitPolicy(OPTS, batch_size=16)
    x, y = data(10)
    plan = p.plan(x, y, ctx_for(mlp()))
    assert len(plan.steps) == 1 and plan.record["chosen_split"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the stream path needs CUDA")
def test_stream_path_agrees_with_sequential_path():
    torch.manual_seed(0)
    model = build_model("preresnet20", 5).cuda().train()
    x, y = data(64)
    a = candidate_forwards(model, x.cuda(), y.cuda(), (1, 2, 4), CE, NOCAST)
    b = candidate_forwards(model.cpu(), x, y, (1, 2, 4), CE, NOCAST)
    for k in (1, 2, 4):
        torch.testing.assert_close(torch.cat(a[k]).cpu(), torch.cat(b[k]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, needle", [
    (("--splits", "1,3"), "must divide"),
    (("--splits", "a,b"), "comma-separated integers"),
    (("--criterion", "median"), "--criterion"),
    (("--split-update", "weird"), "--split-update"),
])
def test_split_bad_options(tmp_path, capsys, args, needle):
    rc, _, err = run_cli(capsys, "train", "--policy", "split", "--out", tmp_path / "x", *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_split_end_to_end_alexnet_on_real_cifar(tmp_path, capsys, cifar_subset):
    out = tmp_path / "split"
    rc, stdout, _ = run_cli(capsys, "train", "--policy", "split", "--model", "alexnet_cifar", "--data",
                            f"npz:{cifar_subset}", "--train-samples", "512", "--epochs", "1", "--base-batch", "128",
                            "--lr", "0.01", "--out", out, "--no-progress")
    assert rc == 0, stdout
    steps = rows(out, "step")
    assert len(steps) == 4 and all(r["chosen_split"] in (1, 2, 4) for r in steps)
    assert all({"cand_loss_1", "cand_loss_2", "cand_loss_4", "candidates_s"} <= set(r) for r in steps)
    assert all(r["trained_samples"] == 128 for r in steps)
