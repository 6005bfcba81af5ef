"""The noisy study's fixed arm as a plain PyTorch loop, written for this project with no dynbatch code in its training
path: the reference that ``bench/baseline_question.py`` pairs ``dynbatch train --policy fixed`` with.

    python bench/plain_noisy.py --data cifar10_subset.npz --labels labels.npy --seed 0 --json OUT [--bf16]
        [--pad mean|black] [--as-engine] [--fused]

PreResNet-20 (He et al. 2016, pre-activation, widths 16/32/64, Kaiming-normal convolutions), SGD lr 0.05,
momentum 0.9, weight decay 5e-4 on every parameter, cosine annealing per step to 0 over 30 epochs, batch 128 (the
last batch of an epoch partial), each epoch a new permutation; random crops of the image padded by 4 pixels (of the
mean colour, or black with ``--pad black``) and random horizontal flips; images scaled by the training split's
per-channel mean and std. Trains on ``--labels`` (a .npy of one label per training image: the noisy draw), tests on
the clean test labels after every epoch. fp32, or bf16 autocast with ``--bf16``. ``--as-engine --fused``: the engine's
fixed arm step for step (:func:`fit`). One thread unless OMP_NUM_THREADS
says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.project = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = F.relu(self.bn1(x))
        skip = x if self.project is None else self.project(h)
        return self.conv2(F.relu(self.bn2(self.conv1(h)))) + skip


class PreResNet20(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, c = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(Block(c, width, stride if i == 0 else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def augment(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Random 32x32 crops of the batch padded by 4 pixels of ``fill`` (a value of the normalised images, or one per
    channel as (1, C, 1, 1)) and random horizontal flips, (B, 3, 32, 32)."""
    b, _, h, w = x.shape
    padded = F.pad(x - fill, (4, 4, 4, 4)) + fill
    dy, dx = torch.randint(0, 9, (b,), generator=gen), torch.randint(0, 9, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, 3, h, w + 8)
    crops = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, 3, h, w)
    crops = crops.gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, batch: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train()
    return correct / len(x)


