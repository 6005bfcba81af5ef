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

import random
import time

import torch
from torch import nn

from dynbatch.errors import UserError
from dynbatch.policies.base import Plan, Policy, StepContext, TrainStep
from dynbatch.train.buffers import preserved_buffers


def _parse_splits(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in str(s).split(","))
    except ValueError:
        raise UserError(f"--splits must be comma-separated integers (got {s!r}); e.g. 1,2,4") from None
    return out


def chunk_rows(batch: int, k: int, j: int, dist=None) -> slice:
    """Rows of chunk j of k in a batch of ``batch``; under DDP, this rank's share of them."""
    size = batch // k
    if dist is None or not dist.enabled:
        return slice(j * size, (j + 1) * size)
    s = dist.share(size)
    return slice(j * size + s.start, j * size + s.stop)


def candidate_forwards(model: nn.Module, x: torch.Tensor, y: torch.Tensor, splits, loss_fn, autocast,
                       keep_first_graph: bool = False, dist=None):
    """Per-sample losses of every chunk of every split (this rank's share of each chunk under DDP).

    Returns {k: [losses of chunk 0, ..., chunk k-1]} (fp32 each). Buffers are restored; chunk 0 of each
    split keeps its graph when ``keep_first_graph``. On CUDA the chunks run concurrently on separate streams.
    """
    chunks = [(k, j) for k in splits for j in range(k)]
    out: dict[int, list] = {k: [None] * k for k in splits}

    def run(k, j):
        rows = chunk_rows(x.shape[0], k, j, dist)
        xs, ys = x[rows], y[rows]
        with torch.set_grad_enabled(keep_first_graph and j == 0), autocast():
            return loss_fn(model(xs).float(), ys)

    # SyncBatchNorm issues collectives inside forwards; on concurrent streams their order could differ between
    # ranks and deadlock, so such a model runs its candidates one after another.
    concurrent = x.is_cuda and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    with preserved_buffers(model):
        if concurrent:
            main = torch.cuda.current_stream(x.device)
            streams = [torch.cuda.Stream(x.device) for _ in chunks]
            events = []
            for (k, j), s in zip(chunks, streams):
                s.wait_stream(main)  # inputs were produced on the main stream
                with torch.cuda.stream(s):
                    losses = run(k, j)
                    ev = torch.cuda.Event()
                    ev.record(s)
                x.record_stream(s)  # x is read on s: the allocator must not reuse it before s is done
                out[k][j] = losses
                events.append((ev, losses))
            for ev, losses in events:
                main.wait_event(ev)
                losses.record_stream(main)  # allocated on a side stream, consumed on main
        else:
            for k, j in chunks:
                out[k][j] = run(k, j)
    return out


