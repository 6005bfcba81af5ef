"""Sample sources for the utilisation monitor. Each returns a flat dict of numbers per call."""
from __future__ import annotations

import os


class PsutilSource:
    """CPU utilisation of the machine (%) and resident memory of this process (MB)."""

    name = "psutil"

    def __init__(self):
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._psutil = psutil
        self._psutil.cpu_percent(None)  # the first call only primes the counter

    def sample(self) -> dict[str, float]:
        return {"cpu_percent": self._psutil.cpu_percent(None), "ram_mb": self._proc.memory_info().rss / 2**20}


class NvmlSource:
    """Per-GPU utilisation (%), memory used (MB) and power (W) through NVML (``nvidia-ml-py``).

    Construction raises ``RuntimeError`` with the reason where NVML or a GPU is unavailable.
    """

    name = "nvml"

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            raise RuntimeError(f"NVML unavailable ({type(e).__name__}: {e})") from None
        if count == 0:
            raise RuntimeError("NVML found no GPU")
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def sample(self) -> dict[str, float]:
        out = {}
        for i, h in enumerate(self._handles):
            try:
                out[f"gpu{i}_util"] = float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                out[f"gpu{i}_mem_mb"] = self._nvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                out[f"gpu{i}_power_w"] = self._nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
            except Exception:  # a counter some GPUs do not expose (power on some boards) is skipped, not fatal
                continue
        return out
