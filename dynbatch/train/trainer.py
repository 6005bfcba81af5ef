"""The training orchestrator: sampler -> policy plan -> executor -> records, with exact resume.

One step: the policy names a batch size, the sampler draws that many indices of a seeded permutation, the device
pipeline augments them, the policy turns the batch into a :class:`~dynbatch.methods.Plan`, the executor applies
it, and the step's statistics stay on the device; every ``FLUSH_EVERY`` steps (and at an epoch's end, before any
checkpoint) one read brings a block of them to the host and their ``step`` rows go to ``metrics.jsonl``. At the end of every epoch the test split is evaluated, an
``epoch`` row written, and ``checkpoint.pt`` saved. SIGINT/SIGTERM (or ``stop_after_steps``) checkpoint after the
step in flight and stop.

Under ``torchrun`` (see ``dynbatch.distributed``) the model is wrapped in DistributedDataParallel, rank 0
alone writes the run folder, step and epoch sums are reduced over ranks, all ranks stop at the same step, and a
checkpoint resumes only with the number of ranks that wrote it.
"""
from __future__ import annotations

import math
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dynbatch.data import DeviceData, VariableBatchSampler, balanced_subset, load_dataset
from dynbatch.errors import Diverged, UserError
from dynbatch.info import package_versions
from dynbatch.models import build_model
from dynbatch.monitor import UtilisationMonitor
from dynbatch.methods import StepContext, policy_class
from dynbatch.train import loggers, precision, records
from dynbatch.train.config import TrainConfig
from dynbatch.distributed import Dist
from dynbatch.train.executor import PlanExecutor
from dynbatch.train.optim import build_optimizer
from dynbatch.train.redraw import SubsetRedraw
from dynbatch.train.schedules import scheduled_lr

CHECKPOINT_VERSION = 2  # 2: one CUDA generator state per rank
FLUSH_EVERY = 50  # steps whose rows are written together, after one read from the device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


