"""Builds and loads the native CPU extension (``csrc/dynbatch_native.cpp``) on first use.

It is compiled with ``torch.utils.cpp_extension.load`` against the torch already installed (no second download of
torch, no CUDA needed) and cached by torch under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``).
Where it cannot be built, :func:`load` returns None and :func:`status` says why; set ``DYNBATCH_NO_NATIVE=1`` to
skip it.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

def _source() -> Path:
    """The C++ source, from the installed ``dynbatch_csrc`` package (a clone's ``csrc/`` or a wheel's copy)."""
    try:
        import dynbatch_csrc
    except ImportError:
        return Path("dynbatch_csrc-not-installed") / "dynbatch_native.cpp"
    return Path(dynbatch_csrc.__file__).resolve().parent / "dynbatch_native.cpp"


SOURCE = _source()
_lock = threading.Lock()
_state: dict = {}


def load():
    """The extension module, or None when it is unavailable (see :func:`status`)."""
    with _lock:
        if "module" in _state:
            return _state["module"]
        _state["module"], _state["why"] = None, ""
        if os.environ.get("DYNBATCH_NO_NATIVE"):
            _state["why"] = "disabled by DYNBATCH_NO_NATIVE"
        elif not SOURCE.is_file():
            _state["why"] = f"source {SOURCE} not found (reinstall dynbatch: its wheel carries csrc/)"
        else:
            try:
                import logging

                # "No CUDA runtime is found" is expected on CPU-only machines (this build needs no CUDA); torch
                # logs it when cpp_extension is first imported, so the level is lowered before the import.
                log = logging.getLogger("torch.utils.cpp_extension")
                level = log.level
                log.setLevel(logging.ERROR)
                try:
                    from torch.utils.cpp_extension import load as build

                    # -fopenmp: at::parallel_for is OpenMP inline code; torch's own libgomp is already loaded.
                    # -fno-trapping-math: nothing here reads FP exception flags, and without it GCC will not turn
                    # a float select into a blend, so the softmax pass (its exp) stays scalar (3.4x slower).
                    _state["module"] = build(
                        name="dynbatch_native", sources=[str(SOURCE)], verbose=False,
                        extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math"], extra_ldflags=["-fopenmp"],
                    )
                finally:
                    log.setLevel(level)
            except Exception as e:  # no compiler, no ninja, compile error
                first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
                _state["why"] = f"build failed: {first[:200]}"
        return _state["module"]


def status() -> tuple[bool, str]:
    """(usable, reason when not); builds the extension if it has not been tried yet."""
    module = load()
    return module is not None, _state.get("why", "")
