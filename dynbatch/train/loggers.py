"""Loggers beside ``metrics.jsonl`` (which stays the source of truth for resume): ``--log tensorboard``.

Every number of a step or epoch row becomes a scalar ``step/<field>`` or ``epoch/<field>`` at the row's global
step. A resumed run purges what was logged after its checkpoint (TensorBoard's ``purge_step``), so nothing is
logged twice: the rows it recomputes replace the ones written before the interruption, as in ``metrics.jsonl``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dynbatch.errors import UserError

LOGGERS = ("tensorboard",)


class TensorBoardLogger:
    def __init__(self, out: Path, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--log tensorboard needs the tensorboard package; pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge_step)

    def write(self, kind: str, row: dict[str, Any]) -> None:
        step = row.get("step", 0)
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "step":
                self.writer.add_scalar(f"{kind}/{k}", v, global_step=step)

    def close(self) -> None:
        self.writer.close()


def parse_loggers(spec: str) -> list[str]:
    """Names in ``--log`` (comma-separated; empty for none)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise UserError(f"unknown logger {bad[0]!r} in --log; choose from {', '.join(LOGGERS)}")
    return names


def open_loggers(spec: str, out: Path, purge_step: int | None) -> list:
    return [TensorBoardLogger(out, purge_step) for name in parse_loggers(spec) if name == "tensorboard"]
