"""The run folder, its one owner: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``curves.png`` and the
lock ``.lock``; what a checkpoint holds and how a trainer is put back from it; resuming a run.

Guarantees (each tested in ``tests/test_reliability.py``):

- JSON and checkpoints go to a temporary file that is fsynced and renamed into place, so an interruption at any
  moment (a signal, ``kill -9``, a full disk) leaves the previous version whole; the temporary file is removed on
  any failure, and a full disk is a one-line error.
- The checkpoint records how many bytes of ``metrics.jsonl`` belong to it. On resume the file must hold at least
  that many bytes of whole, parseable rows: rows written after the checkpoint are cut (never duplicated), and a
  file that lost rows is refused, never padded.
- A process that writes a run folder holds an exclusive ``flock`` on ``.lock`` for its whole life; the kernel
  releases it when the process ends, however it ends.
- Checkpoints load with ``weights_only=True``: a planted ``checkpoint.pt`` cannot run code.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynbatch.distributed import Dist
from dynbatch.errors import Diverged, RunFailure, UserError
from dynbatch.train.config import TrainConfig

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png")
LOCK = ".lock"


def _os_problem(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _write_failure(path: Path, e: OSError) -> RunFailure:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return RunFailure(f"the disk is full: cannot write {path}; free space there, then continue with "
                          f"dynbatch train --resume {path.parent} (the last checkpoint is intact)")
    return RunFailure(f"cannot write {path} ({_os_problem(e)}); make the folder writable, then continue with "
                      f"dynbatch train --resume {path.parent} (the last checkpoint is intact)")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_failure(path, e) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: config.json stays JSON (NaN/Infinity are refused at parse time, so this never fires for
    # validated settings).
    text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"
    _atomic_write(path, lambda f: f.write(text.encode()))


_ROW_ENCODER = json.JSONEncoder(check_circular=False, allow_nan=False, default=str)


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; null keeps each line parseable by any reader.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# ---- the lock -------------------------------------------------------------------------------------------------------
def lock_run(out: Path) -> int:
    """Take the run folder's exclusive lock (the folder must exist); returns the descriptor that holds it."""
    try:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create {out / LOCK} ({_os_problem(e)}); choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{out} is in use by another dynbatch process; wait for it to finish (or stop it: it "
                        f"checkpoints on SIGTERM), then resume with --resume {out}") from None
    return fd


