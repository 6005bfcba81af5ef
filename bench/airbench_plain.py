"""airbench94's recipe as one plain PyTorch script, written for this project from the recipe's description (no
dynbatch code): the reference that ``bench/fast_recipe.py`` times the engine's ``--recipe airbench94`` against.

    python bench/airbench_plain.py --data cifar10_subset.npz --batch-size 128 --epochs 10 --seed 0 [--json OUT]

The recipe: a 2 x 2 convolution set to the whitening transform of the training patches (weights frozen, bias
trained for 3 epochs), three conv groups (64, 256, 256 wide) with GELU and BatchNorm (momentum 0.4 in torch's
convention, eps 1e-12, weights frozen at 1), dirac-initialised convolutions, a bias-free linear head scaled by 1/9;
Nesterov SGD (momentum 0.85) on the summed loss with lr 11.5 and weight decay 0.0153 per 1024 examples (the lr over
Nesterov's gain), BatchNorm biases at 64 x the lr; label smoothing 0.2; a triangle schedule 0.2 -> 1 -> 0.07 peaking
at 23 % of the steps; lookahead every 5 steps from epoch 3 with decay 0.95^5 x progress^3; every image flipped by
its own coin, all flipped every other epoch; translations of up to 2 pixels with reflect padding; test-time
augmentation (mirror and 1-pixel translations) after the last epoch. Prints one line per epoch; training time
excludes evaluation.
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

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=0.4), nn.BatchNorm2d(c_out, eps=1e-12,
                                                                                              momentum=0.4)
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(False)
        for conv in (self.conv1, self.conv2):
            with torch.no_grad():
                nn.init.dirac_(conv.weight[:conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.bn2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 2, bias=True)
        nn.init.zeros_(self.stem.bias)
        self.blocks = nn.Sequential(Block(24, 64), Block(64, 256), Block(256, 256))
        self.fc = nn.Linear(256, classes, bias=False)

    def forward(self, x):
        x = self.blocks(F.gelu(self.stem(x)))
        return self.fc(F.max_pool2d(x, 3).flatten(1)) / 9


def whiten(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    p = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    values, vectors = torch.linalg.eigh(p.T @ p / len(p))
    values, vectors = values.flip(0), vectors.flip(1)
    w = (vectors.T / (values + eps).sqrt()[:, None]).reshape(12, 3, 2, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([w, -w]).float())
    conv.weight.requires_grad_(False)


def triangle(step: int, total: int, start=0.2, peak=0.23, end=0.07) -> float:
    x = step / total
    return start + (1 - start) * x / peak if x < peak else 1 + (end - 1) * (x - peak) / (1 - peak)


def views(model, x, level=2):
    mirror = lambda v: 0.5 * (model(v) + model(v.flip(-1)))  # noqa: E731
    if level == 0:
        return model(x)
    if level == 1:
        return mirror(x)
    p = F.pad(x, (1,) * 4, mode="reflect")
    return 0.5 * mirror(x) + 0.25 * (mirror(p[..., :32, :32]) + mirror(p[..., 2:, 2:]))


@torch.no_grad()
def accuracy(model, x, y, level=0) -> float:
    model.eval()
    correct = sum(int((views(model, x[i:i + 1000], level).argmax(1) == y[i:i + 1000]).sum())
                  for i in range(0, len(x), 1000))
    model.train()
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    data = np.load(a.data)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    prep = lambda u8: (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - mean) / std  # noqa: E731
    x_train, x_test = prep(data["x_train"]), prep(data["x_test"])
    y_train, y_test = torch.from_numpy(data["y_train"]).long(), torch.from_numpy(data["y_test"]).long()
    n, b = len(x_train), a.batch_size

    model = Net().to(memory_format=torch.channels_last)
    whiten(model.stem, x_train[:5000])
    biases = [p for name, p in model.named_parameters() if "bn" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "bn" not in name and p.requires_grad]
    gain = 1024 * (1 + 1 / (1 - 0.85))
    lr, wd = 11.5 / gain, 0.0153 * b / gain
    opt = torch.optim.SGD([dict(params=biases, lr=lr * 64, weight_decay=wd / (lr * 64)),
                           dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=0.85, nesterov=True)
    base_lrs = [g["lr"] for g in opt.param_groups]

    own_flip = torch.rand(n) < 0.5
    padded = F.pad(x_train, (2,) * 4, mode="reflect")
    steps_per_epoch = math.ceil(n / b)
    total, step, slow, train_s, log = steps_per_epoch * a.epochs, 0, None, 0.0, []
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        model.stem.bias.requires_grad_(epoch < 3)
        order = torch.randperm(n)
        for i in range(steps_per_epoch):
            idx = order[i * b:(i + 1) * b]
            shifts = torch.randint(0, 5, (len(idx), 2))
            rows = torch.arange(32)[None, :] + shifts[:, :1]
            cols = torch.arange(32)[None, :] + shifts[:, 1:]
            x = padded[idx[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            flip = own_flip[idx] ^ bool(epoch % 2)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).contiguous(memory_format=torch.channels_last)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * triangle(step, total)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.2, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if epoch >= 3 and step % 5 == 0:
                state = [t for t in model.state_dict().values() if t.is_floating_point()]
                if slow is None:
                    slow = [t.clone() for t in state]
                else:
                    rho = 0.95 ** 5 * (step / total) ** 3
                    with torch.no_grad():
                        for s, t in zip(slow, state):
                            s.lerp_(t, 1 - rho)
                            t.copy_(s)
        if slow is not None:
            with torch.no_grad():
                for s, t in zip(slow, [t for t in model.state_dict().values() if t.is_floating_point()]):
                    t.copy_(s)
        train_s += time.perf_counter() - t0
        acc = accuracy(model, x_test, y_test)
        log.append({"epoch": epoch + 1, "train_s": train_s, "test_acc": acc})
        print(f"epoch {epoch + 1:>2}  test acc {acc:.4f}  training {train_s:.1f}s", flush=True)
    tta = accuracy(model, x_test, y_test, level=2)
    print(f"final test acc {log[-1]['test_acc']:.4f}  with TTA {tta:.4f}  training {train_s:.1f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"epochs": log, "test_acc_tta": tta, "threads": torch.get_num_threads(), "seed": a.seed}, f)


if __name__ == "__main__":
    main()
