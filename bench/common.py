"""Shared helpers for the benchmark suites: cases, peers, timing, and the quick/full switch.

Quick is the default; ``DYNBATCH_BENCH=full`` (``dynbatch bench --full``) widens the grids.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dynbatch.info import cpu_name

FULL = os.environ.get("DYNBATCH_BENCH") == "full"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAIVE_MAX_N = 4096  # the per-subset Python loop is linear in N; beyond this it is measured at this N


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def machine() -> dict:
    info = {"device": DEVICE.type, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if DEVICE.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(benchmark, fn, budget_s: float = 1.5, **extra):
    """Time ``fn`` with pytest-benchmark: after a warm-up call (which may load an extension or compile), a round
    repeats the call until it lasts ≥ 2 ms, since a single call of a few µs is within the timer's and the
    scheduler's noise; then as many rounds as fit ``budget_s`` (3..50). Reported times are per call."""
    import time

    def call():
        out = fn()
        sync()
        return out

    call()
    t = time.perf_counter()
    call()
    once = max(time.perf_counter() - t, 1e-7)
    iterations = max(1, int(2e-3 / once))
    rounds = int(min(50, max(3, budget_s / (once * iterations))))
    benchmark.extra_info.update(extra, machine=machine())
    return benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1)


class SelectionCase:
    """A last-layer selection problem: features (B, D), targets (B,), head (C, D)+(C,), masks (N, B)."""

    def __init__(self, b: int, c: int, d: int, n: int, seed: int = 0):
        from dynbatch.ops import random_subsets

        g = torch.Generator().manual_seed(seed)
        self.b, self.c, self.d, self.n = b, c, d, n
        self.features = torch.randn(b, d, generator=g).relu().to(DEVICE)
        self.weight = (torch.randn(c, d, generator=g) / d**0.5).to(DEVICE)
        self.bias = torch.zeros(c, device=DEVICE)
        self.targets = torch.randint(0, c, (b,), generator=g).to(DEVICE)
        self.logits = F.linear(self.features, self.weight, self.bias)
        self.seed = seed
        self.masks = random_subsets(n, b, seed=seed, device=DEVICE)

    def macs(self, route: str) -> int:
        return self.n * self.b * (self.b if route == "gram" else self.c * (self.d + 1))


def linear_head(case) -> torch.nn.Linear:
    """An ``nn.Linear`` holding ``case``'s head (weight (C, D), bias (C,)), for the per-sample-gradient peers."""
    head = torch.nn.Linear(case.d, case.c).to(DEVICE)
    with torch.no_grad():
        head.weight.copy_(case.weight)
        head.bias.copy_(case.bias)
    return head


def peer_per_sample_grads(case, peer: str):
    """A function returning the head's per-sample gradients (B, C*D + C), weight then bias, as the peer library
    ``peer`` ("opacus" or "backpack") computes them for ``case`` (features, targets, head; summed loss)."""
    head = linear_head(case)
    if peer == "opacus":
        from opacus import GradSampleModule

        gsm = GradSampleModule(head, loss_reduction="sum")

        def grads():
            gsm.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(case.features), case.targets, reduction="sum").backward()
            g = torch.cat([head.weight.grad_sample.flatten(1), head.bias.grad_sample], 1)
            head.weight.grad_sample = head.bias.grad_sample = None  # opacus accumulates them otherwise
            return g
        return grads
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    head, lossf = extend(head), extend(torch.nn.CrossEntropyLoss(reduction="sum"))

    def grads():
        head.zero_grad(set_to_none=True)
        with backpack(BatchGrad()):
            lossf(head(case.features), case.targets).backward()
        return torch.cat([head.weight.grad_batch.flatten(1), head.bias.grad_batch], 1)
    return grads


def peer_subset_norms(case: SelectionCase, peer: str):
    """The peer's per-sample gradients, then the vectorised subset reduction: (N,) norms of subset means."""
    from dynbatch.baselines import subset_mean_norms_matmul

    grads = peer_per_sample_grads(case, peer)
    return lambda: subset_mean_norms_matmul(grads(), case.masks)


def peer_missing(module: str) -> str | None:
    try:
        __import__(module)
        return None
    except ImportError:
        return f"{module} not installed (pip install -e '.[peers]')"
