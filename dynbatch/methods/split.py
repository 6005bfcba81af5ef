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

Own-loop component
------------------
Online batch-size selection for any PyTorch loop: forward one batch as 1, 2, 4 ... chunks, and choose the
chunking by its average loss.

:func:`choose_split` is the choice; :func:`candidate_forwards` the forwards it scores (train-mode, no graph, every
buffer restored, concurrent on CUDA streams); :class:`SplitOptions` the options with their defaults. The policy
``split`` of ``dynbatch train`` uses exactly these.
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from dynbatch.methods.base import ForwardStep, GradientStep, Plan, Policy, ReuseStep, StepContext, preserved_buffers
from dynbatch.options import OptionError, check_fields, one_of, option, positive


def parse_splits(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in str(s).split(","))
    except ValueError:
        raise OptionError(f"{{splits}} must be comma-separated integers (got {s!r}); e.g. 1,2,4") from None
    return out


def chunk_rows(batch: int, k: int, j: int, dist=None) -> slice:
    """Rows of chunk j of k in a batch of ``batch``; under DDP, this rank's share of them."""
    size = batch // k
    if dist is None or not dist.enabled:
        return slice(j * size, (j + 1) * size)
    s = dist.share(size)
    return slice(j * size + s.start, j * size + s.stop)


def candidate_forwards(model: nn.Module, x: torch.Tensor, y: torch.Tensor, splits, loss_fn, autocast,
                       keep_first_graph: bool = False, dist=None, kept_logits: dict | None = None):
    """Per-sample losses of every chunk of every split (this rank's share of each chunk under DDP).

    Returns {k: [losses of chunk 0, ..., chunk k-1]} (fp32 each). Buffers are restored; chunk 0 of each
    split keeps its graph when ``keep_first_graph`` (and, given a dict ``kept_logits``, its detached logits go to
    ``kept_logits[k]``). On CUDA the chunks run concurrently on separate streams.
    """
    chunks = [(k, j) for k in splits for j in range(k)]
    out: dict[int, list] = {k: [None] * k for k in splits}

    def run(k, j):
        rows = chunk_rows(x.shape[0], k, j, dist)
        xs, ys = x[rows], y[rows]
        keep = keep_first_graph and j == 0
        with torch.set_grad_enabled(keep), autocast():
            logits = model(xs)
            if keep and kept_logits is not None:
                kept_logits[k] = logits.detach()
            return loss_fn(logits.float(), ys)

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


CRITERIA = ("min", "max", "random")


@dataclass
class SplitOptions:
    base_batch: int | None = option(None, "samples per step (default: --batch-size, 256)",
                                    check=positive("e.g. 256"))
    splits: str = option("1,2,4", "numbers of chunks to try, each dividing the base batch")
    criterion: str = option("min", "min, max or random", check=one_of(*CRITERIA, hint="min is the default"))
    split_update: str = option("sequential", "sequential or original",
                               check=one_of("sequential", "original", hint="sequential is the default"))
    split_clip: float = option(5.0, "gradient-norm clip of the original update", check=positive("e.g. 5"))
    split_reuse_first: bool = option(False, "back-propagate the first chunk's candidate forward instead of "
                                            "recomputing it")

    @property
    def split_counts(self) -> tuple[int, ...]:
        return parse_splits(self.splits)

    def validate(self) -> None:
        """Raise ``OptionError`` (a ``ValueError``) naming the first bad option, its range and an example."""
        splits = self.split_counts
        if not splits or any(k < 1 for k in splits) or len(set(splits)) != len(splits):
            raise OptionError(f"{{splits}} must be distinct positive integers (got {self.splits}); e.g. 1,2,4")
        check_fields(self)


def pick(scores: dict[int, float], criterion: str, seed: int = 0, step: int = 0) -> int:
    """The split a criterion picks from {chunks: mean loss}; ties go to the fewest chunks. ``random`` (the control)
    draws from (seed, step)."""
    if criterion == "random":
        return random.Random(seed * 1_000_003 + step).choice(sorted(scores))
    best = min if criterion == "min" else max
    return best(sorted(scores), key=lambda k: scores[k])


@dataclass
class KeptForwards:
    """What :func:`choose_split` keeps of its candidate forwards: their per-sample losses ``losses`` ({k: [chunk
    losses]}) and, with ``keep_graph``, each split's first chunk with its graph and its detached logits in
    ``logits`` ({k: logits})."""

    keep_graph: bool = False
    losses: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)