def unlock_run(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


# ---- new runs, resumable runs ---------------------------------------------------------------------------------------
def has_checkpoint(run: Path) -> bool:
    return (run / "checkpoint.pt").is_file()


def is_restartable(run: Path) -> bool:
    """A run stopped before its first checkpoint: config.json, no checkpoint. It can only start again."""
    return (run / "config.json").is_file() and not has_checkpoint(run)


def prepare_new_run(out: Path, overwrite: bool) -> int:
    """Create ``out`` for a new run, lock it, and clear a run it holds (only with ``overwrite``).

    Returns the lock descriptor. Nothing is removed before the lock is held; a folder this call created is removed
    again if it fails.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {out} ({_os_problem(e)}); choose a writable --out") from None
    try:
        fd = lock_run(out)
    except UserError:
        if created:
            _remove_empty(out)
        raise
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        unlock_run(fd)
        if is_restartable(out):
            raise UserError(f"--out {out} holds a run stopped before its first checkpoint; pass --overwrite to start "
                            f"it again in place (or --autoresume)")
        raise UserError(f"--out {out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it, "
                        f"or --resume {out} to continue it")
    try:
        for name in existing:
            p = out / name
            if p.is_dir():
                raise UserError(f"{p} is a folder, not a run file; remove it or choose another --out")
            p.unlink()
    except OSError as e:
        unlock_run(fd)
        raise UserError(f"cannot clear {out} ({_os_problem(e)}); choose a writable --out") from None
    except UserError:
        unlock_run(fd)
        raise
    return fd


def _remove_empty(out: Path) -> None:
    try:
        (out / LOCK).unlink(missing_ok=True)
        out.rmdir()
    except OSError:
        pass


def discard_new_run(out: Path) -> None:
    """Undo :func:`prepare_new_run` after a failure before training began: no half-made run folder stays."""
    for name in (*RUN_FILES, LOCK):
        try:
            (out / name).unlink(missing_ok=True)
        except OSError:
            pass
    try:
        out.rmdir()
    except OSError:
        pass


def require_resumable(run: Path) -> None:
    if not run.is_dir():
        raise UserError(f"--resume {run}: no such run folder; start a new run with --out {run}")
    if is_restartable(run):
        raise UserError(f"--resume {run}: the run stopped before its first checkpoint, so there is nothing to resume; "
                        f"start it again in place with --out {run} --overwrite (or --autoresume)")
    if not has_checkpoint(run) or not (run / "config.json").is_file():
        raise UserError(f"--resume {run}: no checkpoint.pt and config.json there; start a new run with --out {run}")


def read_config(run: Path) -> dict[str, Any]:
    """config.json of a run as a dict with a ``config`` dict inside; a clear error for anything else."""
    path = run / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}); restore it from the run's origin, or start "
                        f"again with --out {run} --overwrite") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise UserError(f"{path} has no 'config' object; restore it, or start again with --out {run} --overwrite")
    return saved


def require_same_config(run: Path, cfg, ignore: set[str]) -> None:
    """--autoresume: the folder's run must have the settings ``cfg`` (a resolved TrainConfig) describes."""
    # Through the config type: a setting added after the run was written compares as its default.
    saved = json.loads(json.dumps(type(cfg).from_dict(read_config(run)["config"]).to_dict(), default=str))
    new = json.loads(json.dumps(cfg.to_dict(), default=str))  # the same normal form config.json holds
    keys = sorted(k for k in set(saved) | set(new) if k not in ignore and saved.get(k) != new.get(k))
    if keys:
        diff = ", ".join(f"{k}: {saved.get(k)!r} there, {new.get(k)!r} now" for k in keys[:4])
        raise UserError(f"--autoresume: {run} holds a run with other settings ({diff}); use another --out, or "
                        f"--resume {run} to continue it as it is")


# ---- metrics ------------------------------------------------------------------------------------------------------
def verify_metrics(path: Path, offset: int) -> None:
    """The first ``offset`` bytes of ``path`` must be whole, parseable rows (what the checkpoint counted)."""
    run = path.parent
    fix = f"restore it from a copy, or start the run again with --out {run} --overwrite"
    if not path.exists() or path.is_dir():
        raise UserError(f"{path} is missing but the checkpoint counts {offset} bytes of rows in it; {fix}")
    size = path.stat().st_size
    if size < offset:
        raise UserError(f"{path} holds {size} bytes but the checkpoint counts {offset}: rows were lost; {fix}")
    with open(path, "rb") as f:
        head = f.read(offset)
    if offset and not head.endswith(b"\n"):
        raise UserError(f"{path} does not end a row where the checkpoint says; {fix}")
    for n, line in enumerate(head.splitlines(), start=1):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if not isinstance(row, dict) or row.get("kind") not in ("step", "epoch"):
            raise UserError(f"{path} line {n} is not a metrics row; {fix}")


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; each row has ``kind`` = ``step`` or ``epoch``.

    With ``truncate_to`` (resume; ``Trainer.resume`` has run :func:`verify_metrics` before anything was written)
    the file is cut to that length, and never extended: truncating to a larger size would pad with NUL bytes.
    """

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = path
        try:
            if truncate_to is not None:
                if not path.is_file() or path.stat().st_size < truncate_to:
                    verify_metrics(path, truncate_to)  # raises the error that names the problem and the fix
                with open(path, "r+b") as f:
                    f.truncate(truncate_to)
            self._f = open(path, "ab")
        except OSError as e:
            raise _write_failure(path, e) from None

    def write(self, kind: str, row: dict[str, Any]) -> None:
        obj = {"kind": kind, **row}
        try:  # a row per step: the strict encoder first, the cleaning pass only for a row that holds NaN or inf
            line = _ROW_ENCODER.encode(obj)
        except ValueError:
            line = json.dumps({k: _clean(v) for k, v in obj.items()}, default=str)
        try:
            self._f.write(line.encode() + b"\n")
        except OSError as e:
            raise _write_failure(self.path, e) from None

    def offset(self) -> int:
        """Bytes written so far (flushed), the truncation point a checkpoint records."""
        try:
            self._f.flush()
        except OSError as e:
            raise _write_failure(self.path, e) from None
        return self._f.tell()

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # a full disk at close: the rows past the last checkpoint are cut on resume anyway


class NullWriter:
    """What ranks other than 0 write to: nothing."""

    def write(self, kind: str, row: dict[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """Every row of a run's ``metrics.jsonl``: the one reader of that file (plots, reports and tests use it).

    A line cut by a crash after the last checkpoint is skipped; a file that is not a metrics file is an error.
    """
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run} is not a run folder (no metrics.jsonl); pass a run folder written by dynbatch train")
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path} ({_os_problem(e)}); check its permissions") from None
    rows = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # a line cut by a crash outside a checkpoint boundary: skip it
        if isinstance(row, dict) and row.get("kind") in ("step", "epoch"):
            rows.append(row)
    if lines and not rows:
        raise UserError(f"{path} holds no metrics rows; pass a run folder written by dynbatch train")
    return rows


# ---- checkpoints --------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Serialised in memory first: torch.save turns a write error (a full disk) into a RuntimeError without its
    # errno; writing the bytes ourselves keeps the OSError, so a full disk is told apart from a bug.
    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(path, lambda f: f.write(buf.getbuffer()))


def load_checkpoint(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint's state, loaded with ``weights_only=True`` (tensors and plain data only: no code runs); it must
    hold ``keys`` (:data:`CHECKPOINT_KEYS`)."""
    fix = f"start a new run with --out {path.parent} --overwrite"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "was not an allowed global" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"refusing {path}: it holds objects other than tensors and plain data, which loading "
                            f"would run as code; use a checkpoint written by dynbatch, or {fix}") from None
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupted or not dynbatch's; "
                        f"{fix}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a dynbatch checkpoint; {fix}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a checkpoint of this dynbatch version; {fix}")
    return state


