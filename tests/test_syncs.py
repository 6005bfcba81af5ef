"""Host-device synchronisations inside training steps, counted on CPU, where a GPU would feel them: every read of
a number from a tensor (``item``/``float``/``int``/``bool``, ``tolist``, ``numpy``), ``nonzero`` and boolean-mask
indexing (whose output size the host must learn). Steps of the fixed and adabatch policies ask the device for
nothing; their rows are read in blocks of ``FLUSH_EVERY`` steps, so at most 0.1 reads per step amortised, with
label noise too (the mislabeled counts join the block); InfoBatch and the proxy's filter too (the proxy's loss joins
the block; InfoBatch reads once at an epoch's start). EDBA, split and the selection methods read their choice
once per step (one packed copy), and nothing else."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynbatch.train.config import TrainConfig
from dynbatch.train.metrics import FLUSH_EVERY
from dynbatch.train.trainer import Trainer

aten = torch.ops.aten


class SyncCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default):
            self.count += 1
        elif func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.count += 1
        return func(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch):
    """(counter, wrap): ``wrap(trainer)`` counts inside its steps and block flushes only."""
    counter = SyncCounter()
    for name in ("tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def reading(self, *a, _real=real, **k):
            if counter.active:
                counter.count += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, reading)
    counter.active = False

    def wrap(trainer):
        for name in ("_train_step", "_flush"):
            real = getattr(trainer, name)

            def inside(*a, _real=real, **k):
                counter.active = True
                try:
                    with counter:
                        return _real(*a, **k)
                finally:
                    counter.active = False

            setattr(trainer, name, inside)

    return counter, wrap


def test_counter_sees_the_reads_it_must(counted):
    counter, _ = counted
    counter.active = True
    with counter:
        t = torch.arange(6.0)
        float(t.sum()), t.tolist(), t[t > 2], (t > 2).nonzero(), bool(t.any())
    assert counter.count == 5


def per_block(steps: int) -> int:
    return -(-steps // FLUSH_EVERY)  # full blocks of FLUSH_EVERY steps, then the epoch's rest


def once_per_step(steps: int) -> int:
    return steps + per_block(steps)


NOISE = {"label_noise": "symmetric:0.3"}


@pytest.mark.parametrize("policy, options, samples, batch, reads, per_step, extra", [
    ("fixed", {}, 240, 4, per_block, 0.1, {}),  # nothing per step: one read per block of rows
    ("fixed", {}, 240, 4, per_block, 0.1, NOISE),
    ("adabatch", {"resize_every": 1}, 240, 4, per_block, 0.1, {}),
    ("edba", {"subsets": 256}, 120, 10, once_per_step, 1.1, NOISE),  # its choice, once per step
    ("split", {"splits": "1,2"}, 120, 8, once_per_step, 1.1, {}),
    ("importance", {"tau_threshold": 1.0001}, 240, 8, once_per_step, 1.1, NOISE),
    ("selective-backprop", {}, 120, 8, once_per_step, 1.1, NOISE),
    ("small-loss", {}, 120, 8, once_per_step, 1.1, NOISE),
    ("consensus", {"by_class": True}, 120, 8, once_per_step, 1.1, NOISE),
    ("infobatch", {"ib_delta": 0.0}, 240, 4, per_block, 0.1, NOISE),  # its one read is at the epoch's start
    ("proxy", {"proxy_every": 2}, 240, 8, per_block, 0.1, NOISE),  # the proxy's loss joins the block's read
])
def test_reads_per_step(tmp_path, counted, policy, options, samples, batch, reads, per_step, extra):
    counter, wrap = counted
    cfg = TrainConfig(policy=policy, policy_options=options, train_samples=samples, batch_size=batch, epochs=1,
                      progress=False, util_interval=5.0, **extra)
    t = Trainer.new(cfg, tmp_path / "run", log=lambda m: None)
    wrap(t)
    t.run()
    assert t.step >= 10
    assert counter.count == reads(t.step)  # exactly these reads, and no other
    assert counter.count / t.step <= per_step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sync debug mode needs CUDA")
def test_fixed_steps_on_cuda_raise_no_sync_error(tmp_path):
    cfg = TrainConfig(device="cuda", train_samples=200, batch_size=4, epochs=1, progress=False, util_interval=5.0)
    t = Trainer.new(cfg, tmp_path / "run", log=lambda m: None)
    real = t._train_step

    def strict():
        torch.cuda.set_sync_debug_mode("error")
        try:
            real()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    t._train_step = strict
    t.run()
