"""Peak memory of one call, for the tests and benchmarks that check that nothing large is allocated."""
from __future__ import annotations

import os
from typing import Callable

import torch

CAN_RESET_PEAK = os.path.exists("/proc/self/clear_refs")  # Linux: the resident peak (VmHWM) can be reset


def _resident_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def peak_growth(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Bytes by which one call of ``fn`` raised the peak: of CUDA allocations on a CUDA ``device``, else of the
    process's resident set (which sees native allocations that torch's profiler does not; the peak is reset first,
    Linux only). None where neither can be measured."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not CAN_RESET_PEAK:
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _resident_peak()
    fn()
    return _resident_peak() - before
