"""Executes a policy's :class:`Plan`: forward/backward (micro-batched), clipping, learning rate, optimizer step.

Micro-batching: a step on more than ``micro_batch`` samples is computed in chunks whose losses are summed and
divided by the size of the *whole* step, so the accumulated gradient equals the one-shot gradient (exactly so for
models without BatchNorm; with BatchNorm each chunk normalises with its own batch statistics).

Out of memory: a chunk that raises ``torch.OutOfMemoryError`` halves the micro-batch and the whole step is redone
from zeroed gradients, so no half-accumulated gradient is ever applied; below one sample the error is re-raised.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dynbatch.policies.base import Plan, StepContext, TrainStep


@dataclass
class StepOutcome:
    """Sums over the samples trained on in one plan: loss_sum (float), correct (int), n (int)."""

    loss_sum: float = 0.0
    correct: int = 0
    n: int = 0
    oom_retries: int = 0
    micro_batch: int | None = None
    events: list[str] = field(default_factory=list)


class PlanExecutor:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int | None = None,
                 max_oom_retries: int = 16):
        self.model = model
        self.optimizer = optimizer
        self.micro_batch = micro_batch  # None: whole steps; halved on OOM and kept for later steps
        self.max_oom_retries = max_oom_retries

    def _forward_backward(self, step: TrainStep, ctx: StepContext) -> tuple[float, int]:
        """Accumulate the gradient of the step's mean loss into ``.grad``; returns (loss sum, correct)."""
        if step.reuse_losses is not None:
            # The policy already ran this forward with a graph at the current weights.
            loss_sum = step.reuse_losses.sum()
            (loss_sum / step.reuse_losses.numel()).backward()
            correct = int((step.reuse_logits.argmax(1) == step.y).sum()) if step.reuse_logits is not None else 0
            return float(loss_sum.detach()), correct
        n = step.x.shape[0]
        mb = self.micro_batch or n
        total, correct = torch.zeros((), device=step.x.device), torch.zeros((), dtype=torch.long, device=step.x.device)
        for start in range(0, n, mb):
            xs, ys = step.x[start : start + mb], step.y[start : start + mb]
            with ctx.autocast():
                logits = self.model(xs)
                losses = ctx.loss_fn(logits.float(), ys)
            # Normalised by the whole step so the accumulated gradient is the gradient of the step's mean loss.
            (losses.sum() / n).backward()
            total += losses.detach().sum()
            correct += (logits.detach().argmax(1) == ys).sum()
        return float(total), int(correct)

    def _gradient_pass(self, step: TrainStep, ctx: StepContext, outcome: StepOutcome) -> tuple[float, int]:
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                return self._forward_backward(step, ctx)
            except torch.OutOfMemoryError:
                n = step.x.shape[0] if step.x is not None else 0
                current = self.micro_batch or n
                if step.reuse_losses is not None or current <= 1 or outcome.oom_retries >= self.max_oom_retries:
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                self.micro_batch = max(1, current // 2)
                outcome.oom_retries += 1
                outcome.events.append(f"out of memory at micro-batch {current}; retrying at {self.micro_batch}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def run(self, plan: Plan, ctx: StepContext, base_lr: float) -> StepOutcome:
        outcome = StepOutcome()
        params = [p for p in self.model.parameters()]
        for step in plan.steps:
            if step.grads is not None:
                self.optimizer.zero_grad(set_to_none=True)
                for p, g in zip(params, step.grads):
                    p.grad = None if g is None else g.clone()
                n = 0
            else:
                loss_sum, correct = self._gradient_pass(step, ctx, outcome)
                n = step.y.shape[0]
                outcome.loss_sum += loss_sum
                outcome.correct += correct
                outcome.n += n
            if step.clip_norm is not None:
                nn.utils.clip_grad_norm_(params, step.clip_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = base_lr * step.lr_scale
            self.optimizer.step()
        outcome.micro_batch = self.micro_batch
        return outcome
