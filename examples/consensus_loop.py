"""The plain loop of examples/plain_loop.py with gradient-consensus selection: train on the samples whose last-layer
gradient agrees most with the rest of their class in the batch. Run: python examples/consensus_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import BatchScorer, ConsensusFilter

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()
torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)  # (N, 3, 8, 8)
dataset = TensorDataset(images, torch.tensor(digits.target))
model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scorer = BatchScorer(model, by_class=True)  # scores through model.fc, the final nn.Linear
consensus = ConsensusFilter(by_class=True, consensus_keep=0.8)  # ReLU features: the class cosine is never < 0
loader = DataLoader(dataset, batch_size=100, shuffle=True)

step = 0
while step < args.steps:
    for x, y in loader:
        keep = consensus.select(scorer(x, y))  # (B,) bool: the top 80 % by cos(g_i, G_class - g_i)
        loss = F.cross_entropy(model(x[keep]), y[keep])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.3f}")
