"""Importing dynbatch is cheap: no Triton, no CUDA initialisation, no extension build (pytorch/ao's lean-import
test). Run in a fresh interpreter so other tests' imports do not mask a regression."""
import subprocess
import sys

CHECK = """
import sys
import dynbatch, dynbatch.selection, dynbatch.policies, dynbatch.cli, dynbatch.models, dynbatch.data
dynbatch.cli.build_parser()
import torch
bad = [m for m in ("triton", "torch.utils.cpp_extension", "dynbatch_kernels.residuals", "matplotlib") if m in sys.modules]
assert not bad, bad
assert not torch.cuda.is_initialized()
print("lean")
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr


def test_package_import_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, dynbatch; assert 'torch' not in sys.modules"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