def choose_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None, splits=(1, 2, 4),
                 criterion: str = "min", *, seed: int = 0, step: int = 0, autocast=nullcontext, dist=None,
                 kept: KeptForwards | None = None):
    """Online batch-size selection for one batch x (B, ...), y (B,): returns (chosen number of chunks, scores).

    Each split's score is the mean per-sample loss over all B samples from train-mode forwards of its chunks,
    with no graph and every buffer restored. ``loss_fn(logits, y)`` gives per-sample losses (default: cross
    entropy). Train on the chosen split's chunks ``x[chunk_rows(B, k, j)]`` at learning rate x 1/k. Given
    ``kept`` (:class:`KeptForwards`), the candidates' losses (and first graphs) go there.
    """
    loss_fn = loss_fn or (lambda z, t: nn.functional.cross_entropy(z, t, reduction="none"))
    check_divides(splits, x.shape[0])
    first_logits: dict = {}
    losses = candidate_forwards(model, x, y, splits, loss_fn, autocast, dist=dist, kept_logits=first_logits,
                                keep_first_graph=kept is not None and kept.keep_graph)
    if kept is not None:
        kept.losses, kept.logits = losses, first_logits
    scores = split_scores(losses, splits, x.shape[0], dist)
    return pick(scores, criterion, seed, step), scores


def check_divides(splits, batch: int) -> None:
    bad = [k for k in splits if batch % k]
    if bad:
        raise OptionError(f"{{splits}} {','.join(map(str, splits))} must divide the base batch {batch}; choose "
                          f"divisors of {batch}, e.g. 1,2,4")


def split_scores(losses: dict, splits, batch: int, dist=None) -> dict[int, float]:
    """{chunks: mean loss over the whole (global) batch} from :func:`candidate_forwards`' losses."""
    sums = torch.stack([torch.cat([v.detach() for v in losses[k]]).sum() for k in splits])
    if dist is not None and dist.enabled:
        sums = dist.all_reduce_sum(sums)
    return dict(zip(splits, (sums / batch).tolist()))  # one read for all the splits


# ---- the trainer adapter -------------------------------------------------------------------------------------
class SplitPolicy(Policy):
    name = "split"
    help = "online batch-size selection: 1x256 / 2x128 / 4x64 candidate splits, chosen by average loss"
    default_batch_size = 256

    options_type = SplitOptions

    def __init__(self, options=None, *, batch_size, config=None):
        super().__init__(options, batch_size=batch_size, config=config)
        self.base_batch_size = self.options.base_batch or batch_size
        self.splits = self.options.split_counts
        check_divides(self.splits, self.base_batch_size)

    def check_world_size(self, world: int) -> None:
        if world > 1 and self.options.split_reuse_first:
            raise OptionError("{split_reuse_first} is not available under DDP (several graph-keeping forwards "
                              "through the DDP wrapper before one backward); drop it")

    def plan(self, x, y, ctx: StepContext) -> Plan:
        o = self.options
        if x.shape[0] != self.base_batch_size:
            # The last batch of an epoch holds what is left: too few for the candidates, so one plain step.
            return Plan([ForwardStep(ctx.dist.local(x), ctx.dist.local(y))], {"chosen_split": None})
        t0 = time.perf_counter()
        d = ctx.dist
        reuse = o.split_reuse_first and o.split_update == "sequential"
        model = ctx.model if reuse else ctx.module  # a graph to reuse must come from the model that trains
        kept = KeptForwards(keep_graph=reuse)
        k, scores = choose_split(model, x, y, ctx.loss_fn, self.splits, o.criterion, seed=ctx.seed, step=ctx.step,
                                 autocast=ctx.autocast, dist=d, kept=kept)
        record = {"chosen_split": k, "candidates_s": time.perf_counter() - t0,
                  **{f"cand_loss_{s}": v for s, v in scores.items()}}
        rows = [chunk_rows(x.shape[0], k, j, d) for j in range(k)]
        chunks = [(x[r], y[r]) for r in rows]
        if o.split_update == "original":
            return self._original_plan(chunks, rows, x.shape[0] // k, ctx, record)
        steps = [ForwardStep(xs, ys, lr_scale=1.0 / k, rows=r) for (xs, ys), r in zip(chunks, rows)]
        if reuse:
            steps[0] = ReuseStep(kept.losses[k][0], kept.logits[k], chunks[0][1], lr_scale=1.0 / k,
                                 rows=rows[0])
        return Plan(steps, record)

    def _original_plan(self, chunks, rows, chunk_size: int, ctx: StepContext, record) -> Plan:
        params = list(ctx.module.parameters())
        k = len(chunks)
        clip = self.options.split_clip
        acc = [torch.zeros_like(p) for p in params]
        steps = []
        for (xs, ys), r in zip(chunks, rows):  # every gradient at the pre-step weights, as the stored graphs were
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
                                      lr_scale=1.0 / k, rows=r))
        return Plan(steps, record)
