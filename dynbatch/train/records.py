"""The run folder: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``curves.png`` and the lock ``.lock``.

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
from pathlib import Path
from typing import Any

import torch

from dynbatch.errors import RunFailure, UserError

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
    hold ``keys`` (``dynbatch.train.state.CHECKPOINT_KEYS``)."""
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
