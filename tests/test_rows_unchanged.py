"""The step path may be reshaped for speed, never for results: for a seed, every policy writes the rows it wrote
before (timing fields aside). ``tests/golden/rows.json`` was written by the code before the hot-loop rework
(commit 'Selection as one fused, registered op', the parent of the rework) with

    python tests/test_rows_unchanged.py --write

Floats are compared at rtol 1e-4 (BLAS kernels may round differently on another CPU), everything else exactly;
EDBA's margin |(L - L_ema) / (G - G_ema) - 1| at atol 1e-4: its numerator cancels, so one ulp of the fp32 batch loss
L (2.4e-7 at L = 2.3; a reduced cross-entropy since the host-cost work, and a vectorised exp in the native softmax
since) moves it by 2.4e-7 / |L - L_ema|, ~1e-4 where L - L_ema is a few 1e-3 (these rows' margins are ~1e-3).
"""
import json
import sys
from pathlib import Path

import pytest
from torch import nn

GOLDEN = Path(__file__).parent / "golden" / "rows.json"
TIMING = {"step_s", "wall_s", "epoch_s", "samples_per_s", "selection_s", "candidates_s"}
COMMON = dict(model="test_rows_unchanged:mlp", train_samples=192, batch_size=64, epochs=2, amp="none",
              progress=False, util_interval=5.0, seed=3)
POLICIES = {
    "fixed": {},
    "edba": {"policy_options": {"subsets": 256}},
    "split": {"policy_options": {"base_batch": 64}},
    "adabatch": {"policy_options": {"resize_every": 1}},
}


def mlp(num_classes: int, in_channels: int) -> nn.Module:
    """Linear layers only: a small model whose arithmetic differs little between CPUs."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, 32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def rows_for(policy: str, out: Path) -> list[dict]:
    from dynbatch.train.config import TrainConfig
    from dynbatch.train.run_folder import read_metrics
    from dynbatch.train.trainer import Trainer

    opts = POLICIES[policy]
    cfg = TrainConfig(policy=policy, **COMMON, **opts)
    Trainer.new(cfg, out, log=lambda m: None).run()
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("util_")} for r in read_metrics(out)]


ATOL = {"margin": 1e-4}


def _close(a, b, key: str = "") -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=ATOL.get(key, 1e-7))
    return a == b


@pytest.mark.parametrize("policy", list(POLICIES))
def test_rows_equal_the_rows_before_the_hot_loop_rework(policy, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    want = json.loads(GOLDEN.read_text())[policy]
    got = rows_for(policy, tmp_path / policy)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), (i, g.keys() ^ w.keys())
        bad = {k: (g[k], w[k]) for k in g if not _close(g[k], w[k], k)}
        assert not bad, f"row {i}: {bad}"


if __name__ == "__main__":
    import tempfile

    assert sys.argv[1:] == ["--write"], "usage: python tests/test_rows_unchanged.py --write"
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as tmp:
        golden = {p: rows_for(p, Path(tmp) / p) for p in POLICIES}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=0) + "\n")
    print(f"wrote {GOLDEN}")
