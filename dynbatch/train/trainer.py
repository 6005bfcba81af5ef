"""The training loop: sampler -> policy plan -> executor -> rows, with exact resume.

One step: the policy names a batch size, the sampler draws that many indices of a seeded permutation, the device
pipeline augments them, the policy turns the batch into a :class:`~dynbatch.methods.Plan`, the executor applies it,
and the step's statistics stay on the device until its block of rows is flushed (``dynbatch.train.metrics``). At
the end of every epoch the test split is evaluated, an ``epoch`` row written, and ``checkpoint.pt`` saved
(``dynbatch.train.run_folder``). SIGINT/SIGTERM (or ``stop_after_steps``) checkpoint after the step in flight and stop.

Under ``torchrun`` (see ``dynbatch.distributed``) rank 0 alone writes the run folder, step and epoch sums are
reduced over ranks, all ranks stop at the same step, and a checkpoint resumes only with the number of ranks that
wrote it. The run's parts are built by ``dynbatch.train.build``.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dynbatch.data.text import TokenSplit
from dynbatch.distributed import Dist
from dynbatch.models.init import first_conv
from dynbatch.monitor import UtilisationMonitor
from dynbatch.train import loggers, run_folder
from dynbatch.train.build import build_run, describe
from dynbatch.train.config import TrainConfig
from dynbatch.train.evaluation import evaluate
from dynbatch.train.metrics import FLUSH_EVERY, Clock, MetricsSink, NonFiniteGuard, PendingStep
from dynbatch.train.schedules import scheduled_lr

__all__ = ["FLUSH_EVERY", "Trainer"]


class Trainer:
    """Build with :meth:`new` or :meth:`resume`; then :meth:`run`. All validation happens before the run folder is
    touched, so bad input never leaves a partial run behind."""

    def __init__(self, cfg: TrainConfig, out: Path, log: Callable[[str], None] = print,
                 given: dict[str, Any] | None = None, recorded_bf16: bool | None = None):
        self.given = dict(given or {})  # what the user gave, apart from the resolved settings: config.json re-runs
        self.out = Path(out)
        self.lock: int | None = None  # the run folder's lock (rank 0), held from creation or resume to the end
        self.log = log if Dist.rank_from_env() == 0 else (lambda msg: None)
        p = build_run(cfg.resolved(), self.log, recorded_bf16)
        self.cfg, self.device, self.dist, self.data, self.redraw = p.cfg, p.device, p.dist, p.data, p.redraw
        self.model, self.step_model, self.optimizer, self.policy = p.model, p.step_model, p.optimizer, p.policy
        self.precision, self.channels_last, self.executor, self.ctx = p.precision, p.channels_last, p.executor, p.ctx
        self.loss_fn, self.sampler, self.aug_gen, self.lookahead = p.loss_fn, p.sampler, p.aug_gen, p.lookahead
        self.progress = run_folder.Progress()
        self._base_lr = self.cfg.torch_hyperparameters()[0]  # the schedule's peak in torch's form, once
        self.metrics_offset: int | None = None  # bytes of metrics.jsonl the newest checkpoint accounts for
        self.checkpoint_step: int | None = None  # the step the newest checkpoint.pt was written at
        self.sink = MetricsSink(run_folder.NullWriter(), [], Clock(self.device))
        self.guard = NonFiniteGuard(self.cfg.on_nonfinite, self.cfg.nonfinite_limit, self.log)
        self.last_epoch: dict[str, Any] = {}
        self._stop_signal: int | None = None
        self._t0: float | None = None

    epoch = property(lambda self: self.progress.epoch)
    step = property(lambda self: self.progress.step)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def new(cls, cfg: TrainConfig, out: Path, overwrite: bool = False, **kw) -> "Trainer":
        t = cls(cfg, out, **kw)
        if t.dist.is_main:
            t.lock = run_folder.prepare_new_run(t.out, overwrite)
            try:
                t.write_config()
            except BaseException:
                run_folder.unlock_run(t.lock)
                run_folder.discard_new_run(t.out)
                raise
        return t

    @classmethod
    def resume(cls, run: Path, epochs: int | None = None, stop_after_steps: int | None = None, **kw) -> "Trainer":
        """Continue ``run`` from its checkpoint (``dynbatch.train.run_folder.resume``); ``epochs`` is the new total."""
        return run_folder.resume(cls, Path(run), epochs, stop_after_steps, **kw)

    # ---- state --------------------------------------------------------------------------------------------------
    def state(self, cuda_rng: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """The checkpoint (``dynbatch.train.run_folder``); ``cuda_rng`` holds every rank's CUDA generator state."""
        return run_folder.capture(self, self.progress.wall_s + self._elapsed(), cuda_rng)

    def load_state(self, checkpoint: dict[str, Any]) -> None:
        run_folder.restore(self, checkpoint)
        self.checkpoint_step = self.step
        self._epoch_freezing()

    def checkpoint(self) -> None:
        self._flush()  # the checkpoint counts every row and sum of the steps it contains
        run_folder.save_state(self, self._checkpoint_note())
        self.checkpoint_step = self.step

    def _checkpoint_note(self) -> str:
        if self.checkpoint_step is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint (step {self.checkpoint_step}) is intact"

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``; returns a summary. ``summary['interrupted']`` is the signal number or None."""
        cfg = self.cfg
        main = self.dist.is_main
        self.sink = MetricsSink(
            run_folder.MetricsWriter(self.out / "metrics.jsonl", truncate_to=self.metrics_offset) if main
            else run_folder.NullWriter(), loggers.open_loggers(cfg.log, self.out, self.checkpoint_step) if main else [],
            Clock(self.device))
        # What the monitor cannot sample matters only where there is a GPU to watch.
        on_note = (lambda m: self.log(f"utilisation: {m}")) if self.device.type == "cuda" else None
        monitor = UtilisationMonitor(cfg.util_interval, on_note=on_note).start()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._t0 = time.perf_counter()
        steps = 0
        all_ranks_here = False  # set where every rank leaves the loop at the same step
        try:
            while self.epoch < cfg.epochs:
                if self.sampler.pos == 0:
                    self._start_epoch()
                self.sink.open_bar(cfg.progress, self.sampler.n, self.sampler.pos,
                                   f"epoch {self.epoch + 1}/{cfg.epochs}")
                self._train_step()
                steps += 1
                if self.sampler.epoch_done:
                    self._end_epoch(monitor)
                stop = self._stop_signal is not None or bool(cfg.stop_after_steps and steps >= cfg.stop_after_steps)
                if self.dist.any(stop):  # every rank stops at the same step
                    self.checkpoint()
                    why = signal.Signals(self._stop_signal).name if self._stop_signal else "--stop-after-steps"
                    self.log(f"stopped by {why} at step {self.step}; checkpoint saved; continue with: "
                             f"dynbatch train --resume {self.out}")
                    all_ranks_here = True
                    return {"interrupted": self._stop_signal or 0, "out": str(self.out), "step": self.step}
            all_ranks_here = True
        finally:
            monitor.stop()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.sink.close()
            self.dist.close(all_ranks_here)
            run_folder.unlock_run(self.lock)
            self.lock = None
        return {"interrupted": None, "out": str(self.out), "step": self.step, **self.last_epoch}

    def _start_epoch(self) -> None:
        if self.redraw is not None:
            indices = self.redraw.at_epoch_start(self.epoch, self.policy.batch_size())
            if indices is not None:
                self.data.use_train_subset(indices)
        self.policy.on_epoch_start(self.epoch)
        keep = self.policy.epoch_samples(self.epoch, self.sampler.size)
        if keep is not None:
            self.sampler.restrict(keep)
        self._epoch_freezing()

    def _epoch_freezing(self) -> None:
        """What trains in this epoch (at its start, and on a resume mid-epoch): the whitening layer's bias for the
        first ``whiten_bias_epochs`` only."""
        if self.cfg.whiten:
            first_conv(self.model).bias.requires_grad_(self.epoch < self.cfg.whiten_bias_epochs)

    def _train_step(self) -> None:
        """One step, queued: its statistics stay on the device until the block is flushed, so the step itself asks
        the device for nothing (policies that choose, EDBA and split, read their own numbers)."""
        p, t0 = self.progress, self.sink.clock.now()
        lr = self.lr_at(p.epoch + self.sampler.pos / self.sampler.n)
        asked = self.policy.batch_size()
        idx = self.sampler.next(asked)
        x, y = self.data.train.batch(idx, self.aug_gen, p.epoch)  # --no-augment zeroed padding and flips
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.ctx.step, self.ctx.epoch, self.ctx.indices, self.ctx.lr = p.step, p.epoch, idx, lr
        if self.data.train.mislabeled is not None:  # label noise: which drawn samples carry a corrupted label
            self.ctx.mislabeled = self.data.train.mislabeled[idx.to(self.device, non_blocking=True)]
        plan = self.policy.plan(x, y, self.ctx)
        outcome = self.executor.run(plan, self.ctx, lr)
        stats = self.dist.all_reduce_sum(outcome.stats).unbind() if self.dist.enabled else outcome.parts
        p.samples_seen += idx.numel()
        if self.lookahead is not None:
            epoch = p.epoch + self.sampler.pos / self.sampler.n
            self.lookahead.after_step(p.step + 1, epoch, epoch / self.cfg.epochs)
        if outcome.oom_retries:
            plan.record.update(oom_retries=outcome.oom_retries, micro_batch=outcome.micro_batch, events=outcome.events)
            for e in outcome.events:
                self.log(f"step {p.step}: {e}")
        full = self.sink.queue(PendingStep(p.step, p.epoch, idx.numel(), asked, lr, p.samples_seen,
                                           p.wall_s + self._elapsed(), plan.record, stats, t0, self.sink.clock.now()))
        p.step += 1
        if full:
            self._flush()

    def _flush(self) -> None:
        """Write the queued rows (one device read for the block), add them to the epoch's sums, check each."""
        a, p = self.progress.epoch_acc, self.progress
        for row, loss_sum, correct, skipped, step_s in self.sink.flush():
            a["loss_sum"] += loss_sum
            a["correct"] += correct
            a["n"] += row["trained_samples"]
            a["time"] += step_s
            a["steps"] += 1
            if "mislabeled_batch" in row:  # counts back from the row's shares (exact: both are ratios of counts)
                a["drawn"] = a.get("drawn", 0) + row["batch_size"]
                a["mislabeled_drawn"] = a.get("mislabeled_drawn", 0.0) + row["mislabeled_batch"] * row["batch_size"]
                a["mislabeled_trained"] = (a.get("mislabeled_trained", 0.0)
                                           + row["mislabeled_trained"] * max(row["trained_samples"], 1))
            if skipped or p.nonfinite_streak:
                self.guard.check(p, skipped, row["lr"], loss_sum, row["step"], row["epoch"], self._checkpoint_note())

    def _end_epoch(self, monitor: UtilisationMonitor) -> None:
        self._flush()
        if self.lookahead is not None:
            self.lookahead.end_epoch()
        p, a = self.progress, self.progress.epoch_acc
        last = p.epoch + 1 == self.cfg.epochs
        evaluate = last or (p.epoch + 1) % self.cfg.eval_every == 0
        test_loss, test_acc = self.evaluate() if evaluate else (None, None)
        row = {"epoch": p.epoch, "step": p.step, "train_loss": a["loss_sum"] / max(a["n"], 1),
               "train_acc": a["correct"] / max(a["n"], 1), "test_loss": test_loss, "test_acc": test_acc,
               "epoch_s": a["time"], "steps": a["steps"], "trained_samples": a["n"], "samples_seen": p.samples_seen,
               "samples_per_s": self.sampler.n / max(a["time"], 1e-9), "wall_s": p.wall_s + self._elapsed(),
               **monitor.epoch_summary(self.dist), **self.policy.epoch_record()}
        if self.redraw is not None:
            row["distinct_train_images"] = self.redraw.distinct
        if test_loss is not None and isinstance(self.data.test, TokenSplit):  # per token, on the corpus's split
            row["test_ppl"] = math.exp(min(test_loss, 700.0))
        if last and self.cfg.tta:
            row["test_acc_tta"] = self.evaluate(tta=self.cfg.tta)[1]
        if a.get("drawn"):  # label precision over the epoch
            row["mislabeled_batch"] = a["mislabeled_drawn"] / a["drawn"]
            row["mislabeled_trained"] = a["mislabeled_trained"] / max(a["n"], 1)
        self.sink.record("epoch", row)
        self.last_epoch = {k: row[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")}
        self.sink.clear_bar()
        self.sink.close_bar()
        test = f"test loss {test_loss:.4f} acc {test_acc:.3f}" if test_acc is not None else "test -"
        self.log(f"epoch {p.epoch + 1:>3}/{self.cfg.epochs}  train loss {row['train_loss']:.4f} "
                 f"acc {row['train_acc']:.3f}  {test}  {a['time']:.1f}s  {row['samples_per_s']:.0f} img/s")
        p.next_epoch()
        self.sampler.new_epoch()
        self.checkpoint()

    def evaluate(self, tta: int = 0) -> tuple[float, float]:
        """(mean loss, accuracy) on the test split, centre crops (with test-time augmentation of level ``tta``),
        eval mode."""
        return evaluate(self.model, self.step_model, self.data.test, self.cfg.eval_batch, self.channels_last,
                        self.precision.autocast, tta)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    def write_config(self) -> None:
        """(Re)write ``config.json``: the resolved settings and what the user gave (``build.describe``)."""
        run_folder.write_json(self.out / "config.json", describe(self, self.given))

    def lr_at(self, progress: float) -> float:
        """The learning rate at ``progress`` (epochs, fractional): the schedule times the policy's factor."""
        cfg = self.cfg
        lr = scheduled_lr(progress, base_lr=self._base_lr, schedule=cfg.schedule, epochs=cfg.epochs,
                          warmup_epochs=cfg.warmup_epochs, milestones=cfg.milestones, gamma=cfg.gamma,
                          triangle=cfg.triangle)
        return lr * self.policy.lr_factor(progress)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second signal: the user insists
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log(f"received {signal.Signals(signum).name}: finishing the step in flight, then saving a checkpoint")
