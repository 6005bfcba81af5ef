"""Which arithmetic and memory layout a run uses, from ``--amp`` and ``--channels-last`` and the hardware.

``--amp auto`` is whichever of fp32 and bf16 autocast trains the model at hand faster. Where bf16 is not computed
natively it is fp32 without asking: a CPU without AVX512-BF16 or AMX emulates bf16, measured 15x *slower* than
fp32 for a PreResNet-20 step on this project's AMD EPYC (Zen 3, AVX2). Where it is native (every CUDA GPU dynbatch
targets; CPUs with those instructions, whose oneDNN kernels run bf16 convolutions at about twice the fp32 rate)
bf16 is not always faster: on a small MLP (digits, batch 32) autocast's casts cost more than bf16 saves (a bf16-native
CPU measured 1.86x a plain fp32 loop at bf16, 1.11x at fp32). So ``auto`` times a few training steps of both on a
real batch (:func:`probe`), keeps bf16 only when it wins by more than noise (``BF16_MUST_WIN``), caches the verdict
per device, torch version, model, batch shape and layout (``cache_path()``) and records it in ``config.json``; a
resumed run keeps its recorded choice. ``--channels-last auto`` is on for convolutional models (NHWC is what
oneDNN's and cuDNN's fastest convolutions read: 1.13-1.33x on that CPU, more with bf16) and off otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from dynbatch.methods.base import sample_cross_entropy


@functools.cache
def _cpuinfo(field: str) -> str:
    """The value of ``field`` in Linux's /proc/cpuinfo (first CPU), or "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(field)), "")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (Linux ``avx512_bf16`` or ``amx_bf16`` flags)."""
    flags = _cpuinfo("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """The resolved choice: bf16 autocast or fp32, channels-last or contiguous, on ``device_type``."""

    device_type: str
    bf16: bool
    channels_last: bool
    # How ``auto`` decided (what config.json records): the probe's step times, or why there was none.
    decided_by: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """What config.json records, e.g. ``bf16 autocast, channels-last``."""
        return f"{'bf16 autocast' if self.bf16 else 'fp32'}, {'channels-last' if self.channels_last else 'contiguous'}"

    def autocast(self):
        """The context a forward runs in."""
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve(amp: str, channels_last: str, device: torch.device, model: nn.Module) -> Precision:
    """``amp`` auto|bf16|none and ``channels_last`` auto|on|off (validated by the config) for ``model`` on
    ``device``, before any probe: ``auto`` is bf16 wherever bf16 is native (:func:`choose_amp` then times it)."""
    native = bf16_is_native(device)
    bf16 = amp == "bf16" or (amp == "auto" and native)
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    cl = channels_last == "on" or (channels_last == "auto" and conv)
    why = None if amp != "auto" or native else {"probe": None, "why": "bf16 is not native here: fp32"}
    return Precision(device.type, bf16, cl, why)


def bf16_is_native(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


# bf16 autocast is kept only when its median step is below this share of fp32's: a tie (within the few-percent noise
# of a short probe) goes to fp32, whose results need no cast.
BF16_MUST_WIN = 0.95
PROBE_SECONDS = 4.0  # at most about this long for both settings' timed steps (warm-up excluded), at least 3 each


def choose_bf16(fp32_s: list[float], bf16_s: list[float]) -> bool:
    """Whether bf16 is faster by more than noise, from each setting's step times (seconds)."""
    return statistics.median(bf16_s) < BF16_MUST_WIN * statistics.median(fp32_s)


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device_type: str, *,
          timer: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Time training steps (forward, cross-entropy, backward) of ``model`` on x (B, ...), y (B,) in fp32 and under
    bf16 autocast, alternating, after one warm-up step each; returns ``{"fp32_ms", "bf16_ms", "steps",
    "bf16"}`` (medians in ms, the steps timed per setting, the choice). Leaves no trace: gradients are cleared,
    buffers (BatchNorm statistics) and the RNG states are put back, no optimizer steps."""
    from dynbatch.methods.base import preserved_buffers

    cuda = device_type == "cuda"
    rng = torch.random.get_rng_state(), (torch.cuda.get_rng_state_all() if cuda else None)

    def step(bf16: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = timer()
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = sample_cross_entropy(model(x).float(), y).mean()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return timer() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        with preserved_buffers(model):
            first = step(False) + step(True)  # warm-up (kernel choice, allocations); sizes the probe
            rounds = int(min(25, max(3, PROBE_SECONDS / max(first, 1e-6))))
            for _ in range(rounds):
                for bf16 in (False, True):
                    times[bf16].append(step(bf16))
    finally:
        model.zero_grad(set_to_none=True)
        torch.random.set_rng_state(rng[0])
        if cuda:
            torch.cuda.set_rng_state_all(rng[1])
    return {"fp32_ms": 1e3 * statistics.median(times[False]), "bf16_ms": 1e3 * statistics.median(times[True]),
            "steps": rounds, "bf16": choose_bf16(times[False], times[True])}


def cache_path() -> Path:
    """Where probe verdicts are kept: ``$DYNBATCH_CACHE_DIR`` or ``$XDG_CACHE_HOME/dynbatch`` or
    ``~/.cache/dynbatch``, file ``precision.json``."""
    root = os.environ.get("DYNBATCH_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "dynbatch"
    return Path(root) / "precision.json"


def probe_key(device: torch.device, model_name: str, x: torch.Tensor) -> str:
    """What a verdict holds for: the device (its name), torch, the model, the batch's shape and layout."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    layout = "channels_last" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return f"{name} | torch {torch.__version__} | {model_name} | {tuple(x.shape)} {layout}"


def cpu_name() -> str:
    return _cpuinfo("model name") or "cpu"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: probe again, and rewrite it
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, key: str, verdict: dict[str, Any]) -> None:
    """Add ``verdict`` under ``key``, atomically; a cache that cannot be written only costs the next run a probe."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache(path)
        cache[key] = verdict
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def choose_amp(precision: Precision, model: nn.Module, x: torch.Tensor, y: torch.Tensor, model_name: str,
               device: torch.device) -> Precision:
    """``precision`` with ``auto``'s bf16 decided for ``model`` on the batch (x, y), already in the run's layout: the
    cached verdict for this device, torch, model and batch shape, or a :func:`probe` (then cached)."""
    key, path = probe_key(device, model_name, x), cache_path()
    verdict = _read_cache(path).get(key)
    if not (isinstance(verdict, dict) and isinstance(verdict.get("bf16"), bool)):
        verdict = probe(model, x, y, device.type)
        _write_cache(path, key, verdict)
        decided_by = {"probe": verdict, "cached": False}
    else:
        decided_by = {"probe": verdict, "cached": True}
    return Precision(precision.device_type, verdict["bf16"], precision.channels_last, decided_by)
