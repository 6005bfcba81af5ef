"""EDBA inside a LightningModule's ``training_step``: the selector chooses the samples to train on, and the
DataLoader's ``DynamicBatchSampler`` draws the batch size it asks for. Its state goes into Lightning's checkpoints.

    pip install 'dynbatch[lightning]' && python examples/lightning_edba.py
"""
import argparse

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from dynbatch.methods import DynamicBatchSampler, EDBASelector


class DigitsEDBA(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torchvision.models.resnet18(num_classes=10)
        self.selector = EDBASelector(self.model, batch_size=100)  # not a module: holds no parameters of its own

    def training_step(self, batch, batch_idx):
        x, y = batch
        keep = self.selector.select(x, y, step=self.global_step).mask
        loss = F.cross_entropy(self.model(x[keep]), y[keep])
        self.log_dict({"train_loss": loss, "next_batch": float(self.selector.batch_size)})
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["edba"] = self.selector.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.selector.load_state_dict(checkpoint["edba"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    dataset = TensorDataset(images, torch.tensor(digits.target))
    module = DigitsEDBA()
    loader = DataLoader(dataset, batch_sampler=DynamicBatchSampler(len(dataset), module.selector))
    trainer = L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    print(f"step {trainer.global_step}: loss {float(trainer.callback_metrics['train_loss']):.3f}, "
          f"next batch {module.selector.batch_size}")