class SplitPolicy(Policy):
    name = "split"
    help = "online batch-size selection: 1x256 / 2x128 / 4x64 candidate splits, chosen by average loss"
    default_batch_size = 256

    @classmethod
    def add_arguments(cls, g):
        g.add_argument("--base-batch", type=int, help="samples per step (default: --batch-size, 256)")
        g.add_argument("--splits", default="1,2,4", help="numbers of chunks to try, each dividing the base batch")
        g.add_argument("--criterion", default="min", help="min, max or random")
        g.add_argument("--split-update", default="sequential", help="sequential or original")
        g.add_argument("--split-clip", type=float, default=5.0, help="gradient-norm clip of the original update")
        g.add_argument("--split-reuse-first", action="store_true",
                       help="back-propagate the first chunk's candidate forward instead of recomputing it")

    @classmethod
    def validate(cls, o):
        splits = _parse_splits(o["splits"])
        if not splits or any(k < 1 for k in splits) or len(set(splits)) != len(splits):
            raise UserError(f"--splits must be distinct positive integers (got {o['splits']}); e.g. 1,2,4")
        if o["base_batch"] is not None and o["base_batch"] < 1:
            raise UserError(f"--base-batch must be positive (got {o['base_batch']}); e.g. 256")
        if o["criterion"] not in ("min", "max", "random"):
            raise UserError(f"--criterion must be min, max or random (got {o['criterion']!r}); min is the default")
        if o["split_update"] not in ("sequential", "original"):
            raise UserError(f"--split-update must be sequential or original (got {o['split_update']!r}); sequential is the default")
        if o["split_clip"] <= 0:
            raise UserError(f"--split-clip must be positive (got {o['split_clip']}); e.g. 5")

    def __init__(self, options, *, batch_size, config=None):
        base = options["base_batch"] or batch_size
        splits = _parse_splits(options["splits"])
        bad = [k for k in splits if base % k]
        if bad:
            raise UserError(f"--splits {options['splits']} must divide the base batch {base}; choose divisors of {base}, e.g. 1,2,4")
        super().__init__(options, batch_size=base, config=config)
        self.splits = splits

    def choose(self, scores: dict[int, float], seed: int, step: int) -> int:
        c = self.options["criterion"]
        if c == "random":
            return random.Random(seed * 1_000_003 + step).choice(sorted(scores))
        pick = min if c == "min" else max
        return pick(sorted(scores), key=lambda k: scores[k])  # ties: the fewest chunks

    def plan(self, x, y, ctx: StepContext) -> Plan:
        o = self.options
        if x.shape[0] != self.base_batch_size:
            # The last batch of an epoch holds what is left: too few for the candidates, so one plain step.
            return Plan([TrainStep(ctx.dist.local(x), ctx.dist.local(y))], {"chosen_split": None})
        t0 = time.perf_counter()
        d = ctx.dist
        reuse = o["split_reuse_first"] and o["split_update"] == "sequential"
        if reuse and d.enabled:
            raise UserError("--split-reuse-first is not available under DDP; drop it")
        model = ctx.model if reuse else ctx.raw_model  # a graph to reuse must come from the model that trains
        losses = candidate_forwards(model, x, y, self.splits, ctx.loss_fn, ctx.autocast, keep_first_graph=reuse,
                                    dist=d)
        sums = torch.stack([torch.cat([v.detach() for v in losses[k]]).sum() for k in self.splits])
        sums = d.all_reduce_sum(sums) / x.shape[0]  # mean over the whole (global) base batch
        scores = {k: float(v) for k, v in zip(self.splits, sums)}
        k = self.choose(scores, ctx.seed, ctx.step)
        candidates_s = time.perf_counter() - t0
        record = {"chosen_split": k, "candidates_s": candidates_s,
                  **{f"cand_loss_{s}": v for s, v in scores.items()}}
        rows = [chunk_rows(x.shape[0], k, j, d) for j in range(k)]
        chunks = [(x[r], y[r]) for r in rows]
        if o["split_update"] == "original":
            return self._original_plan(chunks, x.shape[0] // k, ctx, record)
        steps = [TrainStep(xs, ys, lr_scale=1.0 / k) for xs, ys in chunks]
        if reuse:
            steps[0] = TrainStep(None, chunks[0][1], lr_scale=1.0 / k, reuse_losses=losses[k][0])
        return Plan(steps, record)

    def _original_plan(self, chunks, chunk_size: int, ctx: StepContext, record) -> Plan:
        params = list(ctx.raw_model.parameters())
        k = len(chunks)
        clip = self.options["split_clip"]
        acc = [torch.zeros_like(p) for p in params]
        steps, loss_sum, correct = [], 0.0, 0
        for xs, ys in chunks:  # every gradient at the pre-step weights, as the stored graphs were
            with ctx.autocast():
                logits = ctx.raw_model(xs)
                losses = ctx.loss_fn(logits.float(), ys)
            # The chunk's mean loss over all ranks: local sum / global chunk size, gradients summed across ranks.
            grads = torch.autograd.grad(losses.sum() / chunk_size, params, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(ctx.dist.all_reduce_sum(g))
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a) for a in acc]))
            acc = [a * (clip / (total + 1e-6)).clamp(max=1.0) for a in acc]  # clip_grad_norm_'s formula
            steps.append(TrainStep(grads=[a.clone() for a in acc], lr_scale=1.0 / k))
            loss_sum += float(losses.detach().sum())
            correct += int((logits.detach().argmax(1) == ys).sum())
        record.update(loss_sum=loss_sum, correct=correct, trained_samples=sum(len(ys) for _, ys in chunks))
        return Plan(steps, record)
