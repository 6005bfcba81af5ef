"""Suite 3: time per training step of every policy, as overhead against the fixed policy at the same batch.

Each step is what the trainer does per loader batch: the policy's plan (selection, candidates) and its
execution (forward, backward, optimizer step), on CIFAR-shaped inputs with the policy's CLI defaults. EDBA is
pinned to the loader batch under test (its adaptation would otherwise move it).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from .common import DEVICE, FULL, run
from dynbatch.cli import train_config
from dynbatch.models import build_model
from dynbatch.methods import StepContext
from dynbatch.train import precision
from dynbatch.train.executor import PlanExecutor

# split_reuse: split with --split-reuse-first, to show what reusing the first chunk's forward saves.
POLICIES = ("fixed", "split", "split_reuse", "edba", "adabatch")
MODELS = ("preresnet20", "preresnet56") if FULL else ("preresnet20",)
BATCHES = (100, 256)


def make_policy(name: str, batch: int):
    from dynbatch.methods import policy_class

    extra = {"split_reuse_first": True} if name == "split_reuse" else {}
    name = name.replace("_reuse", "")
    cfg = train_config(policy=name, batch_size=batch, **extra).resolved()
    return policy_class(name)(cfg.policy_options, batch_size=batch, config=cfg)


@pytest.mark.parametrize("model_name, batch", list(itertools.product(MODELS, BATCHES)))
@pytest.mark.parametrize("policy", POLICIES)
def test_step(benchmark, policy, model_name, batch):
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(DEVICE)
    # The trainer's default precision and layout on this device (bf16 autocast on a GPU), not a pinned fp32.
    prec = precision.resolve("auto", "auto", DEVICE, model)
    if prec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pol = make_policy(policy, batch)
    ex = PlanExecutor(model, opt)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if prec.channels_last else x
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    ctx = StepContext(model=model, loss_fn=lambda z, t: F.cross_entropy(z, t, reduction="none"),
                      autocast=prec.autocast, device=DEVICE)

    def step():
        if policy == "edba":
            pol.current = batch
        ex.run(pol.plan(x, y, ctx), ctx, 0.01)

    run(benchmark, step, budget_s=4.0, suite="step", impl=policy, model=model_name, batch=batch, precision=prec.name)
