"""What every last-layer op shares: the ``torch.library`` namespace ``dynbatch``, the head every schema starts with,
:func:`define` (one op's schema, fake and per-dispatch-key registrations, called once from the op's own module),
and the choice of backend, which goes through the dispatcher alone.

Per dispatch key, each op has:

- ``CPU``: the native extension (``csrc/dynbatch_native.cpp``, ``TORCH_LIBRARY_IMPL(dynbatch, CPU, m)``), once it
  is loaded (:func:`dynbatch.ops.native.load`, on the first CPU call of the public API);
- ``CUDA``: the Triton kernels (``kernels/``);
- ``CompositeExplicitAutograd``: the torch reference (``kernels/reference.py``), for every device without its own
  kernel (and the CPU while the extension is not loaded).

A backend other than the device's own (the reference, or Triton under ``TRITON_INTERPRET=1`` on the CPU) is chosen
with :func:`using_backend`, which registers that implementation on the device's key for the duration of a ``with``
block and restores the previous one on exit: every call still goes through the dispatcher.

Why ``Library.define``/``impl`` rather than the ``torch.library.custom_op`` decorator: the decorator wraps every
call in a Python autograd layer, measured at ~55 µs per call of ``select_subset`` on this project's CPU, more than
the whole selection at small batches; a C++ kernel on the CPU key dispatches with no Python at all. The ops have no
autograd formula: selection reads detached values.
"""
from __future__ import annotations

import contextlib
import os
from collections import namedtuple
from typing import Callable, NamedTuple

import torch

from dynbatch.errors import UserError
from dynbatch.ops import native
from dynbatch_kernels.reference import choose_route

# Every op starts with the head: logits (B, C), targets (B,), features (B, D) of any float dtype, whether the head
# has a bias (a_i = [h_i, 1]) and the label smoothing; results are fp32 (stats float64).
HEAD = "Tensor logits, Tensor targets, Tensor features, bool bias, float label_smoothing"
BACKENDS = ("torch", "native", "triton")

_LIB = torch.library.Library("dynbatch", "DEF")


class Kernels(NamedTuple):
    """An op's Python implementations, each taking the op's argument tuple: what :func:`using_backend` registers
    (``triton`` None: the op has no Triton kernel, and its reference serves CUDA too)."""

    reference: Callable
    triton: Callable | None


_KERNELS: dict[str, Kernels] = {}


def args_type(name: str, schema: str) -> type:
    """The op's arguments by name, in schema order (a namedtuple): implementations read them by name, so their
    order is written in the schema alone (and in the native kernel's C++ signature)."""
    fields = [arg.split()[-1] for arg in schema[1:schema.index(")")].split(",")]
    return type(f"{name}_args", (namedtuple(f"{name}_args", fields),), {"__slots__": (), "op": name})


def define(name: str, schema: str, args: type, *, reference: Callable, triton: Callable | None, fake: Callable):
    """Define ``dynbatch::name`` and register its torch reference (CompositeExplicitAutograd), its Triton launcher
    (CUDA, where it has one) and its fake (shapes for ``torch.compile``), each taking one ``args`` tuple. Returns
    the op overload, looked up once (an attribute lookup on ``torch.ops`` costs microseconds a call)."""
    _LIB.define(name + schema)
    positional = [None if fn is None else (lambda *a, fn=fn: fn(args(*a))) for fn in (reference, triton, fake)]
    _LIB.impl(name, positional[0], "CompositeExplicitAutograd")
    if triton is not None:
        _LIB.impl(name, positional[1], "CUDA")
    torch.library.register_fake(f"dynbatch::{name}", positional[2])
    _KERNELS[name] = Kernels(*positional[:2])
    return getattr(torch.ops.dynbatch, name).default


def check_head(a) -> None:
    """The fakes' shape checks of the head (``torch._check``: what the kernels would refuse)."""
    torch._check(a.logits.dim() == 2 and a.features.dim() == 2 and a.targets.dim() == 1,
                 lambda: "expected logits (B, C), targets (B,) and features (B, D)")
    torch._check(a.targets.shape[0] == a.logits.shape[0] and a.features.shape[0] == a.logits.shape[0],
                 lambda: "logits, targets and features must have the same batch size")


def head(logits, targets, features, bias, label_smoothing) -> tuple:
    """The head's five arguments, checked (one line naming the problem, never a traceback)."""
    if logits.dim() != 2 or features.dim() != 2 or targets.dim() != 1:
        raise UserError("expected logits (B, C), targets (B,) and features (B, D)")
    b = logits.shape[0]
    if targets.shape[0] != b or features.shape[0] != b:
        raise UserError(f"batch sizes differ: logits {b}, targets {targets.shape[0]}, features {features.shape[0]}")
    if logits.shape[1] < 1:
        raise UserError("logits need at least one class")
    return logits, targets, features, bool(bias), float(label_smoothing)


