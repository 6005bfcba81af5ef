"""Micro-batching, out-of-memory recovery and gradient clearing in the plan executor."""
import copy

import pytest
import torch
from torch import nn

from dynbatch.methods import ForwardStep, Plan, StepContext
from dynbatch.train.executor import PlanExecutor

CE = lambda z, y: nn.functional.cross_entropy(z, y, reduction="none")  # noqa: E731


def ctx_for(model):
    return StepContext(model=model, loss_fn=CE, autocast=lambda: torch.autocast("cpu", enabled=False),
                       device=torch.device("cpu"))


class OOMAbove(nn.Module):
    """Raises torch.OutOfMemoryError for chunks larger than ``limit``, like a GPU that is too small."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.calls = inner, limit, []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {x.shape[0]} > {self.limit})")
        return self.inner(x)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def step_with(m, micro, x, y, momentum=0.9):
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
    ex = PlanExecutor(m, opt, micro)
    out = ex.run(Plan([ForwardStep(x, y)]), ctx_for(m), 0.1)
    return out, ex


@pytest.mark.parametrize("micro", [1, 3, 7, 29])
def test_accumulated_step_equals_one_shot(micro):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(29, 3, 2, 2, generator=g), torch.randint(0, 3, (29,), generator=g)
    a, b = model(), model()
    oa, _ = step_with(a, None, x, y)
    ob, _ = step_with(b, micro, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    (loss_a, correct_a, n_a, skipped_a), (loss_b, correct_b, n_b, skipped_b) = oa.stats.tolist(), ob.stats.tolist()
    assert loss_b == pytest.approx(loss_a, rel=1e-5) and n_a == n_b == 29 and correct_a == correct_b
    assert skipped_a == skipped_b == 0


def test_out_of_memory_halves_the_micro_batch_and_redoes_the_step():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, 2, 2, generator=g), torch.randint(0, 3, (40,), generator=g)
    ref = model()
    step_with(ref, None, x, y)
    wrapped = OOMAbove(model(), limit=12)
    out, ex = step_with(wrapped, None, x, y)
    # 40 fails, 20 fails, 10 fits: two retries, and the step equals the one-shot step (nothing half-applied).
    assert out.oom_retries == 2 and ex.micro_batch == 10 and len(out.events) == 2
    assert wrapped.calls == [40, 20, 10, 10, 10, 10]
    for p, q in zip(ref.parameters(), wrapped.inner.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # The smaller micro-batch sticks for later steps: no new retry.
    out2 = ex.run(Plan([ForwardStep(x, y)]), ctx_for(wrapped), 0.1)
    assert out2.oom_retries == 0


def test_out_of_memory_is_not_retried_forever():
    m = OOMAbove(model(), limit=0)
    before = copy.deepcopy(m.state_dict())
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    with pytest.raises(torch.OutOfMemoryError):
        step_with(m, None, x, y)
    assert m.calls == [8, 4, 2, 1]  # down to one sample, then give up
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # no step applied


def test_each_step_starts_from_cleared_gradients():
    """Two steps on the same batch move the parameters as two hand-written SGD steps do (no gradient carried over
    from the first step), and an optimizer that overrides ``zero_grad`` has its own called."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
    a, b = model(), model()
    ex = PlanExecutor(a, torch.optim.SGD(a.parameters(), lr=0.1))
    for _ in range(2):
        ex.run(Plan([ForwardStep(x, y)]), ctx_for(a), 0.1)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    class Counting(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none=True):
            Counting.calls += 1
            super().zero_grad(set_to_none)

    c = model()
    ex = PlanExecutor(c, Counting(c.parameters(), lr=0.1))
    ex.run(Plan([ForwardStep(x, y)]), ctx_for(c), 0.1)
    assert Counting.calls == 1
