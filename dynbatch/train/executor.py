"""Executes a policy's :class:`Plan`: forward/backward (micro-batched), clipping, learning rate, optimizer step.

Micro-batching: a step on more than ``micro_batch`` samples is computed in chunks whose losses are summed and
divided by the size of the *whole* step, so the accumulated gradient equals the one-shot gradient (exactly so for
models without BatchNorm; with BatchNorm each chunk normalises with its own batch statistics).

Out of memory: a chunk that raises ``torch.OutOfMemoryError`` halves the micro-batch and the whole step is redone
from zeroed gradients, so no half-accumulated gradient is ever applied; below one sample the error is re-raised.
Under DDP it is re-raised at once: a rank that retried alone would leave the others waiting in a collective.

Non-finite steps: before each optimizer step one fused check (``torch._amp_foreach_non_finite_check_and_unscale_``,
the one ``GradScaler`` uses) looks at every gradient (and, in one process, the step's loss) on the device; a
non-finite one skips the update inside the fused optimizer (``dynbatch.train.optim``) and is counted in the
outcome's ``skipped``. With ``restore_buffers_on_skip`` the forward's buffer updates (BatchNorm running statistics)
are undone too, so a skipped step leaves no trace in the model.

DDP: losses are normalised by the step's *global* sample count times the world size, which DDP's gradient
averaging turns back into the global mean, exact even when ranks hold different numbers of samples. All micro-batches
but the last run under ``no_sync()``, so each rank performs exactly one reducing backward per step.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch
from torch import nn

from dynbatch.methods.base import (BufferSnapshot, ForwardStep, GradientStep, Plan, ReuseStep, StepContext,
                                   sample_hits)
from dynbatch.distributed import SINGLE, Dist
from dynbatch.train.optim import step_unless


@dataclass(slots=True)
class StepOutcome:
    """What one plan did. ``parts`` are 0-d float32 device tensors, summed over this rank's steps: loss sum,
    correct predictions, trained samples (sample weights summed) and skipped (non-finite) updates, and when the
    context marks mislabeled samples, how many the rank's share of the batch held and how many were trained on;
    read by the trainer with its block, never here (and stacked there too: one stack per block, not per step)."""

    parts: tuple[torch.Tensor, ...] = ()
    oom_retries: int = 0
    micro_batch: int | None = None
    events: list[str] = field(default_factory=list)

    @property
    def stats(self) -> torch.Tensor:
        """``parts`` as one float32 (4,) or (6,) tensor."""
        return torch.stack(self.parts)


class PlanExecutor:
    """Runs plans on ``model`` (the wrapper that trains) with ``optimizer``. Per step it does what a minimal loop
    does plus one fused finiteness check; everything it reuses across steps (the parameter list, the unit scale of
    the check, the last learning rate written) is kept here rather than rebuilt."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int | None = None,
                 max_oom_retries: int = 16, dist: Dist = SINGLE, restore_buffers_on_skip: bool = False):
        self.model = model
        self.restore_buffers_on_skip = restore_buffers_on_skip
        self.dist = dist
        self.optimizer = optimizer
        self.micro_batch = micro_batch  # None: whole steps; halved on OOM and kept for later steps
        self.max_oom_retries = max_oom_retries
        self.params = list(model.parameters())
        self._no_sync = getattr(model, "no_sync", None)  # looked up once: nn.Module attribute misses are slow
        self._counts: dict[tuple[int, torch.device], torch.Tensor] = {}  # sample counts as 0-d device constants
        self._unit: torch.Tensor | None = None  # the check's "unscale" factor: 1, on the parameters' device
        self._flags: list[torch.Tensor] = []  # zeroed 0-d flags for the check, handed out one per step
        self._seeds: dict[tuple, torch.Tensor] = {}  # backward seeds: (n,) filled with a host factor
        self._lr: float | None = None

    def _normaliser(self, n: int, weight: torch.Tensor | None, device,
                    by_count: bool = False) -> tuple[torch.Tensor | float, torch.Tensor]:
        """(factor, samples): the step's mean loss is sum(weighted losses) * factor, the weights' sum normalising
        or, ``by_count``, the number of samples with a positive weight; ``samples`` (0-d float32) is this rank's
        count for the statistics. One process normalising by a count: a host constant, no device work (a weight
        of 0 exists only as DDP's filler sample)."""
        if (weight is None or by_count) and not self.dist.enabled:
            return 1.0 / max(n, 1), self._count(n, device)
        if weight is None:
            local = self._count(n, device)
        else:
            local = (weight > 0).sum(dtype=torch.float32) if by_count else weight.sum()
        total = self.dist.all_reduce_sum(local.float().reshape(1))[0] if self.dist.enabled else local.float()
        return self.dist.world / total.clamp_min(1e-12), local.float()

    def _count(self, n: int, device) -> torch.Tensor:
        """``n`` as a 0-d float32 tensor on ``device``, made once per value (only ever read: stacked, summed)."""
        t = self._counts.get((n, device))
        if t is None:
            t = self._counts[(n, device)] = torch.full((), float(n), device=device)
        return t

    def _backward(self, losses: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
        """Backward of ``sum(losses) * factor``, seeded directly with d/d(losses) = ``factor`` for every sample:
        the same gradient values as the two autograd nodes it replaces (sum's backward expands ``1 * factor``), at
        the cost of none. Returns the detached loss sum (fp32 0-d)."""
        if isinstance(factor, torch.Tensor):
            seed = factor.to(losses.dtype).expand(losses.shape)
        else:
            key = (losses.shape[0], factor, losses.dtype, losses.device)
            seed = self._seeds.get(key)
            if seed is None:
                if len(self._seeds) > 4096:  # batch sizes vary (EDBA): keep the cache bounded
                    self._seeds.clear()
                seed = self._seeds[key] = torch.full(losses.shape, factor, dtype=losses.dtype, device=losses.device)
        torch.autograd.backward(losses, seed)
        return losses.detach().sum()

    def _reused(self, step: ReuseStep) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The backward of losses a policy computed with a graph; (loss sum, correct, samples), 0-d float32."""
        w = step.sample_weight
        losses = step.losses if w is None else step.losses * w
        factor, samples = self._normaliser(losses.numel(), w, losses.device, step.mean_over_count)
        total = self._backward(losses, factor)
        hit = sample_hits(step.logits, step.y)
        if w is not None:
            hit = hit * (w > 0)
        return total, hit.sum(dtype=torch.float32), samples

    def _forward_backward(self, step: ForwardStep, ctx: StepContext):
        """Accumulate the gradient of the step's mean loss into ``.grad``, micro-batched; returns (loss sum,
        correct, samples) as 0-d float32 device tensors."""
        w, n = step.sample_weight, step.x.shape[0]
        mb = self.micro_batch or n
        factor, samples = self._normaliser(n, w, step.x.device, step.mean_over_count)
        total = correct = None
        for start in range(0, n, mb):
            xs, ys = (step.x, step.y) if mb >= n else (step.x[start:start + mb], step.y[start:start + mb])
            last = start + mb >= n
            sync = contextlib.nullcontext() if last or self._no_sync is None else self._no_sync()
            with sync:
                with ctx.autocast():
                    logits = self.model(xs)
                    losses = ctx.loss_fn(logits if logits.dtype == torch.float32 else logits.float(), ys)
                hit = sample_hits(logits.detach(), ys)
                if w is not None:
                    ws = w[start:start + mb]
                    losses, hit = losses * ws, hit * (ws > 0)
                # Normalised by the whole step so the accumulated gradient is the gradient of the step's mean loss.
                chunk = self._backward(losses, factor)
            hits = hit.sum(dtype=torch.float32)
            total, correct = (chunk, hits) if total is None else (total + chunk, correct + hits)
        return total, correct, samples

    def _clear_grads(self) -> None:
        """``optimizer.zero_grad(set_to_none=True)``: for torch's own ``zero_grad`` (the optimizers dynbatch
        builds), the same ``p.grad = None`` over its parameter groups without the dynamo guard and profiler range
        around it, which cost ~40 µs a step on CPU (7 % of a tiny model's step); an overriding optimizer keeps its
        own."""
        if type(self.optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def _gradient_pass(self, step: ForwardStep | ReuseStep, ctx: StepContext, outcome: StepOutcome):
        while True:
            self._clear_grads()
            if isinstance(step, ReuseStep):  # its graph exists once: no retry at a smaller micro-batch
                return self._reused(step)
            try:
                return self._forward_backward(step, ctx)
            except torch.OutOfMemoryError:
                current = self.micro_batch or step.x.shape[0]
                if current <= 1 or outcome.oom_retries >= self.max_oom_retries or self.dist.enabled:
                    raise
                self._clear_grads()
                self.micro_batch = max(1, current // 2)
                outcome.oom_retries += 1
                outcome.events.append(f"out of memory at micro-batch {current}; retrying at {self.micro_batch}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _nonfinite(self, loss: torch.Tensor | None) -> torch.Tensor:
        """0-d float32 on the device (the shape fused optimizers take): 1 if any gradient (or ``loss``) is not
        finite, else 0."""
        if not self._flags:  # one zeroed allocation per 64 steps, not one per step
            self._flags = list(torch.zeros(64, device=self.params[0].device).unbind())
        found = self._flags.pop()
        if self._unit is None:
            self._unit = torch.ones((), device=found.device)
        tensors = [p.grad for p in self.params if p.grad is not None]
        if loss is not None:
            tensors.append(loss)
        if tensors:
            # Multiplies by the unit scale in place (a no-op) and sets `found` on a non-finite value, in one pass.
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, self._unit)
        return found

    def _mislabeled(self, flags: torch.Tensor, step) -> torch.Tensor:
        """How many of ``step``'s samples (with a positive weight) are marked in ``flags`` (the batch's, (B,)
        bool), 0-d float32 on the device."""
        hit = flags[step.rows if step.rows is not None else self.dist.share(flags.shape[0])]
        w = getattr(step, "sample_weight", None)
        return (hit if w is None else hit & (w > 0)).sum(dtype=torch.float32)

    def run(self, plan: Plan, ctx: StepContext, base_lr: float) -> StepOutcome:
        outcome = StepOutcome()
        snapshot = BufferSnapshot(self.model) if self.restore_buffers_on_skip else None
        sums = skipped = None
        flags = ctx.mislabeled
        mislabeled = []
        for step in plan.steps:
            if isinstance(step, GradientStep):
                for p, g in zip(self.params, step.grads):
                    p.grad = g  # the policy's tensors: the step owns them
                part = (step.loss_sum, step.correct, self._count(step.samples, step.loss_sum.device))
            else:
                part = self._gradient_pass(step, ctx, outcome)
            # Under DDP the all-reduced gradients alone decide, so every rank skips the same steps.
            found = self._nonfinite(None if self.dist.enabled else part[0])
            lr = base_lr * step.lr_scale
            if lr != self._lr:  # the fused step reads the group's lr; rewritten only when it changes
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_factor", 1.0)
                self._lr = lr
            step_unless(self.optimizer, found)
            sums = part if sums is None else tuple(a + b for a, b in zip(sums, part))
            skipped = found if skipped is None else skipped + found
            if flags is not None:
                mislabeled.append(self._mislabeled(flags, step))
        outcome.parts = (*sums, skipped)
        if flags is not None:
            in_batch = flags[self.dist.share(flags.shape[0])].sum(dtype=torch.float32)
            outcome.parts += (in_batch, mislabeled[0] if len(mislabeled) == 1 else torch.stack(mislabeled).sum())
        if snapshot is not None:
            snapshot.restore(where=skipped > 0)
        outcome.micro_batch = self.micro_batch
        return outcome
