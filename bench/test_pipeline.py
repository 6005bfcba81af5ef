"""Suite 4: augmented samples per second, device-resident pipeline against torchvision's DataLoader.

Same images (the shared CIFAR-10 subset where present, else random CIFAR-shaped images), same augmentation
(random crop with 4-pixel padding, horizontal flip, normalisation), batch 256, one epoch per round.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from .common import DEVICE, run
from dynbatch.data import DataSource, DeviceData, VariableBatchSampler, load_dataset

SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def source() -> DataSource:
    if SUBSET.is_file():
        return load_dataset(f"npz:{SUBSET}")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5000, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 5000)
    return DataSource("random", x, y, x[:100], y[:100], 10, (0.5,) * 3, (0.25,) * 3)


def test_device_pipeline(benchmark):
    src = source()
    data = DeviceData(src, DEVICE)
    gen = torch.Generator().manual_seed(0)

    def epoch():
        s = VariableBatchSampler(len(data.train), seed=0)
        while not s.epoch_done:
            x, _ = data.train.batch(s.next(256), gen)
        return x

    run(benchmark, epoch, suite="pipeline", impl="device_resident", samples=len(data.train), workers=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_torchvision_dataloader(benchmark, workers):
    from PIL import Image
    from torchvision import transforms as T

    src = source()
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(src.mean, src.std)])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(src.y_train)

        def __getitem__(self, i):
            return tf(Image.fromarray(src.x_train[i])), int(src.y_train[i])

    loader = torch.utils.data.DataLoader(Images(), batch_size=256, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, pin_memory=DEVICE.type == "cuda")

    def epoch():
        for x, _ in loader:
            x = x.to(DEVICE, non_blocking=True)
        return x

    run(benchmark, epoch, budget_s=3.0, suite="pipeline", impl=f"torchvision_w{workers}", samples=len(src.y_train),
        workers=workers)