def uses_gram(route: str, logits, features, bias) -> bool:
    """Whether ``route`` (``direct``, ``gram`` or ``auto``: the cheaper, Gram when B < C(D + 1)) is the Gram one
    for the subset ops on this head."""
    if route == "auto":
        return choose_route(logits.shape[0], logits.shape[1], features.shape[1] + bool(bias)) == "gram"
    if route not in ("direct", "gram"):
        raise UserError(f"unknown route {route!r}; choose auto, direct or gram")
    return route == "gram"


def dot_dtype(logits, features) -> torch.dtype:
    """The tensor-core operand type: the inputs' 16-bit type if either has one, else fp32."""
    low = [t.dtype for t in (logits, features) if t.dtype in (torch.bfloat16, torch.float16)]
    return low[0] if low else torch.float32


# ---- backends: which registration the dispatcher finds -----------------------------------------------------------
def triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton not importable ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "CPU interpreter (TRITON_INTERPRET=1): exact but slow"
    if not torch.cuda.is_available():
        return False, "needs a CUDA device (or TRITON_INTERPRET=1 for the interpreter)"
    return True, ""


def backend_status() -> dict[str, tuple[bool, str]]:
    return {"torch": (True, "reference"), "native": native.status(), "triton": triton_status()}


def resolve_backend(backend: str, device_type: str) -> str:
    """Which registration ``backend`` means on ``device_type``: ``op`` (the device's own: native on CPU, Triton on
    CUDA), ``torch`` (the reference) or ``triton`` (the launchers, on the CPU under the interpreter). For ``auto``
    and ``native`` on CPU it loads the native extension first, which registers its kernels on the CPU key. A
    constant to ``torch.compile``: it cannot change within a process (resolved once per backend and device type)."""
    how = _resolved.get((backend, device_type))
    if how is None:
        how = _resolved[(backend, device_type)] = _resolve(backend, device_type)
    return how


# torch.compiler.assume_constant_result(resolve_backend), without importing torch._dynamo (and Triton with it) when
# dynbatch.ops is imported: the decorator sets only this mark. The compiled-loop test fails if the mark stops working.
resolve_backend._dynamo_marked_constant = True
_resolved: dict[tuple[str, str], str] = {}


def _resolve(backend: str, device_type: str) -> str:
    if backend == "auto":
        if device_type == "cpu":
            native.load()
        return "op"
    if backend == "torch":
        return "torch"
    if backend == "native":
        if device_type != "cpu":
            raise UserError("backend native runs on CPU tensors; use backend triton or auto on CUDA")
        if native.load() is None:
            raise UserError(f"native backend unavailable: {native.status()[1]}; use backend torch or auto")
        return "op"
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise UserError(f"triton backend unavailable: {why}; use backend auto")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UserError("triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
        return "triton" if device_type != "cuda" else "op"
    raise UserError(f"unknown backend {backend!r}; choose auto, {', '.join(BACKENDS)}")


@contextlib.contextmanager
def using_backend(backend: str, device_type: str = "cpu"):
    """Within the block, every ``dynbatch`` op on ``device_type`` tensors runs ``backend`` (``auto``, ``torch``,
    ``native`` or ``triton``): its implementation is registered on the device's dispatch key and the previous one
    restored on exit. Process-wide, not per thread. Enter it outside a compiled function: a compiled graph calls
    the op, and the dispatcher finds the registration in force when the graph runs."""
    how = resolve_backend(backend, device_type)
    if how == "op":
        yield
        return
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:  # the reference is already the registration of every other device
        yield
        return
    with torch.library._scoped_library("dynbatch", "IMPL") as lib:
        for name, kernels in _KERNELS.items():
            kernel = getattr(kernels, "reference" if how == "torch" else how)
            if kernel is not None:
                lib.impl(name, kernel, key)
        yield


def call(op, args: tuple, backend: str):
    """``op`` on ``args`` (its argument tuple) with ``backend``: the dispatcher's choice for ``auto``."""
    how = resolve_backend(backend, args[0].device.type)
    if how == "op":
        return op(*args)
    if torch.compiler.is_compiling():
        raise UserError(f"choose backend {backend!r} outside the compiled function: wrap the call of the compiled "
                        "function in dynbatch.ops.using_backend(...) and leave backend='auto' inside it")
    with using_backend(backend, args[0].device.type):
        return op(*args)
