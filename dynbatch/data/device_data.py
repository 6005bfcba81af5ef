"""The whole uint8 data set resident on the training device, with batched augmentation there.

Images are stored NHWC and pre-padded once, so a random crop is a single gather and the NHWC -> NCHW permute of the
result is already ``channels_last`` in memory. Variable batch sizes cost nothing: a batch is an index tensor.
"""
from __future__ import annotations

import numpy as np
import torch

from dynbatch.data.sources import DataSource
from dynbatch.data.text import TextSource, TokenSplit


def _pad(x: torch.Tensor, p: int, mode: str, mean) -> torch.Tensor:
    """uint8 images (N, H, W, C) padded by ``p`` pixels on each side: "zero" (black, as torchvision's RandomCrop
    pads a PIL image), "reflect", or "mean" (the split's mean colour, rounded to uint8: what a loop that pads its
    normalised tensors with zeros sees)."""
    if mode == "reflect":  # through a float view, exact for uint8 values
        return (torch.nn.functional.pad(x.permute(0, 3, 1, 2).float(), (p,) * 4, mode="reflect")
                .round().to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    out = torch.nn.functional.pad(x, (0, 0, p, p, p, p))
    if mode == "mean":
        border = torch.ones(out.shape[1:3], dtype=torch.bool)
        border[p:-p, p:-p] = False
        out[:, border] = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8)
    return out


class DeviceSplit:
    """One split on ``device``.

    x: uint8 (N, H + 2p, W + 2p, C), zero padded by p = ``padding``; y: int64 (N,).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, mean, std, device: torch.device, padding: int, flip: bool,
                 pad_mode: str = "zero", flip_mode: str = "random", seed: int = 0):
        self.n, self.h, self.w, self.c = x.shape
        self.padding = padding
        self.flip = flip
        xt = torch.from_numpy(np.ascontiguousarray(x))
        if padding:
            xt = _pad(xt, padding, pad_mode, mean)
        self.x = xt.to(device)
        # alternate flips (airbench's): each image's own flip, drawn once, inverted every other epoch
        self.flip_base = ((torch.rand(self.n, generator=torch.Generator().manual_seed(seed)) < 0.5).to(device)
                          if flip and flip_mode == "alternate" else None)
        self.y = torch.from_numpy(np.ascontiguousarray(y)).to(device)
        self.y_clean: torch.Tensor | None = None  # the true labels, where y holds noisy ones (label noise)
        self.mislabeled: torch.Tensor | None = None  # bool (N,): y != y_clean, with label noise
        self.device = device
        # Folded into one multiply-add: (x / 255 - mean) / std == x * scale + shift.
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        self.scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device) / std_t).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.n

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device without waiting for it: through pinned memory on CUDA (a copy from
        pageable memory would synchronise the stream first)."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _normalise(self, x_nhwc: torch.Tensor) -> torch.Tensor:
        return x_nhwc.permute(0, 3, 1, 2).float() * self.scale + self.shift

    def batch(self, idx: torch.Tensor, generator: torch.Generator | None = None,
              epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) float32 normalised, labels (B,) for indices ``idx``.

        With a ``generator`` (CPU), each image gets a random crop within the padding and, where the data set allows,
        a horizontal flip (random, or alternate: the image's own flip, inverted on odd ``epoch``s); without one,
        the centre crop (evaluation).
        """
        idx = idx.to(self.device, non_blocking=True)
        p = self.padding
        if generator is None or (p == 0 and not self.flip):
            x = self.x[idx, p : p + self.h, p : p + self.w]
        else:
            b = idx.numel()
            # Offsets and flips are drawn on the CPU generator so CPU and CUDA runs see the same augmentation.
            dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
            own = self.flip_base is not None  # alternate flips: the images' own, on the device (applied below)
            drawn = self.flip and not own
            flip = torch.rand(b, generator=generator) < 0.5 if drawn else torch.zeros(b, dtype=torch.bool)
            cols = torch.arange(self.w)
            cols = torch.where(flip[:, None], self.w - 1 - cols, cols) + dx[:, None]  # flip folded into the gather
            rows = torch.arange(self.h) + dy[:, None]
            rows, cols = self._to_device(rows), self._to_device(cols)
            if own:
                flip = (self.flip_base[idx] ^ bool(epoch % 2))[:, None]
                cols = torch.where(flip, 2 * self._to_device(dx)[:, None] + self.w - 1 - cols, cols)
            x = self.x[idx[:, None, None], rows[:, :, None], cols[:, None, :]]
        return self._normalise(x), self.y[idx]


class DeviceData:
    """Train and test splits of a :class:`DataSource` on one device."""

    def __init__(self, src: DataSource, device: torch.device, train_indices: np.ndarray | None = None,
                 augment_seed: int = 0):
        x_tr, y_tr = src.x_train, src.y_train
        if train_indices is not None:
            x_tr, y_tr = x_tr[train_indices], y_tr[train_indices]
        self.source = src
        self.device = device
        self.augment_seed = augment_seed
        if isinstance(src, TextSource):  # sequences of tokens: no augmentation, no label noise
            self.train, self.test = TokenSplit(x_tr, y_tr, device), TokenSplit(src.x_test, src.y_test, device)
            self.train_label_noise = None
            return
        self.train = DeviceSplit(x_tr, y_tr, src.mean, src.std, device, src.crop_padding, src.flip, src.pad_mode,
                                 src.flip_mode, seed=augment_seed)
        self.test = DeviceSplit(src.x_test, src.y_test, src.mean, src.std, device, 0, False)
        self._set_clean_labels(train_indices)

    def _set_clean_labels(self, train_indices: np.ndarray | None) -> None:
        """With label noise: the training split's true labels (``train.y_clean``, on the device) and the measured
        noise rate (``train_label_noise``), the fraction of its labels that differ from them."""
        clean = self.source.y_train_clean
        self.train.y_clean = self.train.mislabeled = None
        self.train_label_noise = None
        if clean is not None:
            clean = clean if train_indices is None else clean[train_indices]
            self.train.y_clean = torch.from_numpy(np.ascontiguousarray(clean)).to(self.device)
            self.train.mislabeled = self.train.y_clean != self.train.y
            noisy = self.source.y_train if train_indices is None else self.source.y_train[train_indices]
            self.train_label_noise = float(np.mean(clean != noisy)) if len(clean) else 0.0

    def use_train_subset(self, train_indices: np.ndarray) -> None:
        """Train on these rows of the source's training split from now on (``--redraw-subset``)."""
        src = self.source
        self.train = DeviceSplit(src.x_train[train_indices], src.y_train[train_indices], src.mean, src.std,
                                 self.device, src.crop_padding, src.flip, src.pad_mode, src.flip_mode,
                                 seed=self.augment_seed)
        self._set_clean_labels(train_indices)
