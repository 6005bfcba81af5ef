"""Resuming a run from its folder: its own settings, its checkpoint, the same number of ranks, and optionally a new
total of epochs (the schedule re-planned over it)."""
from __future__ import annotations

from pathlib import Path

from dynbatch.distributed import Dist
from dynbatch.errors import UserError
from dynbatch.train import records, state
from dynbatch.train.build import describe
from dynbatch.train.config import TrainConfig


def resume(trainer_cls, run: Path, epochs: int | None, stop_after_steps: int | None, **kw):
    """A ``trainer_cls`` continuing ``run``. ``epochs`` is the new total (None: the run's own); below the epochs
    already started it is an error. Extending a run re-plans the schedule over the new total."""
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be positive (got {epochs}); it is the run's new total of epochs")
    records.require_resumable(run)
    lock = records.lock_run(run) if Dist.rank_from_env() == 0 else None
    try:
        saved = records.read_config(run)
        cfg = TrainConfig.from_dict(saved["config"])
        checkpoint = records.load_checkpoint(run / "checkpoint.pt", state.CHECKPOINT_KEYS)
        cfg.stop_after_steps = stop_after_steps
        recorded_bf16 = saved.get("amp_bf16") if isinstance(saved.get("amp_bf16"), bool) else None
        t = trainer_cls(cfg, run, given=saved.get("given") if isinstance(saved.get("given"), dict) else {},
                        recorded_bf16=recorded_bf16, **kw)
        t._lock = lock
        _require_same_labels(saved, t.data.source.label_file_sha256)
        saved_world = checkpoint.get("world_size", 1)
        if saved_world != t.dist.world:
            raise UserError(f"{run} was trained on {saved_world} process(es), this launch has {t.dist.world}; "
                            f"resume with the same number (torchrun --nproc_per_node={saved_world} for one node)")
        t.load_state(checkpoint)
        if t.dist.is_main:
            records.verify_metrics(run / "metrics.jsonl", t.metrics_offset or 0)
        if epochs is not None and epochs != t.cfg.epochs:
            _extend(t, epochs)
    except BaseException:
        records.unlock_run(lock)
        raise
    return t


def _require_same_labels(saved: dict, sha256: str | None) -> None:
    """A run trained on a label file resumes only on the same labels: the file (and index map) it started with."""
    recorded = (saved.get("label_noise") or {}).get("sha256") if isinstance(saved.get("label_noise"), dict) else None
    if recorded and recorded != sha256:
        raise UserError(f"the label file {saved['label_noise'].get('asked', '')!r} (or its index map) changed since "
                        "the run started; restore the original file to resume, or start a new run")


def _extend(t, epochs: int) -> None:
    """Set a new total of epochs on the resumed trainer ``t`` (checked before config.json is rewritten)."""
    done = t.epoch + (t.sampler.pos > 0)
    if epochs < done:
        raise UserError(f"--epochs {epochs} is below the {done} epoch(s) this run has started; give at least "
                        f"{done} (--epochs is the new total)")
    progress = t.epoch + t.sampler.pos / t.sampler.n
    before = t._lr(progress)
    t.cfg.epochs = epochs
    if t.cfg.schedule != "constant":
        t.log(f"--epochs {epochs}: the {t.cfg.schedule} schedule is re-planned over {epochs} epochs; the learning "
              f"rate goes from {before:.4g} to {t._lr(progress):.4g} at epoch {progress:.2f}")
    if t.dist.is_main:
        records.write_json(t.out / "config.json", describe(t, t.given))