def load(data: str, labels: str, pad: str, as_engine: bool):
    """(y_train, x_test, y_test, batch_of): the labels, the normalised test images (N, 3, H, W) and a function
    ``batch_of(idx, gen)`` giving the training batch of ``idx``. The plain way normalises once and crops the
    normalised images (padding of ``pad``: "mean", zeros of the normalised images, or "black", zeros of the raw
    ones); ``as_engine`` keeps uint8 images padded with black, crops and flips them from a (B, H, W, C) gather and
    normalises each batch after, as one multiply-add of float32 constants (the engine's order of operations, so
    its rounding and its channels-last strides)."""
    z = np.load(data)
    y_train = torch.from_numpy(np.load(labels).astype(np.int64))
    y_test = torch.from_numpy(z["y_test"].astype(np.int64))
    if as_engine:
        xf = z["x_train"].reshape(-1, z["x_train"].shape[-1]).astype(np.float64) / 255.0
        mean, std = xf.mean(0).tolist(), np.maximum(xf.std(0), 1e-3).tolist()
        std_t = torch.tensor(std, dtype=torch.float32)
        scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)
        padded = F.pad(torch.from_numpy(z["x_train"]), (0, 0, 4, 4, 4, 4))  # (N, H + 8, W + 8, C) uint8, black
        h, w = z["x_train"].shape[1:3]

        def batch_of(idx, gen):
            b = idx.numel()
            dy, dx = torch.randint(0, 9, (b,), generator=gen), torch.randint(0, 9, (b,), generator=gen)
            flip = torch.rand(b, generator=gen) < 0.5
            cols = torch.where(flip[:, None], w - 1 - torch.arange(w), torch.arange(w)) + dx[:, None]
            rows = torch.arange(h) + dy[:, None]
            crops = padded[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
            return crops.permute(0, 3, 1, 2).float() * scale + shift

        x_test = torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2).float() * scale + shift
        return y_train, x_test, y_test, batch_of
    x_train = torch.from_numpy(z["x_train"]).permute(0, 3, 1, 2).float() / 255
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True)
    x_train = (x_train - mean) / std
    x_test = (torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    fill = -mean / std if pad == "black" else 0.0
    return y_train, x_test, y_test, lambda idx, gen: augment(x_train[idx], gen, fill)


def fit(data: str, labels: str, seed: int, epochs: int = 30, batch: int = 128, bf16: bool = False,
        pad: str = "mean", as_engine: bool = False, fused: bool = False, log=print) -> tuple[nn.Module, list[dict]]:
    """Train once; (the model, per-epoch rows: test accuracy, mean training loss, training seconds). ``as_engine``:
    the loop draws what ``dynbatch train --policy fixed --channels-last off --amp none`` draws, from the streams it
    draws them from — the initial weights after ``torch.manual_seed(seed)``, each epoch's order from a generator
    of ``seed + 1`` alone, the crops and flips from one of ``seed + 2`` — sets the cosine's learning rate by the
    epoch's fraction of samples drawn (not of steps), prepares images as :func:`load` says and evaluates 1,000
    test images at a time. ``fused``: torch's fused SGD kernel, the engine's, which rounds apart from the default
    for-each one now and then (one unit in the last place). Both: the engine's training as a plain loop."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    aug_gen = torch.Generator().manual_seed(seed + 2) if as_engine else gen
    y_train, x_test, y_test, batch_of = load(data, labels, pad, as_engine)
    n = len(y_train)
    model = PreResNet20(int(y_test.max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=fused)
    steps_per_epoch = math.ceil(n / batch)
    total, step, curve = epochs * steps_per_epoch, 0, []
    for epoch in range(epochs):
        t0, loss_sum = time.perf_counter(), 0.0
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            progress = (epoch + i / n) / epochs if as_engine else step / total
            for g in opt.param_groups:
                g["lr"] = 0.5 * 0.05 * (1 + math.cos(math.pi * progress))
            idx = order[i:i + batch]
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(batch_of(idx, aug_gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * idx.numel()
            step += 1
        seconds = time.perf_counter() - t0
        acc = evaluate(model, x_test, y_test, bf16, 1000 if as_engine else 500)
        curve.append({"epoch": epoch, "test_acc": acc, "train_loss": loss_sum / n, "epoch_s": seconds})
        log(f"epoch {epoch + 1}: test {100 * acc:.1f} %, {seconds:.1f} s")
    return model, curve


def train(data: str, labels: str, seed: int, epochs: int = 30, batch: int = 128, bf16: bool = False,
          pad: str = "mean", as_engine: bool = False, fused: bool = False) -> dict:
    """:func:`fit`'s result as JSON: per-epoch test accuracies and training seconds (evaluation excluded)."""
    _, curve = fit(data, labels, seed, epochs, batch, bf16, pad, as_engine, fused, log=lambda m: print(m, flush=True))
    return {"seed": seed, "labels": labels, "bf16": bf16, "pad": "black" if as_engine else pad,
            "as_engine": as_engine, "fused": fused, "epochs": curve, "final_acc": curve[-1]["test_acc"],
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--labels", required=True, help=".npy of one training label per image (the noisy draw)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--pad", choices=("mean", "black"), default="mean",
                    help="the crops' padding: the mean colour (zeros after normalising) or black (before)")
    ap.add_argument("--as-engine", action="store_true",
                    help="draw and prepare everything as dynbatch train does (see fit); implies black padding")
    ap.add_argument("--fused", action="store_true", help="torch's fused SGD kernel (the engine's)")
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    result = train(a.data, a.labels, a.seed, a.epochs, bf16=a.bf16, pad=a.pad, as_engine=a.as_engine, fused=a.fused)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
