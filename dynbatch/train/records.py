"""The run folder: ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and ``curves.png``.

Every file is written so that an interruption at any moment leaves a folder a later ``--resume`` can use: JSON and
checkpoints go to a temporary file and are renamed into place, and the checkpoint records how many bytes of
``metrics.jsonl`` belong to it, so rows written after the last checkpoint are cut on resume instead of duplicated.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from dynbatch.errors import UserError

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()))


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; null keeps each line parseable by any reader.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def prepare_new_run(out: Path, overwrite: bool) -> None:
    """Create ``out`` for a new run; refuse a folder that holds another run unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"--out {out} already holds a run ({', '.join(existing)}); pass --overwrite to replace it, "
            f"or --resume {out} to continue it"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()


def require_resumable(run: Path) -> None:
    if not (run / "checkpoint.pt").is_file() or not (run / "config.json").is_file():
        raise UserError(f"--resume {run}: no checkpoint.pt and config.json there; start a new run with --out {run}")


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl``; each row has ``kind`` = ``step`` or ``epoch``."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = path
        if truncate_to is not None and path.exists():
            with open(path, "r+b") as f:
                f.truncate(truncate_to)
        self._f = open(path, "ab")

    def write(self, kind: str, row: dict[str, Any]) -> None:
        line = json.dumps({"kind": kind, **{k: _clean(v) for k, v in row.items()}}, default=str)
        self._f.write(line.encode() + b"\n")

    def offset(self) -> int:
        """Bytes written so far (flushed), the truncation point a checkpoint records."""
        self._f.flush()
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


class NullWriter:
    """What ranks other than 0 write to: nothing."""

    def write(self, kind: str, row: dict[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run} has no metrics.jsonl; pass a run folder written by dynbatch train")
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash outside a checkpoint boundary: skip it
    return rows


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); it is corrupted or not dynbatch's") from None
