"""Suite 4 (overhead): the trainer's host work per step against minimal hand-written loops (``minimal_loops``),
same device-resident digits, same tiny model, batch 32, a block of 50 steps per round (one row flush each).

``fixed`` and ``adabatch`` are compared with the minimal fixed loop, ``edba`` (its batch pinned at 32) with the
minimal EDBA loop, which calls ``select_subset`` itself. The report divides each dynbatch median by its
comparison point's median from the same run.
"""
import pytest
import torch

from .common import run
from .minimal_loops import BLOCK, MinimalEDBA, MinimalFixed, tiny_mlp, trainer, trainer_block

BATCH = 32
PINNED = {"bs_min": BATCH, "bs_max": BATCH}  # EDBA's batch-size rule cannot move it
CASES = {
    "dynbatch_fixed": ("fixed", {}),
    "dynbatch_adabatch": ("adabatch", {"resize_every": 1_000_000}),  # its resizes are epochs apart: none here
    "dynbatch_edba": ("edba", PINNED),
}


@pytest.mark.parametrize("impl", ["minimal_fixed", "minimal_edba", *CASES])
def test_overhead(benchmark, impl, tmp_path):
    torch.manual_seed(0)
    if impl.startswith("dynbatch_"):
        policy, options = CASES[impl]
        t = trainer(policy, BATCH, tmp_path / "run", **options)
        fn = lambda: trainer_block(t)  # noqa: E731
    else:
        split = trainer("fixed", BATCH, tmp_path / "data").data.train
        model = tiny_mlp(10, split.c)
        loop = (MinimalFixed if impl == "minimal_fixed" else MinimalEDBA)(split, model, BATCH)
        fn = loop.block
    run(benchmark, fn, budget_s=3.0, suite="overhead", impl=impl, batch=BATCH, steps=BLOCK,
        compare="minimal_edba" if impl == "dynbatch_edba" else "minimal_fixed")