# ---- the checkpoint: what it holds, and putting a trainer back from it ------------------------------------------
# A checkpoint holds the model, optimizer, policy, sampler and every generator's state, the progress counters, the
# byte length of ``metrics.jsonl`` it accounts for, and the number of ranks that wrote it; every rank's CUDA
# generator state, by rank.
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



def save_state(run, note: str) -> None:
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
        save_checkpoint(run.out / "checkpoint.pt", run.state(cuda_rng))


# ---- resuming: the run's own settings, its checkpoint, the same number of ranks, optionally a new total of epochs
def resume(trainer_cls, run: Path, epochs: int | None, stop_after_steps: int | None, **kw):
    """A ``trainer_cls`` continuing ``run``. ``epochs`` is the new total (None: the run's own); below the epochs
    already started it is an error. Extending a run re-plans the schedule over the new total."""
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be positive (got {epochs}); it is the run's new total of epochs")
    require_resumable(run)
    lock = lock_run(run) if Dist.rank_from_env() == 0 else None
    try:
        saved = read_config(run)
        cfg = TrainConfig.from_dict(saved["config"])
        checkpoint = load_checkpoint(run / "checkpoint.pt", CHECKPOINT_KEYS)
        cfg.stop_after_steps = stop_after_steps
        recorded_bf16 = saved.get("amp_bf16") if isinstance(saved.get("amp_bf16"), bool) else None
        t = trainer_cls(cfg, run, given=saved.get("given") if isinstance(saved.get("given"), dict) else {},
                        recorded_bf16=recorded_bf16, **kw)
        t.lock = lock
        _require_same_labels(saved, t.data.source.label_file_sha256)
        saved_world = checkpoint.get("world_size", 1)
        if saved_world != t.dist.world:
            raise UserError(f"{run} was trained on {saved_world} process(es), this launch has {t.dist.world}; "
                            f"resume with the same number (torchrun --nproc_per_node={saved_world} for one node)")
        t.load_state(checkpoint)
        if t.dist.is_main:
            verify_metrics(run / "metrics.jsonl", t.metrics_offset or 0)
        if epochs is not None and epochs != t.cfg.epochs:
            _extend(t, epochs)
    except BaseException:
        unlock_run(lock)
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
    before = t.lr_at(progress)
    t.cfg.epochs = epochs
    if t.cfg.schedule != "constant":
        t.log(f"--epochs {epochs}: the {t.cfg.schedule} schedule is re-planned over {epochs} epochs; the learning "
              f"rate goes from {before:.4g} to {t.lr_at(progress):.4g} at epoch {progress:.2f}")
    if t.dist.is_main:
        t.write_config()
