"""A plain PyTorch training loop: torchvision's ResNet-18 on scikit-learn's handwritten digits.

``examples/edba_loop.py`` is this loop with EDBA; the README shows the difference. Run: python examples/plain_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

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

step = 0
while step < args.steps:
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.3f}")
