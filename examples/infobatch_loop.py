"""The plain loop of examples/plain_loop.py with InfoBatch: each epoch prunes half of the samples whose last loss was
below the mean, and weighs their kept peers up so the epoch's expected gradient is the full one; the last eighth of
the epochs train on everything. Run: python examples/infobatch_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import InfoBatch

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()
torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)  # (N, 3, 8, 8)
dataset = TensorDataset(images, torch.tensor(digits.target))
model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = DataLoader(dataset, batch_size=100, shuffle=True)
info = InfoBatch(len(dataset), epochs=-(-args.steps // len(loader)))  # the score table, one per sample

step = epoch = 0
while step < args.steps:
    for idx in info.batches(epoch, batch_size=100):  # this epoch's kept samples, shuffled
        x, y = dataset[idx]
        loss = info.weighted_mean(F.cross_entropy(model(x), y, reduction="none"), idx)  # scores updated
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
    epoch += 1
print(f"step {step}: loss {loss.item():.3f}")
