"""Which arithmetic and memory layout a run uses, from ``--amp`` and ``--channels-last`` and the hardware.

``--amp auto`` is bf16 autocast where bf16 is computed natively: every CUDA GPU dynbatch targets, and CPUs with
AVX512-BF16 or AMX (their oneDNN kernels run bf16 convolutions at about twice the fp32 rate). Elsewhere it is
fp32: a CPU without those instructions emulates bf16, measured 15x *slower* than fp32 for a PreResNet-20 step on
this project's AMD EPYC (Zen 3, AVX2). ``--channels-last auto`` is on for convolutional models (NHWC is what
oneDNN's and cuDNN's fastest convolutions read: 1.13-1.33x on that CPU, more with bf16) and off otherwise.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (Linux ``avx512_bf16`` or ``amx_bf16`` flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """The resolved choice: bf16 autocast or fp32, channels-last or contiguous, on ``device_type``."""

    device_type: str
    bf16: bool
    channels_last: bool

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
    ``device``."""
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    bf16 = amp == "bf16" or (amp == "auto" and native)
    conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    cl = channels_last == "on" or (channels_last == "auto" and conv)
    return Precision(device.type, bf16, cl)
