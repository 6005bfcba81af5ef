"""The plain loop of examples/plain_loop.py with importance sampling (Katharopoulos & Fleuret): score a presample
of 3 x 100, train on 100 drawn by score and reweighted (unbiased), once the variance reduction pays. Run:
python examples/importance_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import BatchScorer, ImportanceSampler

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
sampler = ImportanceSampler(train_batch=100)
loader = DataLoader(dataset, batch_size=sampler.presample_size, shuffle=True)

step = 0
while step < args.steps:
    for x, y in loader:
        rows, weight = sampler.choose(scorer(x, y).residual_norm, seed=step)
        loss = (weight * F.cross_entropy(model(x[rows]), y[rows], reduction="none")).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.3f}")
