"""The policies' ideas as components of a researcher's own loop: EDBASelector, choose_split, AdaBatchSchedule and
DynamicBatchSampler, the examples that use them, and the errors a Python user expects."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cli_helpers import REPO, example_diff
from selection_cases import select_subset
from dynbatch.methods import AdaBatchSchedule, DynamicBatchSampler, EDBAOptions, EDBASelector, EDBAState


class UserNet(nn.Module):
    """Not one of dynbatch's models: BatchNorm, and a head under a name of the user's choosing."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.classifier = nn.Linear(8, 5)

    def forward(self, x):
        return self.classifier(self.body(x))


def batch(b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 5, (b,), generator=g)


def test_edba_selector_on_a_user_model_leaves_buffers_and_matches_the_functional_api():
    torch.manual_seed(0)
    model = UserNet()
    x, y = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = EDBASelector(model, batch_size=32, subsets=256, seed=3)
    assert sel.head is model.classifier
    sel.state = EDBAState(32, loss_ema=2.0, grad_ema=0.1)
    chosen = sel.select(x, y, step=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    # The same choice the functional API makes from the same forward.
    captured = {}
    h = model.classifier.register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0]))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    model.load_state_dict(before)
    loss = float(nn.functional.cross_entropy(logits, y, reduction="sum")) / 32
    ref = select_subset(logits, y, captured["h"], num_subsets=256, seed=(3 << 32) + 5, loss=loss, loss_ema=2.0,
                        grad_ema=0.1)
    assert int(chosen.index) == int(ref.index) and torch.equal(chosen.mask, ref.mask)
    assert sel.state.loss_ema == pytest.approx(0.9 * 2.0 + 0.1 * loss)  # advanced after the choice
    restored = EDBASelector(model, subsets=256)
    restored.load_state_dict(sel.state_dict())
    assert restored.state == sel.state


def test_the_policy_is_a_thin_user_of_the_selector():
    """EDBAPolicy and a bare EDBASelector make the same choice and reach the same state."""
    from dynbatch.methods import StepContext
    from dynbatch.methods.edba import EDBAPolicy

    torch.manual_seed(0)
    model = UserNet()
    x, y = batch(40, seed=1)
    policy = EDBAPolicy({"subsets": 128}, batch_size=40)
    ctx = StepContext(model=model, loss_fn=lambda z, t: nn.functional.cross_entropy(z, t, reduction="none"),
                      autocast=lambda: torch.autocast("cpu", enabled=False), device=torch.device("cpu"), step=7)
    bare = EDBASelector(model, batch_size=40, subsets=128)
    for step in (7, 8):
        ctx.step = step
        record = policy.plan(x, y, ctx).record
        assert int(bare.select(x, y, step=step).index) == record["subset_index"]
    assert bare.state == policy.selector.state


def test_library_errors_are_value_errors():
    """A library user never typed a flag: errors name the field; the CLI says the flag (tests/test_bad_input.py)."""
    with pytest.raises(ValueError, match="^subsets must be in") as e:
        EDBASelector(UserNet(), subsets=0)
    assert e.value.for_cli().startswith("--subsets must be in")
    with pytest.raises(ValueError, match=r"^need 1 <= bs_min <= bs_max"):
        EDBASelector(UserNet(), bs_min=50, bs_max=20)
    with pytest.raises(ValueError, match=r"^batch_size 8192 exceeds max_batch 4096"):
        AdaBatchSchedule(8192)
    from dynbatch.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"^lr must be positive"):
        TrainConfig(lr=-1.0).validate()
    with pytest.raises(ValueError, match="no nn.Linear head"):
        EDBASelector(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())).head
    with pytest.raises(TypeError, match="no option"):
        EDBASelector(UserNet(), subset_count=5)


def test_options_are_typed_with_their_defaults_once():
    o = EDBAOptions()
    assert o.subsets == 4096 and o.bs_min == 10 and o.bs_max == 1000 and o.ema_decay == 0.9
    from dynbatch.cli import train_config

    assert train_config(policy="edba").policy_options == vars(o)  # the CLI's defaults are the dataclass's


def test_sampler_follows_the_selector_and_covers_the_epoch():
    torch.manual_seed(0)
    model = UserNet()
    x_all, y_all = batch(200, seed=2)
    selector = EDBASelector(model, batch_size=50, subsets=64, bs_min=10)
    sampler = DynamicBatchSampler(200, selector, seed=1)
    seen, sizes = [], []
    for step, idx in enumerate(sampler):
        assert len(idx) == min(selector.batch_size, 200 - len(seen))  # the size asked just before the batch
        sizes.append(len(idx))
        seen += idx
        selector.state = EDBAState(selector.batch_size + 10 * (step % 2) - 5)  # the selector moves the size
    assert sorted(seen) == list(range(200)) and len(set(sizes)) > 1
    sampler.set_epoch(1)
    assert list(sampler) != [seen[i:i + 50] for i in range(0, 200, 50)]  # a new permutation per epoch
    loader = DataLoader(TensorDataset(x_all, y_all), batch_sampler=DynamicBatchSampler(200, 64, shuffle=False))
    assert [len(b[1]) for b in loader] == [64, 64, 64, 8]


def test_sampler_follows_the_adabatch_schedule_by_epoch():
    schedule = AdaBatchSchedule(16, resize_every=1, max_batch=64)
    sampler = DynamicBatchSampler(128, schedule, drop_last=True)
    sizes = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        sizes.append({len(b) for b in sampler})
    assert sizes == [{16}, {32}, {64}, {64}] and len(sampler) == 2
    with pytest.raises(ValueError, match="empty"):
        DynamicBatchSampler(0, 8)
    with pytest.raises(ValueError, match="positive int"):
        DynamicBatchSampler(10, lambda: 0)


# ---- the examples --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_examples_run_and_differ_by_at_most_fifteen_lines():
    changed = example_diff("edba_loop.py")
    assert 0 < len(changed) <= 15, changed
    readme = (REPO / "README.md").read_text()
    for line in changed:  # the README shows this very difference
        assert line in readme, line
    last = {}
    for name in ("plain_loop.py", "edba_loop.py", "lightning_edba.py"):
        p = subprocess.run([sys.executable, str(REPO / "examples" / name), "--steps", "3"], capture_output=True,
                           text=True, timeout=300, cwd=REPO)
        assert p.returncode == 0 and "step 3: loss" in p.stdout, p.stderr[-2000:]
        last[name] = p.stdout.strip().splitlines()[-1]
    # Inside Lightning's training_step, EDBA trains exactly as in the plain loop: same loss, same next batch.
    assert last["lightning_edba.py"] == last["edba_loop.py"]
