"""The comparison points of the overhead suite: training loops as a researcher writes them by hand, over the same
device-resident data and the same tiny model as the dynbatch trainer they are compared with.

Both minimal loops keep what any real loop keeps (the loss and accuracy sums, on the device, read once per block
of steps, as airbench does) and nothing else: no metrics file, no divergence guard, no resumable state. The
difference to the trainer is the trainer's host work per step; a model this small hides none of it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 50  # steps per timed block: the trainer's FLUSH_EVERY, so each block holds one row flush


def tiny_mlp(num_classes: int, in_channels: int) -> nn.Module:
    """Two linear layers on 8x8 images: compute small enough that the loop's host work shows."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 64), nn.ReLU(), nn.Linear(64, num_classes))


def trainer(policy: str, batch: int, out: Path, **options):
    """A dynbatch Trainer on the digits (8x8, device-resident, no augmentation) with ``tiny_mlp``, ready for
    ``_train_step()`` calls: what ``dynbatch train`` runs per step, rows written to ``out``."""
    from dynbatch.train import run_folder
    from dynbatch.train.config import TrainConfig
    from dynbatch.train.metrics import Clock, MetricsSink
    from dynbatch.train.trainer import Trainer

    cfg = TrainConfig(data="digits", model="dynbatch_bench.minimal_loops:tiny_mlp", policy=policy, batch_size=batch,
                      augment=False, amp="none", channels_last="off", epochs=10_000, progress=False,
                      util_interval=60.0, lr=0.05, momentum=0.9, policy_options=options)
    t = Trainer(cfg, out, log=lambda m: None)
    out.mkdir(parents=True, exist_ok=True)
    t.sink = MetricsSink(run_folder.MetricsWriter(out / "metrics.jsonl"), [], Clock(t.device))
    return t


def trainer_block(t) -> None:
    """``BLOCK`` trainer steps, with its epoch boundaries as ``Trainer.run`` handles them (minus evaluation)."""
    for _ in range(BLOCK):
        if t.sampler.epoch_done:
            t._flush()
            t.sampler.new_epoch()
        t._train_step()


class MinimalFixed:
    """SGD on shuffled batches of a :class:`~dynbatch.data.device_data.DeviceSplit`: the hand-written loop."""

    def __init__(self, split, model: nn.Module, batch: int, seed: int = 0):
        self.split, self.model, self.batch = split, model, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(split), generator=self.gen), 0
        self.loss_sum = self.correct = None

    def next_batch(self, size: int):
        if self.pos >= len(self.split):
            self.perm, self.pos = torch.randperm(len(self.split), generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + size]
        self.pos += idx.numel()
        return self.split.batch(idx)

    def train_on(self, x, y) -> None:
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        hits = (logits.detach().argmax(1) == y).sum()
        if self.loss_sum is None:
            self.loss_sum, self.correct = loss.detach(), hits
        else:
            self.loss_sum, self.correct = self.loss_sum + loss.detach(), self.correct + hits

    def block(self) -> tuple[float, int]:
        for _ in range(BLOCK):
            self.train_on(*self.next_batch(self.batch))
        out = (float(self.loss_sum), int(self.correct))  # the block's one read
        self.loss_sum = self.correct = None
        return out


class MinimalEDBA(MinimalFixed):
    """EDBA by hand: a no-grad forward capturing the head's input, ``select_subset``, one read of the choice, then
    a forward and backward on the chosen rows; EMAs on the host. Batch size pinned (no adaptation)."""

    def __init__(self, split, model: nn.Module, batch: int, seed: int = 0, subsets: int = 4096):
        super().__init__(split, model, batch, seed)
        self.subsets, self.step = subsets, 0
        self.loss_ema = self.grad_ema = None
        self.head = model[-1]
        self.feats = None
        self.head.register_forward_hook(lambda mod, inp, out: setattr(self, "feats", inp[0]))

    def block(self) -> tuple[float, int]:
        from dynbatch.ops import SubsetSpec, select_subset

        spec = SubsetSpec(self.subsets)
        for _ in range(BLOCK):
            x, y = self.next_batch(self.batch)
            with torch.no_grad():
                logits = self.model(x)
                loss = F.cross_entropy(logits, y)
            sel = select_subset(logits, y, self.feats, spec, seed=self.step, loss=loss, loss_ema=self.loss_ema,
                                grad_ema=self.grad_ema)
            batch_loss, grad_norm, _, size, _ = sel.stats.tolist()  # the step's one read
            rows = torch.argsort((~sel.mask).to(torch.uint8), stable=True)[:int(size)]
            self.train_on(x[rows], y[rows])
            if self.loss_ema is None:
                self.loss_ema, self.grad_ema = batch_loss, grad_norm
            else:
                self.loss_ema = 0.9 * self.loss_ema + 0.1 * batch_loss
                self.grad_ema = 0.9 * self.grad_ema + 0.1 * grad_norm
            self.step += 1
        out = (float(self.loss_sum), int(self.correct))
        self.loss_sum = self.correct = None
        return out
