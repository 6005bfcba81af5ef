"""The noisy study's fixed arm as a plain PyTorch loop, written for this project with no dynbatch code in its training
path: the reference that ``bench/baseline_question.py`` pairs ``dynbatch train --policy fixed`` with.

    python bench/plain_noisy.py --data cifar10_subset.npz --labels labels.npy --seed 0 --json OUT [--bf16]
        [--pad mean|black]

PreResNet-20 (He et al. 2016, pre-activation, widths 16/32/64, Kaiming-normal convolutions), SGD lr 0.05,
momentum 0.9, weight decay 5e-4 on every parameter, cosine annealing per step to 0 over 30 epochs, batch 128 (the
last batch of an epoch partial), each epoch a new permutation; random crops of the image padded by 4 pixels (of the
mean colour, or black with ``--pad black``) and random horizontal flips; images scaled by the training split's
per-channel mean and std. Trains on ``--labels`` (a .npy of one label per training image: the noisy draw), tests on
the clean test labels after every epoch. fp32, or bf16 autocast with ``--bf16``. One thread unless OMP_NUM_THREADS
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


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, len(x), 500):
            correct += int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum())
    model.train()
    return correct / len(x)


def train(data: str, labels: str, seed: int, epochs: int = 30, batch: int = 128, bf16: bool = False,
          pad: str = "mean") -> dict:
    """Train once; returns the per-epoch test accuracies and training seconds (evaluation excluded). ``pad``: the
    crops' padding, "mean" (zeros of the normalised images: the mean colour) or "black" (zeros of the raw images,
    as torchvision's ``RandomCrop(padding=4)`` on a PIL image, and dynbatch's ``--pad-mode zero``)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    z = np.load(data)
    x_train = torch.from_numpy(z["x_train"]).permute(0, 3, 1, 2).float() / 255
    mean, std = x_train.mean((0, 2, 3), keepdim=True), x_train.std((0, 2, 3), keepdim=True)
    x_train = (x_train - mean) / std
    x_test = (torch.from_numpy(z["x_test"]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    fill = -mean / std if pad == "black" else 0.0
    y_train = torch.from_numpy(np.load(labels).astype(np.int64))
    y_test = torch.from_numpy(z["y_test"].astype(np.int64))
    model = PreResNet20(int(z["y_train"].max()) + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = math.ceil(len(x_train) / batch)
    total, step, curve = epochs * steps_per_epoch, 0, []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch):
            for g in opt.param_groups:
                g["lr"] = 0.5 * 0.05 * (1 + math.cos(math.pi * step / total))
            idx = order[i:i + batch]
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(augment(x_train[idx], gen, fill)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        seconds = time.perf_counter() - t0
        curve.append({"epoch": epoch, "test_acc": evaluate(model, x_test, y_test, bf16), "epoch_s": seconds})
        print(f"epoch {epoch + 1}: test {100 * curve[-1]['test_acc']:.1f} %, {seconds:.1f} s", flush=True)
    return {"seed": seed, "labels": labels, "bf16": bf16, "pad": pad, "epochs": curve, "final_acc": curve[-1]["test_acc"],
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
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    result = train(a.data, a.labels, a.seed, a.epochs, bf16=a.bf16, pad=a.pad)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
