"""Suite 4 (overhead): the trainer's host work per step against minimal hand-written loops (``minimal_loops``),
same device-resident digits, same tiny model, batch 32, one thread, a block of 50 steps per round (one row flush
each).

``fixed`` and ``adabatch`` are compared with the minimal fixed loop, ``edba`` (its batch pinned at 32) with the
minimal EDBA loop, which calls ``select_subset`` itself. The two loops alternate block by block (the minimal one
runs in each round's untimed setup and is timed there), so a drift of the machine's speed during the run reaches
both sides of a ratio alike; the report divides the dynbatch median by the comparison point's median.
"""
import statistics
import time

import pytest
import torch

from .common import machine, sync
from .minimal_loops import BLOCK, MinimalEDBA, MinimalFixed, tiny_mlp, trainer, trainer_block

BATCH = 32
ROUNDS = 40
PINNED = {"bs_min": BATCH, "bs_max": BATCH}  # EDBA's batch-size rule cannot move it
CASES = {
    "dynbatch_fixed": ("fixed", {}),
    "dynbatch_adabatch": ("adabatch", {"resize_every": 1_000_000}),  # its resizes are epochs apart: none here
    "dynbatch_edba": ("edba", PINNED),
}


@pytest.fixture
def one_thread():
    """Host work is what this suite measures: on one thread, as a researcher's loop on a laptop core, and without
    the second core's scheduling noise in the ratio."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", list(CASES))
def test_overhead(benchmark, impl, tmp_path, one_thread):
    torch.manual_seed(0)
    policy, options = CASES[impl]
    t = trainer(policy, BATCH, tmp_path / "run", **options)
    split = trainer("fixed", BATCH, tmp_path / "data").data.train
    minimal = (MinimalEDBA if policy == "edba" else MinimalFixed)(split, tiny_mlp(10, split.c), BATCH)
    minimal_s: list[float] = []

    def minimal_block():  # the comparison point, in the round's setup: untimed by the benchmark, timed here
        start = time.perf_counter()
        minimal.block()
        sync()
        minimal_s.append(time.perf_counter() - start)

    def dynbatch_block():
        trainer_block(t)
        sync()

    benchmark.extra_info.update(suite="overhead", impl=impl, batch=BATCH, steps=BLOCK, machine=machine(),
                                compare="minimal_edba" if policy == "edba" else "minimal_fixed")
    benchmark.pedantic(dynbatch_block, setup=minimal_block, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    benchmark.extra_info["compare_median_s"] = statistics.median(minimal_s[2:])
