"""The run state: the one place that defines what ``checkpoint.pt`` holds and how a run is put back from it.

A checkpoint holds the model, optimizer, policy, sampler and every generator's state, the progress counters, the
byte length of ``metrics.jsonl`` it accounts for, and the number of ranks that wrote it; every rank's CUDA
generator state, by rank. Reading the file (safely, ``weights_only``) is ``records.load_checkpoint``'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dynbatch.errors import Diverged, UserError
from dynbatch.train import records

CHECKPOINT_VERSION = 2  # 2: one CUDA generator state per rank
CHECKPOINT_KEYS = ("version", "model", "optimizer", "policy", "sampler", "aug_gen", "torch_rng", "cuda_rng",
                   "micro_batch", "progress", "metrics_offset", "world_size")


def _new_epoch_sums() -> dict[str, Any]:
    # mislabeled_*: corrupted labels among the samples drawn and among those trained on (runs with label noise)
    return {"loss_sum": 0.0, "correct": 0, "n": 0, "time": 0.0, "steps": 0, "drawn": 0, "mislabeled_drawn": 0.0,
            "mislabeled_trained": 0.0}


@dataclass
class Progress:
    """The counters a run advances; all of them go into the checkpoint. ``epoch_acc`` sums the current epoch's
    step rows; ``nonfinite_streak`` counts consecutive steps whose update was skipped."""

    epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    wall_s: float = 0.0  # training time of earlier sessions of this run
    epoch_acc: dict[str, Any] = field(default_factory=_new_epoch_sums)
    nonfinite_streak: int = 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.epoch_acc = _new_epoch_sums()


def capture(run, wall_s: float, cuda_rng: list[torch.Tensor] | None) -> dict[str, Any]:
    """Everything a resumed run needs from ``run`` (a Trainer), its progress with ``wall_s`` of training so far."""
    p = run.progress
    return {
        "version": CHECKPOINT_VERSION,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "policy": run.policy.state_dict(),
        "sampler": run.sampler.state_dict(),
        "aug_gen": run.aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": cuda_rng,
        "micro_batch": run.executor.micro_batch,
        "progress": {"epoch": p.epoch, "step": p.step, "samples_seen": p.samples_seen, "wall_s": wall_s,
                     "epoch_acc": dict(p.epoch_acc), "nonfinite_streak": p.nonfinite_streak},
        "metrics_offset": run.metrics_offset,
        "world_size": run.dist.world,
        "redraw": run.redraw.state_dict() if run.redraw is not None else None,
        "lookahead": run.lookahead.state_dict() if run.lookahead is not None else None,
    }


def restore(run, s: dict[str, Any]) -> None:
    """Put ``run`` back into the state ``s`` (a checkpoint of the same config); a mismatch is one ``UserError``."""
    if s.get("version") != CHECKPOINT_VERSION:
        raise UserError("checkpoint was written by an incompatible dynbatch version; start a new run "
                        f"with --out {run.out} --overwrite")
    try:
        run.model.load_state_dict(s["model"])
        run.optimizer.load_state_dict(s["optimizer"])
        run.policy.load_state_dict(s["policy"])
        run.sampler.load_state_dict(s["sampler"])
        run.aug_gen.set_state(s["aug_gen"])
        torch.set_rng_state(s["torch_rng"])
        if s["cuda_rng"] is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda_rng"][run.dist.rank], run.device)
        run.executor.micro_batch = s["micro_batch"]
        p = s["progress"]
        run.progress = Progress(int(p["epoch"]), int(p["step"]), int(p["samples_seen"]), float(p["wall_s"]),
                                dict(p["epoch_acc"]), int(p.get("nonfinite_streak", 0)))
        run.metrics_offset = s["metrics_offset"]
        if run.redraw is not None:
            run.redraw.load_state_dict(s["redraw"])
            run.data.use_train_subset(run.redraw.indices)
        if run.lookahead is not None:
            run.lookahead.load_state_dict(s["lookahead"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{run.out}/checkpoint.pt does not fit the run's config.json ({first[:160]}); restore the "
                        f"config.json written with it, or start again with --out {run.out} --overwrite") from None



def save(run, note: str) -> None:
    """Write ``run``'s checkpoint (rank 0; every rank takes part), unless its weights are not finite: a finite
    gradient times a huge learning rate can still overflow them, and such a state never replaces the last good
    checkpoint (``note`` says which that is). One read per checkpoint; every rank decides together."""
    floats = [t for t in run.model.state_dict().values() if t.is_floating_point()]
    if run.dist.any(not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())):
        raise Diverged(f"training diverged by step {run.step}: the weights are not finite (a finite gradient times "
                       f"the learning rate overflowed them); {note}; lower --lr or raise --warmup-epochs and start "
                       "again with --overwrite")
    # A collective: every rank sends its own CUDA generator state, rank 0 writes them all.
    cuda_rng = run.dist.gather_objects(torch.cuda.get_rng_state(run.device)) if run.device.type == "cuda" else None
    if run.dist.is_main:
        run.metrics_offset = run.sink.writer.offset()
        records.save_checkpoint(run.out / "checkpoint.pt", run.state(cuda_rng))
