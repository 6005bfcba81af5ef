"""Where a run's rows go: ``metrics.jsonl`` and the loggers, step rows held on the device until a block is
flushed, the progress bar, step clocks, and the guard against non-finite steps.

A step's statistics (loss sum, correct, trained samples, skipped updates, and under label noise the mislabeled
samples in the batch and among those trained on: 0-d device tensors) stay on the device; every ``FLUSH_EVERY``
steps (and at an epoch's end, before any checkpoint) one read brings the whole block
to the host, so a step itself asks the device for nothing.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from dynbatch.errors import Diverged

FLUSH_EVERY = 50  # steps whose rows are written together, after one read from the device


@dataclass(slots=True)
class PendingStep:
    """A step whose row waits for its block's read: the fields known on the host, the policy's record, the
    statistics on the device, and its clocks (``Clock.now``)."""

    step: int
    epoch: int
    batch_size: int  # what the loader drew
    policy_batch_size: int  # what the policy asked for
    lr: float
    samples_seen: int
    wall_s: float
    record: dict[str, Any]
    stats: tuple[torch.Tensor, ...]
    t0: Any
    t1: Any


class Clock:
    """Points in time: recorded CUDA events on a GPU (read after the flush's read, never waited for in a step),
    else the host clock (CPU work is done when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, t0, t1) -> float:
        if self.cuda:
            t1.synchronize()  # already complete after the flush's read; this only makes it certain
            return t0.elapsed_time(t1) / 1000.0
        return t1 - t0


class MetricsSink:
    """Rows to ``writer`` (a ``run_folder.MetricsWriter``, or ``NullWriter`` on ranks other than 0) and ``loggers``."""

    def __init__(self, writer, loggers: list, clock: Clock):
        self.writer, self.loggers, self.clock = writer, loggers, clock
        self.pending: list[PendingStep] = []
        self.bar = None

    def record(self, kind: str, row: dict[str, Any]) -> None:
        self.writer.write(kind, row)
        for lg in self.loggers:
            lg.write(kind, row)

    def queue(self, step: PendingStep) -> bool:
        """Hold ``step``'s row; True when a block is full and should be flushed."""
        self.pending.append(step)
        return len(self.pending) >= FLUSH_EVERY

    def flush(self) -> Iterator[tuple[dict[str, Any], float, int, int, float]]:
        """The queued step rows, written in step order after one read from the device for the whole block; yields
        (row, loss sum, correct, skipped updates, seconds) of each, for the caller's sums and checks."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        stats = torch.stack([t for p in pending for t in p.stats])
        # A record's 0-d device tensors (a policy's per-step statistic, e.g. the proxy's loss) join the same read.
        late = [(p.record, k) for p in pending for k, v in p.record.items() if isinstance(v, torch.Tensor)]
        if late:
            stats = torch.cat([stats.double(), torch.stack([r[k].reshape(()).double() for r, k in late])])
        flat, width = stats.tolist(), len(pending[0].stats)
        for i, (r, k) in enumerate(late):
            r[k] = flat[len(pending) * width + i]
        values = [flat[i * width:(i + 1) * width] for i in range(len(pending))]
        row = None
        for p, (loss_sum, correct, trained, skipped, *mislabeled) in zip(pending, values):
            # a count of correct samples, or for sequences a sum of token accuracies
            correct = int(correct) if float(correct).is_integer() else correct
            trained, skipped = int(round(trained)), int(skipped)
            step_s = self.clock.seconds(p.t0, p.t1)
            row = {"step": p.step, "epoch": p.epoch, "batch_size": p.batch_size,
                   "policy_batch_size": p.policy_batch_size, "trained_samples": trained, "lr": p.lr,
                   "train_loss": loss_sum / max(trained, 1), "train_acc": correct / max(trained, 1),
                   "samples_seen": p.samples_seen, "wall_s": p.wall_s, "step_s": step_s, **p.record}
            if skipped:
                row["nonfinite_skipped"] = skipped
            if mislabeled:  # label precision: the share of corrupted labels drawn, and among those trained on
                row["mislabeled_batch"] = mislabeled[0] / max(p.batch_size, 1)
                row["mislabeled_trained"] = mislabeled[1] / max(trained, 1)
            self.record("step", row)
            yield row, loss_sum, correct, skipped, step_s
            if self.bar is not None:
                self.bar.update(p.batch_size)
        if self.bar is not None:
            # tqdm shows the rate itself, in img/s (its unit); the postfix adds the latest step's numbers.
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                                 batch=row["batch_size"])

    def open_bar(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        if self.bar is None and enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", leave=False, desc=desc, dynamic_ncols=True)

    def clear_bar(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        self.writer.close()
        for lg in self.loggers:
            lg.close()


class NonFiniteGuard:
    """Stop (``on_nonfinite="stop"``) or count a step whose update was skipped because its loss or gradient was
    not finite; ``skip`` stops after ``limit`` such steps in a row."""

    def __init__(self, action: str, limit: int, log: Callable[[str], None]):
        self.action, self.limit, self.log = action, limit, log

    def check(self, progress, skipped: int, lr: float, loss_sum: float, step: int, epoch: int, note: str) -> None:
        if not skipped:
            progress.nonfinite_streak = 0
            return
        progress.nonfinite_streak += 1
        streak = progress.nonfinite_streak
        if self.action == "skip" and streak < self.limit:
            self.log(f"step {step}: non-finite loss or gradient; update skipped ({streak} in a row, limit "
                     f"{self.limit})")
            return
        what = "loss" if not math.isfinite(loss_sum) else "gradient"
        in_a_row = f" for {streak} steps in a row" if self.action == "skip" else ""
        raise Diverged(f"training diverged at step {step} (epoch {epoch + 1}): the {what} is not finite{in_a_row} "
                       f"at learning rate {lr:.4g}; no such update was applied and {note}; lower --lr or raise "
                       "--warmup-epochs and start again with --overwrite, or pass --on-nonfinite skip")