class Trainer:
    """Build with :meth:`new` or :meth:`resume`; then :meth:`run`.

    All validation (options, data, model) happens before the run folder is touched, so bad input never leaves a
    partial run behind.
    """

    def __init__(self, cfg: TrainConfig, out: Path, log: Callable[[str], None] = print,
                 given: dict[str, Any] | None = None):
        # What the user gave stays apart from the resolved settings, so config.json re-runs exactly.
        self.given = dict(given or {})
        self.cfg = cfg = cfg.resolved()
        self.out, self.log = Path(out), log
        self._lock: int | None = None
        cfg.validate()
        self.policy_cls = policy_class(cfg.policy)
        self.policy_cls.validate(cfg.policy_options)
        self.device = resolve_device(cfg.device)
        self.dist = Dist.from_env(self.device.type)
        if self.dist.enabled:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.dist.local_rank)
                torch.cuda.set_device(self.device)
            if not self.dist.is_main:
                self.log = lambda msg: None
            if cfg.batch_size < self.dist.world:
                raise UserError(f"--batch-size {cfg.batch_size} is below the {self.dist.world} ranks, which each need "
                                f"a sample; give at least {self.dist.world}")
        on_cuda = self.device.type == "cuda"

        src = load_dataset(cfg.data, cfg.data_dir, cfg.num_classes, cfg.image_size)
        if not cfg.augment:
            src.crop_padding, src.flip = 0, False
        n_train = len(src.y_train)
        subset = None
        train_samples = cfg.train_samples
        if cfg.train_fraction is not None:
            train_samples = max(1, round(cfg.train_fraction * n_train))
        if train_samples is not None:
            subset = balanced_subset(src.y_train, train_samples, cfg.seed)
        self.data = DeviceData(src, self.device, subset)
        self.redraw = (SubsetRedraw(cfg.redraw_subset, src.y_train, subset, cfg.seed)
                       if cfg.redraw_subset != "never" else None)

        torch.manual_seed(cfg.seed)
        c = src.image_shape[0]
        self.model = build_model(cfg.model, src.num_classes, c).to(self.device)
        self.precision = precision.resolve(cfg.amp, cfg.channels_last, self.device, self.model)
        if self.precision.bf16 and self.device.type == "cpu" and not precision.cpu_has_native_bf16():
            self.log("note: --amp bf16 on a CPU without native bf16 (avx512_bf16 or amx_bf16) is emulated and much "
                     "slower than fp32; --amp auto chooses fp32 here")
        self.channels_last = self.precision.channels_last
        # Before any wrapper (DDP builds its gradient buckets from the parameters' layout as it finds them).
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()  # once: the steps do not switch modes (evaluate() switches back itself)
        wrapped = self.model
        if cfg.sync_bn and not on_cuda:
            raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm is GPU-only); on CPU use a model without "
                            "BatchNorm statistics, such as preresnet20_gn")
        if self.dist.enabled:
            if cfg.sync_bn:
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            wrapped = self._ddp(self.model, on_cuda)
        # The (compiled, DDP) wrapper runs the steps; checkpoints always hold the plain module's state.
        self.step_model = torch.compile(wrapped, dynamic=True) if cfg.compile else wrapped
        self.optimizer = build_optimizer(cfg.optimizer, self.model, lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=bool(cfg.nesterov), weight_decay=cfg.weight_decay)
        self.policy = self.policy_cls(cfg.policy_options, batch_size=cfg.batch_size, config=cfg)
        self.policy.check_world_size(self.dist.world)
        self.executor = PlanExecutor(self.step_model, self.optimizer, cfg.micro_batch, dist=self.dist,
                                     restore_buffers_on_skip=cfg.on_nonfinite == "skip")
        # One context for the run; _train_step advances its step and epoch.
        self.ctx = StepContext(model=self.step_model, module=self.model, loss_fn=self.loss_fn, autocast=self.autocast,
                               device=self.device, seed=cfg.seed, label_smoothing=cfg.label_smoothing,
                               dist=self.dist)
        self.sampler = VariableBatchSampler(len(self.data.train), cfg.seed + 1, self.device)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
        # Progress counters; all of them go into the checkpoint.
        self.epoch = 0
        self.step = 0
        self.samples_seen = 0
        self.wall_offset = 0.0
        self.epoch_acc = {"loss_sum": 0.0, "correct": 0, "n": 0, "time": 0.0, "steps": 0}
        self.metrics_offset: int | None = None
        self.nonfinite_streak = 0  # consecutive steps with a skipped (non-finite) update
        self.checkpoint_step: int | None = None  # the step the newest checkpoint.pt was written at
        # Steps whose rows wait for the block's one device read: (known fields, policy record, stats, t0, t1).
        self._pending: list[tuple] = []
        self._bar = None
        self.last_epoch: dict[str, Any] = {}
        self._stop_signal: int | None = None

    def _ddp(self, model: torch.nn.Module, on_cuda: bool) -> torch.nn.Module:
        """DistributedDataParallel without buffer syncs in forwards: no hidden collective in forwards that only
        some code paths run; ``--sync-bn`` gives global BatchNorm statistics instead."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = {"device_ids": [self.device.index] if on_cuda else None}
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kw["forward_sync_buffers"] = False
        else:
            kw["broadcast_buffers"] = False
        return DDP(model, **kw)

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def new(cls, cfg: TrainConfig, out: Path, overwrite: bool = False, **kw) -> "Trainer":
        t = cls(cfg, out, **kw)
        if t.dist.is_main:
            t._lock = records.prepare_new_run(t.out, overwrite)
            try:
                records.write_json(t.out / "config.json", t.describe())
            except BaseException:
                records.unlock_run(t._lock)
                records.discard_new_run(t.out)
                raise
        return t

    @classmethod
    def resume(cls, run: Path, epochs: int | None = None, stop_after_steps: int | None = None, **kw) -> "Trainer":
        """Continue ``run`` from its checkpoint. ``epochs`` is the new total (None: the run's own); below the
        epochs already done it is an error. Extending a run re-plans the schedule over the new total."""
        run = Path(run)
        if epochs is not None and epochs < 1:
            raise UserError(f"--epochs must be positive (got {epochs}); it is the run's new total of epochs")
        records.require_resumable(run)
        lock = records.lock_run(run) if Dist.rank_from_env() == 0 else None
        try:
            saved = records.read_config(run)
            cfg = TrainConfig.from_dict(saved["config"])
            state = records.load_checkpoint(run / "checkpoint.pt")
            cfg.stop_after_steps = stop_after_steps
            given = saved.get("given") if isinstance(saved.get("given"), dict) else {}
            t = cls(cfg, run, given=given, **kw)
            t._lock = lock
            saved_world = state.get("world_size", 1)
            if saved_world != t.dist.world:
                raise UserError(f"{run} was trained on {saved_world} process(es), this launch has {t.dist.world}; "
                                f"resume with the same number (torchrun --nproc_per_node={saved_world} for one node)")
            t.load_state(state)
            if t.dist.is_main:
                records.verify_metrics(run / "metrics.jsonl", t.metrics_offset or 0)
            if epochs is not None and epochs != t.cfg.epochs:
                t._extend(epochs)
        except BaseException:
            records.unlock_run(lock)
            raise
        return t

    def _extend(self, epochs: int) -> None:
        """Set a new total of epochs on a resumed run (checked before config.json is rewritten)."""
        cfg = self.cfg
        done = self.epoch + (self.sampler.pos > 0)
        if epochs < done:
            raise UserError(f"--epochs {epochs} is below the {done} epoch(s) this run has started; give at least "
                            f"{done} (--epochs is the new total)")
        progress = self.epoch + self.sampler.pos / self.sampler.n
        before = self._lr(progress)
        cfg.epochs = epochs
        if cfg.schedule != "constant":
            self.log(f"--epochs {epochs}: the {cfg.schedule} schedule is re-planned over {epochs} epochs; the "
                     f"learning rate goes from {before:.4g} to {self._lr(progress):.4g} at epoch {progress:.2f}")
        if self.dist.is_main:
            records.write_json(self.out / "config.json", self.describe())

    def describe(self) -> dict[str, Any]:
        dev = self.device
        return {
            "config": self.cfg.to_dict(),
            "given": {k: v for k, v in self.given.items() if k not in ("out", "overwrite", "autoresume")},
            "versions": package_versions(),
            "device": {"type": dev.type, "name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                       else platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
            "data": {"name": self.data.source.name, "train_samples": len(self.data.train),
                     "test_samples": len(self.data.test), "num_classes": self.data.source.num_classes,
                     "image_shape": list(self.data.source.image_shape)},
            "precision": self.precision.name, "amp_bf16": self.precision.bf16, "channels_last": self.channels_last,
            "world_size": self.dist.world,
            "command": sys.argv,
        }

    # ---- state --------------------------------------------------------------------------------------------------
    def state(self, cuda_rng: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs; ``cuda_rng`` holds every rank's CUDA generator state, by rank."""
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
            "micro_batch": self.executor.micro_batch,
            "progress": {"epoch": self.epoch, "step": self.step, "samples_seen": self.samples_seen,
                         "wall_s": self.wall_offset + self._elapsed(), "epoch_acc": dict(self.epoch_acc),
                         "nonfinite_streak": self.nonfinite_streak},
            "metrics_offset": self.metrics_offset,
            "world_size": self.dist.world,
            "redraw": self.redraw.state_dict() if self.redraw is not None else None,
        }

    def load_state(self, s: dict[str, Any]) -> None:
        if s.get("version") != CHECKPOINT_VERSION:
            raise UserError("checkpoint was written by an incompatible dynbatch version; start a new run "
                            f"with --out {self.out} --overwrite")
        try:
            self.model.load_state_dict(s["model"])
            self.optimizer.load_state_dict(s["optimizer"])
            self.policy.load_state_dict(s["policy"])
            self.sampler.load_state_dict(s["sampler"])
            self.aug_gen.set_state(s["aug_gen"])
            torch.set_rng_state(s["torch_rng"])
            if s["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(s["cuda_rng"][self.dist.rank], self.device)
            self.executor.micro_batch = s["micro_batch"]
            p = s["progress"]
            self.epoch, self.step, self.samples_seen = int(p["epoch"]), int(p["step"]), int(p["samples_seen"])
            self.wall_offset, self.epoch_acc = float(p["wall_s"]), dict(p["epoch_acc"])
            self.nonfinite_streak = int(p.get("nonfinite_streak", 0))
            self.metrics_offset = s["metrics_offset"]
            if self.redraw is not None:
                self.redraw.load_state_dict(s["redraw"])
                self.data.use_train_subset(self.redraw.indices)
            self.checkpoint_step = self.step
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{self.out}/checkpoint.pt does not fit the run's config.json ({first[:160]}); restore "
                            f"the config.json written with it, or start again with --out {self.out} --overwrite"
                            ) from None

    def checkpoint(self) -> None:
        self._flush()  # the checkpoint counts every row and sum of the steps it contains
        # A finite gradient times a huge learning rate can still overflow the weights; such a state is never
        # written over the last good checkpoint. One read per checkpoint; every rank decides together.
        floats = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        if self.dist.any(not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())):
            raise Diverged(f"training diverged by step {self.step}: the weights are not finite (a finite gradient "
                           f"times the learning rate overflowed them); {self._checkpoint_note()}; lower --lr or raise --warmup-epochs and start again "
                           "with --overwrite")
        # A collective: every rank sends its own CUDA generator state, rank 0 writes them all.
        cuda_rng = (self.dist.gather_objects(torch.cuda.get_rng_state(self.device))
                    if self.device.type == "cuda" else None)
        if self.dist.is_main:
            self.metrics_offset = self.metrics.offset()
            records.save_checkpoint(self.out / "checkpoint.pt", self.state(cuda_rng))
        self.checkpoint_step = self.step

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0

    def autocast(self):
        return self.precision.autocast()

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=self.cfg.label_smoothing)

    def _lr(self, progress: float) -> float:
        cfg = self.cfg
        lr = scheduled_lr(progress, base_lr=cfg.lr, schedule=cfg.schedule, epochs=cfg.epochs,
                          warmup_epochs=cfg.warmup_epochs, milestones=cfg.milestones, gamma=cfg.gamma)
        return lr * self.policy.lr_factor(progress)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean loss, accuracy) on the test split, centre crops, eval mode."""
        self.model.eval()
        split = self.data.test
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct: read once, at the end
        for start in range(0, len(split), self.cfg.eval_batch):
            idx = torch.arange(start, min(start + self.cfg.eval_batch, len(split)), device=self.device)
            x, y = split.batch(idx)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                logits = self.step_model(x).float()
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()])
        self.model.train()
        loss, correct = sums.tolist()
        return loss / len(split), int(correct) / len(split)

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second signal: the user insists
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.log(f"received {signal.Signals(signum).name}: finishing the step in flight, then saving a checkpoint")

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``cfg.epochs``; returns a summary. ``summary['interrupted']`` is the signal number or None."""
        cfg = self.cfg
        self.metrics = (records.MetricsWriter(self.out / "metrics.jsonl", truncate_to=self.metrics_offset)
                        if self.dist.is_main else records.NullWriter())
        self.loggers = loggers.open_loggers(cfg.log, self.out, self.checkpoint_step) if self.dist.is_main else []
        # What the monitor cannot sample matters only where there is a GPU to watch.
        on_note = (lambda m: self.log(f"utilisation: {m}")) if self.device.type == "cuda" else None
        monitor = UtilisationMonitor(cfg.util_interval, on_note=on_note).start()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._t0 = time.perf_counter()
        steps_this_session = 0
        try:
            while self.epoch < cfg.epochs:
                if self.sampler.pos == 0:
                    self._redraw_subset()
                    self.policy.on_epoch_start(self.epoch)
                self._bar = self._bar or self._progress_bar()
                self._train_step()
                steps_this_session += 1
                if self.sampler.epoch_done:
                    self._end_epoch(monitor)
                    if self._bar is not None:
                        self._bar.close()
                        self._bar = None
                stop = self._stop_signal is not None or bool(cfg.stop_after_steps and
                                                             steps_this_session >= cfg.stop_after_steps)
                if self.dist.any(stop):  # every rank stops at the same step
                    self.checkpoint()
                    why = signal.Signals(self._stop_signal).name if self._stop_signal else "--stop-after-steps"
                    self.log(f"stopped by {why} at step {self.step}; checkpoint saved; continue with: "
                             f"dynbatch train --resume {self.out}")
                    return {"interrupted": self._stop_signal or 0, "out": str(self.out), "step": self.step}
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            monitor.stop()
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.metrics.close()
            for lg in self.loggers:
                lg.close()
            self.dist.close()
            records.unlock_run(self._lock)
            self._lock = None
        return {"interrupted": None, "out": str(self.out), "step": self.step, **self.last_epoch}

    def _redraw_subset(self) -> None:
        if self.redraw is not None:
            indices = self.redraw.at_epoch_start(self.epoch, self.policy.batch_size())
            if indices is not None:
                self.data.use_train_subset(indices)

    def _progress_bar(self):
        if not self.cfg.progress or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=len(self.data.train), initial=self.sampler.pos, unit="img", leave=False,
                    desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}", dynamic_ncols=True)

    def _clock(self):
        """A point in time: a recorded CUDA event on a GPU (read at the flush, never waited for here), else the
        host clock (CPU work is done when the call returns)."""
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _seconds(self, t0, t1) -> float:
        if self.device.type == "cuda":
            t1.synchronize()  # already complete after the flush's read; this only makes it certain
            return t0.elapsed_time(t1) / 1000.0
        return t1 - t0

    def _train_step(self) -> None:
        """One step, queued: its statistics stay on the device until the block is flushed (:meth:`_flush`), so the
        step itself asks the device for nothing (policies that choose, EDBA and split, read their own numbers)."""
        t0 = self._clock()
        lr = self._lr(self.epoch + self.sampler.pos / self.sampler.n)
        asked = self.policy.batch_size()
        idx = self.sampler.next(asked)
        x, y = self.data.train.batch(idx, self.aug_gen)  # --no-augment zeroed padding and flips above
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = self.ctx
        ctx.step, ctx.epoch = self.step, self.epoch
        plan = self.policy.plan(x, y, ctx)
        outcome = self.executor.run(plan, ctx, lr)
        record = plan.record
        stats = self.dist.all_reduce_sum(outcome.stats).unbind() if self.dist.enabled else outcome.parts
        self.samples_seen += idx.numel()
        if outcome.oom_retries:
            record.update(oom_retries=outcome.oom_retries, micro_batch=outcome.micro_batch, events=outcome.events)
            for e in outcome.events:
                self.log(f"step {self.step}: {e}")
        # (step, epoch, batch_size, policy_batch_size, lr, samples_seen, wall_s): the row's fields known now
        known = (self.step, self.epoch, idx.numel(), asked, lr, self.samples_seen, self.wall_offset + self._elapsed())
        self._pending.append((known, record, stats, t0, self._clock()))
        self.step += 1
        if len(self._pending) >= FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        """Write the queued step rows, with one read from the device for the whole block (stats (4,) per step:
        loss sum, correct, trained samples, skipped updates), in step order; then the non-finite guard and the
        progress bar. Runs every ``FLUSH_EVERY`` steps, at the end of an epoch and before any checkpoint."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        values = torch.stack([t for p in pending for t in p[2]]).view(-1, 4).tolist()
        a = self.epoch_acc
        for ((step, epoch, batch, asked, lr, seen, wall), record, _, t0, t1), (loss_sum, correct, trained, skipped) \
                in zip(pending, values):
            correct, trained, skipped = int(correct), int(round(trained)), int(skipped)
            step_s = self._seconds(t0, t1)
            a["loss_sum"] += loss_sum
            a["correct"] += correct
            a["n"] += trained
            a["time"] += step_s
            a["steps"] += 1
            row = {"step": step, "epoch": epoch, "batch_size": batch, "policy_batch_size": asked,
                   "trained_samples": trained, "lr": lr, "train_loss": loss_sum / max(trained, 1),
                   "train_acc": correct / max(trained, 1), "samples_seen": seen, "wall_s": wall, "step_s": step_s,
                   **record}
            if skipped:
                row["nonfinite_skipped"] = skipped
            self._record("step", row)
            if skipped or self.nonfinite_streak:
                self._guard_nonfinite(skipped, lr, loss_sum, step, epoch)
            if self._bar is not None:
                self._bar.update(batch)
        if self._bar is not None:
            # tqdm shows the rate itself, in img/s (its unit); the postfix adds the latest step's numbers.
            self._bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                                  batch=row["batch_size"])

    def _record(self, kind: str, row: dict[str, Any]) -> None:
        self.metrics.write(kind, row)
        for lg in self.loggers:
            lg.write(kind, row)

    def _guard_nonfinite(self, skipped: int, lr: float, loss_sum: float, step: int, epoch: int) -> None:
        """Stop (default) or count a step whose update was skipped because its loss or gradient was not finite."""
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        cfg = self.cfg
        if cfg.on_nonfinite == "skip" and self.nonfinite_streak < cfg.nonfinite_limit:
            self.log(f"step {step}: non-finite loss or gradient; update skipped "
                     f"({self.nonfinite_streak} in a row, limit {cfg.nonfinite_limit})")
            return
        what = "loss" if not math.isfinite(loss_sum) else "gradient"
        streak = f" for {self.nonfinite_streak} steps in a row" if cfg.on_nonfinite == "skip" else ""
        raise Diverged(f"training diverged at step {step} (epoch {epoch + 1}): the {what} is not finite"
                       f"{streak} at learning rate {lr:.4g}; no such update was applied and {self._checkpoint_note()}; "
                       "lower --lr or raise --warmup-epochs and start again with --overwrite, or pass "
                       "--on-nonfinite skip")

    def _checkpoint_note(self) -> str:
        if self.checkpoint_step is None:
            return "no checkpoint was written yet"
        return f"the last checkpoint (step {self.checkpoint_step}) is intact"

    def _utilisation(self, monitor: UtilisationMonitor) -> dict[str, Any]:
        """This epoch's utilisation summary; under DDP every rank's, rank r's fields as ``util_rank<r>_*``."""
        per_rank = self.dist.gather_objects(monitor.summary())
        out = dict(per_rank[0])
        for r, summary in enumerate(per_rank[1:], start=1):
            out.update({k.replace("util_", f"util_rank{r}_", 1): v for k, v in summary.items()})
        return out

    def _end_epoch(self, monitor: UtilisationMonitor) -> None:
        self._flush()
        last = self.epoch + 1 == self.cfg.epochs
        if last or (self.epoch + 1) % self.cfg.eval_every == 0:
            test_loss, test_acc = self.evaluate()
        else:
            test_loss = test_acc = None
        a = self.epoch_acc
        row = {
            "epoch": self.epoch, "step": self.step, "train_loss": a["loss_sum"] / max(a["n"], 1),
            "train_acc": a["correct"] / max(a["n"], 1), "test_loss": test_loss, "test_acc": test_acc,
            "epoch_s": a["time"], "steps": a["steps"], "trained_samples": a["n"],
            "samples_seen": self.samples_seen, "samples_per_s": len(self.data.train) / max(a["time"], 1e-9),
            "wall_s": self.wall_offset + self._elapsed(), **self._utilisation(monitor),
        }
        if self.redraw is not None:
            row["distinct_train_images"] = self.redraw.distinct
        self._record("epoch", row)
        self.last_epoch = {k: row[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")}
        if self._bar is not None:
            self._bar.clear()
        test = f"test loss {test_loss:.4f} acc {test_acc:.3f}" if test_acc is not None else "test -"
        self.log(f"epoch {self.epoch + 1:>3}/{self.cfg.epochs}  train loss {row['train_loss']:.4f} "
                 f"acc {row['train_acc']:.3f}  {test}  {a['time']:.1f}s  {row['samples_per_s']:.0f} img/s")
        self.epoch += 1
        self.epoch_acc = {"loss_sum": 0.0, "correct": 0, "n": 0, "time": 0.0, "steps": 0}
        self.sampler.new_epoch()
        self.checkpoint()
