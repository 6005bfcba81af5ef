"""Executes a policy's :class:`Plan`: forward/backward (micro-batched), clipping, learning rate, optimizer step.

Micro-batching: a step on more than ``micro_batch`` samples is computed in chunks whose losses are summed and
divided by the size of the *whole* step, so the accumulated gradient equals the one-shot gradient (exactly so for
models without BatchNorm; with BatchNorm each chunk normalises with its own batch statistics).

Out of memory: a chunk that raises ``torch.OutOfMemoryError`` halves the micro-batch and the whole step is redone
from zeroed gradients, so no half-accumulated gradient is ever applied; below one sample the error is re-raised.
Under DDP it is re-raised at once: a rank that retried alone would leave the others waiting in a collective.

Non-finite steps: before each optimizer step the step's gradient norm (and, in one process, its loss) is checked
on the device; a non-finite one skips the update inside the fused optimizer (``dynbatch.train.optim``) and is
counted in ``StepOutcome.skipped``. With ``restore_buffers_on_skip`` the forward's buffer updates (BatchNorm
running statistics) are undone too, so a skipped step leaves no trace in the model.

DDP: losses are normalised by the step's *global* sample count times the world size, which DDP's gradient
averaging turns back into the global mean, exact even when ranks hold different numbers of samples. All micro-batches
but the last run under ``no_sync()``, so each rank performs exactly one reducing backward per step.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch
from torch import nn

from dynbatch.policies.base import Plan, StepContext, TrainStep
from dynbatch.distributed import SINGLE, Dist
from dynbatch.train.optim import step_unless


@dataclass
class StepOutcome:
    """Sums over the samples this rank trained on in one plan, as 0-d device tensors (read once, by the trainer):
    loss_sum, correct, n (sample weights summed), skipped (optimizer steps not applied: non-finite)."""

    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    n: torch.Tensor | float = 0.0
    skipped: torch.Tensor | int = 0
    ran_forward: bool = False  # False when every step applied precomputed gradients (the sums come from the plan)
    oom_retries: int = 0
    micro_batch: int | None = None
    events: list[str] = field(default_factory=list)


class PlanExecutor:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int | None = None,
                 max_oom_retries: int = 16, dist: Dist = SINGLE, restore_buffers_on_skip: bool = False):
        self.model = model
        self.restore_buffers_on_skip = restore_buffers_on_skip
        self.dist = dist
        self.optimizer = optimizer
        self.micro_batch = micro_batch  # None: whole steps; halved on OOM and kept for later steps
        self.max_oom_retries = max_oom_retries

    def _scale(self, step: TrainStep, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(local sample count, 1 / normaliser): the step's mean loss is sum(weighted losses) * scale."""
        # torch.full, not torch.tensor: a fill kernel instead of a blocking host-to-device copy.
        local = step.sample_weight.sum() if step.sample_weight is not None else torch.full((), float(n), device=device)
        total = self.dist.all_reduce_sum(local.float().reshape(1))[0] if self.dist.enabled else local.float()
        return local, self.dist.world / total.clamp_min(1e-12)

    def _forward_backward(self, step: TrainStep, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Accumulate the gradient of the step's mean loss into ``.grad``; returns (loss sum, correct, samples) as
        0-d device tensors."""
        w = step.sample_weight
        if step.reuse_losses is not None:
            # The policy already ran this forward with a graph at the current weights.
            losses = step.reuse_losses if w is None else step.reuse_losses * w
            local, scale = self._scale(step, losses.numel(), losses.device)
            (losses.sum() * scale).backward()
            correct = ((step.reuse_logits.argmax(1) == step.y).sum() if step.reuse_logits is not None
                       else torch.zeros((), dtype=torch.long, device=losses.device))
            return losses.detach().sum(), correct, local
        n = step.x.shape[0]
        mb = self.micro_batch or n
        local, scale = self._scale(step, n, step.x.device)
        total, correct = torch.zeros((), device=step.x.device), torch.zeros((), dtype=torch.long, device=step.x.device)
        starts = list(range(0, n, mb))
        for i, start in enumerate(starts):
            xs, ys = step.x[start : start + mb], step.y[start : start + mb]
            last = i == len(starts) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with ctx.autocast():
                    logits = self.model(xs)
                    losses = ctx.loss_fn(logits.float(), ys)
                hit = logits.detach().argmax(1) == ys
                if w is not None:
                    ws = w[start : start + mb]
                    losses, hit = losses * ws, hit & (ws > 0)
                # Normalised by the whole step so the accumulated gradient is the gradient of the step's mean loss.
                (losses.sum() * scale).backward()
            total += losses.detach().sum()
            correct += hit.sum()
        return total, correct, local

    def _gradient_pass(self, step: TrainStep, ctx: StepContext, outcome: StepOutcome):
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            try:
                return self._forward_backward(step, ctx)
            except torch.OutOfMemoryError:
                n = step.x.shape[0] if step.x is not None else 0
                current = self.micro_batch or n
                if (step.reuse_losses is not None or current <= 1 or outcome.oom_retries >= self.max_oom_retries
                        or self.dist.enabled):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                self.micro_batch = max(1, current // 2)
                outcome.oom_retries += 1
                outcome.events.append(f"out of memory at micro-batch {current}; retrying at {self.micro_batch}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def run(self, plan: Plan, ctx: StepContext, base_lr: float) -> StepOutcome:
        outcome = StepOutcome()
        params = list(self.model.parameters())
        saved = ([(b, b.detach().clone()) for b in self.model.buffers()] if self.restore_buffers_on_skip else [])
        skipped = []
        for step in plan.steps:
            loss = None
            if step.grads is not None:
                self.optimizer.zero_grad(set_to_none=True)
                for p, g in zip(params, step.grads):
                    p.grad = None if g is None else g.clone()
            else:
                loss, correct, n = self._gradient_pass(step, ctx, outcome)
                outcome.loss_sum = outcome.loss_sum + loss
                outcome.correct = outcome.correct + correct
                outcome.n = outcome.n + n
                outcome.ran_forward = True
            grads = [p.grad for p in params if p.grad is not None]
            if step.clip_norm is not None:
                norm = nn.utils.clip_grad_norm_(params, step.clip_norm)
            else:
                norm = nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)
            bad = ~torch.isfinite(norm)
            if loss is not None and not self.dist.enabled:
                # Under DDP the all-reduced gradient norm alone decides, so every rank skips the same steps.
                bad = bad | ~torch.isfinite(loss)
            for group in self.optimizer.param_groups:
                group["lr"] = base_lr * step.lr_scale
            step_unless(self.optimizer, bad)
            skipped.append(bad)
        if skipped:
            flags = torch.stack(skipped)
            outcome.skipped = flags.sum()
            any_bad = flags.any()
            for b, v in saved:
                b.copy_(torch.where(any_bad, v, b))
        outcome.micro_batch = self.micro_batch
        return outcome
