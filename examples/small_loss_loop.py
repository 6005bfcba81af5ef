"""The plain loop of examples/plain_loop.py with small-loss selection (Co-teaching's schedule, one network): train
on the lowest-loss share of each batch, the left-out share ramping to 20 % over 10 epochs. Run:
python examples/small_loss_loop.py
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import BatchScorer, SmallLoss

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
small_loss = SmallLoss(forget_rate=0.2, ramp_epochs=10)
loader = DataLoader(dataset, batch_size=100, shuffle=True)

step = 0
while step < args.steps:
    for x, y in loader:
        rows = small_loss.select(scorer(x, y).loss, epoch=step / len(loader))  # the lowest losses
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step == args.steps:
            break
print(f"step {step}: loss {loss.item():.3f}")
