"""Online batch-size selection for any PyTorch loop: forward one batch as 1, 2, 4 ... chunks, and choose the
chunking by its average loss.

:func:`choose_split` is the choice; :func:`candidate_forwards` the forwards it scores (train-mode, no graph, every
buffer restored, concurrent on CUDA streams); :class:`SplitOptions` the options with their defaults. The policy
``split`` of ``dynbatch train`` uses exactly these.
"""
from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from dynbatch.errors import UserError
from dynbatch.selectors.buffers import preserved_buffers
from dynbatch.selectors.options import option


def parse_splits(s: str) -> tuple[int, ...]:
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


@dataclass
class SplitOptions:
    base_batch: int | None = option(None, "samples per step (default: --batch-size, 256)")
    splits: str = option("1,2,4", "numbers of chunks to try, each dividing the base batch")
    criterion: str = option("min", "min, max or random")
    split_update: str = option("sequential", "sequential or original")
    split_clip: float = option(5.0, "gradient-norm clip of the original update")
    split_reuse_first: bool = option(False, "back-propagate the first chunk's candidate forward instead of "
                                            "recomputing it")

    @property
    def split_counts(self) -> tuple[int, ...]:
        return parse_splits(self.splits)

    def validate(self) -> None:
        """Raise ``UserError`` (a ``ValueError``) naming the first bad option, its range and an example."""
        splits = self.split_counts
        if not splits or any(k < 1 for k in splits) or len(set(splits)) != len(splits):
            raise UserError(f"--splits must be distinct positive integers (got {self.splits}); e.g. 1,2,4")
        if self.base_batch is not None and self.base_batch < 1:
            raise UserError(f"--base-batch must be positive (got {self.base_batch}); e.g. 256")
        if self.criterion not in CRITERIA:
            raise UserError(f"--criterion must be min, max or random (got {self.criterion!r}); min is the default")
        if self.split_update not in ("sequential", "original"):
            raise UserError(f"--split-update must be sequential or original (got {self.split_update!r}); "
                            "sequential is the default")
        if not self.split_clip > 0:
            raise UserError(f"--split-clip must be positive (got {self.split_clip}); e.g. 5")


CRITERIA = ("min", "max", "random")


def pick(scores: dict[int, float], criterion: str, seed: int = 0, step: int = 0) -> int:
    """The split a criterion picks from {chunks: mean loss}; ties go to the fewest chunks. ``random`` (the control)
    draws from (seed, step)."""
    if criterion == "random":
        return random.Random(seed * 1_000_003 + step).choice(sorted(scores))
    best = min if criterion == "min" else max
    return best(sorted(scores), key=lambda k: scores[k])


def choose_split(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None, splits=(1, 2, 4),
                 criterion: str = "min", *, seed: int = 0, step: int = 0, autocast=nullcontext, dist=None):
    """Online batch-size selection for one batch x (B, ...), y (B,): returns (chosen number of chunks, scores).

    Each split's score is the mean per-sample loss over all B samples from train-mode forwards of its chunks,
    with no graph and every buffer restored. ``loss_fn(logits, y)`` gives per-sample losses (default: cross
    entropy). Train on the chosen split's chunks ``x[chunk_rows(B, k, j)]`` at learning rate x 1/k.
    """
    loss_fn = loss_fn or (lambda z, t: nn.functional.cross_entropy(z, t, reduction="none"))
    bad = [k for k in splits if x.shape[0] % k]
    if bad:
        raise UserError(f"splits {', '.join(map(str, bad))} do not divide the batch of {x.shape[0]}; choose divisors")
    losses = candidate_forwards(model, x, y, splits, loss_fn, autocast, dist=dist)
    scores = split_scores(losses, splits, x.shape[0], dist)
    return pick(scores, criterion, seed, step), scores


def split_scores(losses: dict, splits, batch: int, dist=None) -> dict[int, float]:
    """{chunks: mean loss over the whole (global) batch} from :func:`candidate_forwards`' losses."""
    sums = torch.stack([torch.cat([v.detach() for v in losses[k]]).sum() for k in splits])
    if dist is not None and dist.enabled:
        sums = dist.all_reduce_sum(sums)
    return dict(zip(splits, (sums / batch).tolist()))  # one read for all the splits
