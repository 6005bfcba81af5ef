import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run through its interpreter; set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# --amp auto's probe verdicts go to a cache folder of this test session, never the user's (on bf16-native CPUs).
os.environ.setdefault("DYNBATCH_CACHE_DIR", tempfile.mkdtemp(prefix="dynbatch-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def pytest_runtest_setup(item):
    """Tests marked ``native`` need the C++ extension. A machine that cannot build it (no compiler or ninja, as on a
    bare GPU image) skips them and says why; in CI that is a failure."""
    if item.get_closest_marker("native"):
        from dynbatch.ops import native

        ok, why = native.status()
        if not ok:
            if os.environ.get("CI"):
                pytest.fail(f"the native extension must build in CI: {why}")
            pytest.skip(f"native extension unavailable: {why}")


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests share 2 cores; fixed thread counts also keep CPU results bit-reproducible within a test.
    torch.set_num_threads(2)


@pytest.fixture
def cifar_subset() -> Path:
    """The shared real CIFAR-10 subset. Outside CI a missing file skips; in CI it is a failure."""
    if not CIFAR_SUBSET.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CIFAR_SUBSET} is missing in CI")
        pytest.skip(f"{CIFAR_SUBSET} not present on this machine")
    return CIFAR_SUBSET


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A small synthetic 3-class data set whose classes differ in mean brightness (learnable in a few steps)."""
    rng = np.random.default_rng(0)

    def split(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 60, (n, 12, 12, 3)) + (y * 80)[:, None, None, None]
        return x.astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = split(96)
    x_te, y_te = split(30)
    p = tmp_path / "tiny.npz"
    np.savez(p, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return p
