"""Online batch-size selection: forward the base batch as 1 x 256, 2 x 128 and 4 x 64 chunks, pick a split by
its average loss, and train on that split's chunks with the learning rate scaled by chunk / base.

Candidates. Each split's score is the mean loss over all base-batch samples, from train-mode forwards without a
graph whose buffer updates are undone (BatchNorm running statistics stay as they were). Candidates differ only
through what couples samples or draws randomness: BatchNorm batch statistics, which depend on the chunk, and
dropout, which stays active (that is where the losses of a model without BatchNorm, such as AlexNet, differ).
A model with neither gives every split the same score up to rounding. On CUDA each chunk forward runs on its own
stream, joined with events before the choice; on CPU they run one after another and compute the same numbers.

Criteria: ``min`` or ``max`` average loss, or ``random`` (a control: does the loss signal matter at all?).

Under DDP each chunk of the global batch is shared among the ranks (rank r forwards its share of every chunk);
scores are summed across ranks, so every rank picks the same split, and each sub-step trains on every rank's share
of its chunk. BatchNorm then sees per-rank chunk statistics unless ``--sync-bn``. ``--split-reuse-first`` is not
available under DDP (several graph-keeping forwards through the DDP wrapper before one backward).

Updates (k chunks of the chosen split):
- ``sequential`` (default): k optimizer steps, each a fresh forward and backward of one chunk at the current
  weights, learning rate x 1/k. With ``--split-reuse-first`` the first chunk's candidate forward keeps its graph
  and is back-propagated instead of recomputed (same weights, so the same gradient); its BatchNorm running
  statistics are then not updated for that chunk.
- ``original``: the original repository's update on current PyTorch. All k chunk gradients are taken at the
  pre-step weights; gradients were never zeroed and ``clip_grad_norm_(5)`` scaled them in place, so sub-step j
  applies acc_j = clip(acc_{j-1} + g_j) with acc_0 = 0, at learning rate x 1/k.
"""
from __future__ import annotations

import time

import torch

from dynbatch.errors import UserError
from dynbatch.policies.base import ForwardStep, GradientStep, Plan, Policy, ReuseStep, StepContext
from dynbatch.selectors.split import SplitOptions, candidate_forwards, chunk_rows, pick, split_scores


class SplitPolicy(Policy):
    name = "split"
    help = "online batch-size selection: 1x256 / 2x128 / 4x64 candidate splits, chosen by average loss"
    default_batch_size = 256

    options_type = SplitOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.base_batch_size = self.options.base_batch or batch_size
        self.splits = self.options.split_counts
        bad = [k for k in self.splits if self.base_batch_size % k]
        if bad:
            raise UserError(f"--splits {self.options.splits} must divide the base batch {self.base_batch_size}; "
                            f"choose divisors of {self.base_batch_size}, e.g. 1,2,4")

    def check_world_size(self, world: int) -> None:
        if world > 1 and self.options.split_reuse_first:
            raise UserError("--split-reuse-first is not available under DDP (several graph-keeping forwards through "
                            "the DDP wrapper before one backward); drop it")

    def plan(self, x, y, ctx: StepContext) -> Plan:
        o = self.options
        if x.shape[0] != self.base_batch_size:
            # The last batch of an epoch holds what is left: too few for the candidates, so one plain step.
            return Plan([ForwardStep(ctx.dist.local(x), ctx.dist.local(y))], {"chosen_split": None})
        t0 = time.perf_counter()
        d = ctx.dist
        reuse = o.split_reuse_first and o.split_update == "sequential"
        model = ctx.model if reuse else ctx.module  # a graph to reuse must come from the model that trains
        first_logits: dict = {}
        losses = candidate_forwards(model, x, y, self.splits, ctx.loss_fn, ctx.autocast, keep_first_graph=reuse,
                                    dist=d, kept_logits=first_logits)
        scores = split_scores(losses, self.splits, x.shape[0], d)
        k = pick(scores, o.criterion, ctx.seed, ctx.step)
        record = {"chosen_split": k, "candidates_s": time.perf_counter() - t0,
                  **{f"cand_loss_{s}": v for s, v in scores.items()}}
        rows = [chunk_rows(x.shape[0], k, j, d) for j in range(k)]
        chunks = [(x[r], y[r]) for r in rows]
        if o.split_update == "original":
            return self._original_plan(chunks, x.shape[0] // k, ctx, record)
        steps = [ForwardStep(xs, ys, lr_scale=1.0 / k) for xs, ys in chunks]
        if reuse:
            steps[0] = ReuseStep(losses[k][0], first_logits[k], chunks[0][1], lr_scale=1.0 / k)
        return Plan(steps, record)

    def _original_plan(self, chunks, chunk_size: int, ctx: StepContext, record) -> Plan:
        params = list(ctx.module.parameters())
        k = len(chunks)
        clip = self.options.split_clip
        acc = [torch.zeros_like(p) for p in params]
        steps = []
        for xs, ys in chunks:  # every gradient at the pre-step weights, as the stored graphs were
            with ctx.autocast():
                logits = ctx.module(xs)
                losses = ctx.loss_fn(logits.float(), ys)
            # The chunk's mean loss over all ranks: local sum / global chunk size, gradients summed across ranks.
            grads = torch.autograd.grad(losses.sum() / chunk_size, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(ctx.dist.all_reduce_sum(g))
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in acc]))
            acc = [a * (clip / (total + 1e-6)).clamp(max=1.0) for a in acc]  # clip_grad_norm_'s formula
            # Each step carries its own chunk's statistics (on the device; the trainer reads them with the block).
            steps.append(GradientStep([a.clone() for a in acc], losses.detach().sum(),
                                      (logits.detach().argmax(1) == ys).sum(dtype=torch.float32), len(ys),
                                      lr_scale=1.0 / k))
        return Plan(steps, record)
