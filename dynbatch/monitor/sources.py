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


def visible_gpus(env: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: None when unset (every GPU), else the entries up to the first
    invalid one (an index, or a ``GPU-``/``MIG-`` UUID); ``-1`` or an empty value hides every GPU."""
    if env is None:
        return None
    out = []
    for entry in (e.strip() for e in env.split(",")):
        if entry.isdigit() or entry.startswith(("GPU-", "MIG-")):
            out.append(entry)
        else:
            break  # CUDA stops at the first entry it cannot read (and "-1" hides everything after it)
    return out


class NvmlSource:
    """Per-GPU utilisation (%), memory used (MB) and power (W) through NVML (``nvidia-ml-py``).

    Fields are named after the GPUs this process can see: ``gpu<k>`` is CUDA device k, the k-th entry of
    ``CUDA_VISIBLE_DEVICES`` (NVML numbers GPUs on the whole machine, which is not the same order when that
    variable is set). Construction raises ``RuntimeError`` with the reason where NVML or a GPU is unavailable.
    """

    name = "nvml"

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            raise RuntimeError(f"NVML unavailable ({type(e).__name__}: {e})") from None
        visible = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
        try:
            if visible is None:
                handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            else:
                handles = [pynvml.nvmlDeviceGetHandleByIndex(int(v)) if v.isdigit()
                           else pynvml.nvmlDeviceGetHandleByUUID(v) for v in visible]
        except Exception as e:
            raise RuntimeError(f"NVML cannot find CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} "
                               f"({type(e).__name__}: {e})") from None
        if not handles:
            raise RuntimeError("NVML found no visible GPU")
        self._nvml = pynvml
        self._handles = handles

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
