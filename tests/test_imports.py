"""Importing dynbatch is cheap: no Triton, no CUDA initialisation, no extension build (pytorch/ao's lean-import
test). Run in a fresh interpreter so other tests' imports do not mask a regression."""
import subprocess
import sys

CHECK = """
import sys
import dynbatch, dynbatch.ops, dynbatch.methods, dynbatch.cli, dynbatch.models, dynbatch.data
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


def test_imports_run_one_way():
    """CLI -> train -> methods -> ops -> kernels: no module imports a layer above its own."""
    import ast
    from pathlib import Path

    above = {
        "dynbatch/ops": ("dynbatch.methods", "dynbatch.train", "dynbatch.cli", "dynbatch.bench_cli", "dynbatch.plots"),
        "dynbatch/methods": ("dynbatch.train", "dynbatch.cli", "dynbatch.bench_cli", "dynbatch.plots"),
        "dynbatch/data": ("dynbatch.methods", "dynbatch.train", "dynbatch.cli", "dynbatch.bench_cli"),
        "dynbatch/models": ("dynbatch.methods", "dynbatch.train", "dynbatch.cli", "dynbatch.bench_cli"),
        "dynbatch/train": ("dynbatch.cli", "dynbatch.bench_cli", "dynbatch.plots"),
        "kernels": ("dynbatch",),
    }
    repo = Path(__file__).resolve().parents[1]
    for folder, banned in above.items():
        for path in (repo / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    assert not any(name == b or name.startswith(b + ".") for b in banned), \
                        f"{path.relative_to(repo)} imports {name}"
