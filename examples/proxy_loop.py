"""The plain loop of examples/plain_loop.py with proxy filtering (airbench96_faster): a small proxy network scores
each batch, the model trains on the half the proxy finds hardest, and the proxy learns online every 4th batch.
Run: python examples/proxy_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import ProxyFilter

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
small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))  # the proxy: cheap to run
proxy = ProxyFilter(small, torch.optim.SGD(small.parameters(), lr=0.05), proxy_keep=0.5, proxy_every=4)

step = 0
while step < args.steps:
    for x, y in loader:
        rows = proxy.select(x, y, step, lr=0.05)  # the proxy's highest-loss half; it learns every 4th batch
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.3f}")
