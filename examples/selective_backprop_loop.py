"""The plain loop of examples/plain_loop.py with Selective Backprop: keep each sample with probability
(percentile of its loss among the recent ones)^beta and train on the kept. Run:
python examples/selective_backprop_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import BatchScorer, SelectiveBackprop

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()
torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)  # (N, 3, 8, 8)
dataset = TensorDataset(images, torch.tensor(digits.target))
model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scorer = BatchScorer(model)  # scores through model.fc, the final nn.Linear
selective = SelectiveBackprop(sb_beta=1.0)
loader = DataLoader(dataset, batch_size=100, shuffle=True)

step = 0
while step < args.steps:
    for x, y in loader:
        keep = selective.select(scorer(x, y).loss, seed=step)  # (B,) bool
        loss = F.cross_entropy(model(x[keep]), y[keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.3f}")
