"""An installed wheel carries everything a user runs: the native sources (built on first use), the benchmark
suites and the kernels. Built with pip, installed outside the source tree, run from elsewhere."""
import os
import subprocess
import sys
import zipfile

import pytest

from cli_helpers import REPO

pytestmark = pytest.mark.slow

CHECK = """
import sys, torch
import dynbatch, dynbatch_bench, dynbatch_csrc
from pathlib import Path
site = Path(sys.argv[1]).resolve()
for mod in (dynbatch, dynbatch_bench, dynbatch_csrc):
    assert site in Path(mod.__file__).resolve().parents, mod.__file__  # the wheel's copy, not the clone
from dynbatch.ops import SubsetSpec, native, select_subset
assert native.load() is not None, native.status()
g = torch.Generator().manual_seed(0)
logits, feats, y = torch.randn(37, 7, generator=g), torch.randn(37, 19, generator=g), torch.randint(0, 7, (37,))
kw = dict(seed=5, loss=1.0, loss_ema=1.1, grad_ema=0.3)
a = select_subset(logits, y, feats, SubsetSpec(300, backend="native"), **kw)
b = select_subset(logits, y, feats, SubsetSpec(300, backend="torch"), **kw)
assert int(a.index) == int(b.index)
print("native selection ok")
"""


def test_wheel_installed_outside_the_tree_has_native_sources_and_bench(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("dynbatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("dynbatch_csrc/dynbatch_native.cpp", "dynbatch_bench/test_step.py", "dynbatch_bench/report.py",
                   "dynbatch_kernels/aot.py", "dynbatch/methods/edba.py", "dynbatch/ops/selection.py"):
        assert needed in names, needed
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("TRITON_INTERPRET", None)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    p = subprocess.run([sys.executable, str(script), str(site)], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0 and "native selection ok" in p.stdout, p.stdout + p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "dynbatch", "info"], cwd=elsewhere, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "native" in p.stdout, p.stderr[-2000:]
