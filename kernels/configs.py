"""Launch configurations of the subset kernels, per GPU architecture and operand type.

Chosen from the ahead-of-time compile results (``python -m dynbatch_kernels.aot --sweep full``, table in
``bench/results/gpu-aot/``): the largest tiles that fit in the 255-register budget without spilling, with the
warps and pipeline stages that keep them there. Under the Triton interpreter the original tiles are used, so the
interpreter tests compute exactly the numbers they always did.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

_TARGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("dynbatch_kernels_target", default=None)

# Tiles the interpreter runs (and the numbers its tests pin).
INTERPRETER = {
    "gram": {"BLOCK_N": 64, "BLOCK_I": 64, "BLOCK_K": 32},
    "direct": {"BLOCK_N": 64, "BLOCK_B": 32, "BLOCK_J": 64},
}

# (arch, operand type, route) -> tiles and launch options. Operand type: "fp32" IEEE dots on CUDA cores, "tf32"
# (fp32 operands on tensor cores), "16" (bf16/fp16 operands on tensor cores). Found by ``aot.tune()``: with 4
# warps every one of these sat at the 255-register cap and spilled (up to 744 bytes on sm_90 tf32 Gram); 8 warps
# spread the same tiles over twice the threads and spill nothing on either target, so the interpreter's tiles,
# and with them every tested number, stay as they were.
_SPILL_FREE = {"num_warps": 8, "num_stages": 3}
GPU = {(arch, operands, route): {**INTERPRETER[route], **_SPILL_FREE}
       for arch in (80, 90) for route in ("gram", "direct")
       for operands in (("fp32", "tf32") if route == "gram" else ("fp32", "16"))}


@contextlib.contextmanager
def target(arch: int):
    """Launchers inside the block configure for ``sm_<arch>`` whatever their tensors' device (AOT compiles)."""
    token = _TARGET.set(arch)
    try:
        yield
    finally:
        _TARGET.reset(token)


def arch_of(device: torch.device) -> int | None:
    """80 (Ampere-class) or 90 (Hopper and later) for a CUDA device, the AOT target inside :func:`target`, or None
    (the interpreter)."""
    forced = _TARGET.get()
    if forced is not None:
        return forced
    if device.type != "cuda":
        return None
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU: Triton takes the device and stream from the *current* device, which need not be the
    tensors' (a single-process ``--device cuda:1`` run)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def split_launch_options(cfg: dict) -> tuple[dict, dict]:
    """(tile constants, launch options) of a configuration."""
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return {k: v for k, v in cfg.items() if k not in opts}, opts


def subset_config(route: str, operands: str, device: torch.device) -> dict:
    """Tile sizes (and, on a GPU, ``num_warps``/``num_stages``) for the ``route`` kernel with ``operands`` of
    ``fp32``, ``tf32`` or ``16``."""
    arch = arch_of(device)
    if arch is None:
        return dict(INTERPRETER[route])
    return dict(GPU[(arch, operands, route)])
