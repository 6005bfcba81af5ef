"""Initialisations and normalisation settings applied to any model after it is built (the fast recipe's parts):
dirac (identity) convolutions, BatchNorm momentum, epsilon and frozen weights, and the first convolution
initialised by whitening the training images' patches."""
from __future__ import annotations

import torch
from torch import nn

from dynbatch.errors import UserError


def dirac_init(model: nn.Module) -> int:
    """Every ``nn.Conv2d`` with at least as many outputs as inputs starts as the identity on its inputs (its first
    ``in_channels`` filters are dirac deltas; the rest keep their initialisation): an implicit residual path. The
    number of convolutions changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels >= m.in_channels:
            with torch.no_grad():
                nn.init.dirac_(m.weight[:m.in_channels])
            n += 1
    return n


def set_batchnorm(model: nn.Module, *, momentum: float | None = None, eps: float | None = None,
                  train_weight: bool = True) -> int:
    """BatchNorm layers' momentum (torch's convention: the new batch's weight) and epsilon where given; with
    ``train_weight`` False their weights stay at 1 (``requires_grad`` off). The number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if momentum is not None:
                m.momentum = momentum
            if eps is not None:
                m.eps = eps
            if m.weight is not None and not train_weight:
                with torch.no_grad():
                    m.weight.fill_(1.0)
                m.weight.requires_grad_(False)
            n += 1
    return n


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first layer with weights, which must be an ``nn.Conv2d`` (``UserError`` otherwise)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
        if any(True for _ in m.parameters(recurse=False)):
            break
    raise UserError("--whiten needs a model whose first layer with weights is an nn.Conv2d; drop --whiten or use "
                    "--model airbench")


def patches(images: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Every kernel-sized patch of ``images`` (N, C, H, W), flattened: (N (H - kh + 1)(W - kw + 1), C kh kw)."""
    c, (kh, kw) = images.shape[1], kernel
    return images.unfold(2, kh, 1).unfold(3, kw, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)


def whiten_conv(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set ``conv``'s filters to the whitening transform of ``images``' patches (N, C, H, W; normalised as the
    model sees them): the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue + eps), largest first,
    then the same negated (so a ReLU/GELU after it keeps both signs). Freezes the weights. ``conv`` needs
    2 x C x kh x kw output channels, no groups, no stride or dilation (``UserError`` otherwise)."""
    kh, kw = conv.kernel_size
    d = conv.in_channels * kh * kw
    if conv.groups != 1 or conv.out_channels != 2 * d or conv.stride != (1, 1) or conv.dilation != (1, 1):
        raise UserError(f"--whiten needs a first convolution with 2 x {conv.in_channels} x {kh} x {kw} = {2 * d} "
                        f"output channels, stride 1, no groups (this one has {conv.out_channels}); use --model "
                        "airbench or drop --whiten")
    x = patches(images.float(), (kh, kw)).double()
    cov = x.T @ x / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    order = eigenvalues.argsort(descending=True)
    filters = eigenvectors[:, order].T / (eigenvalues[order] + eps).sqrt()[:, None]  # (d, d): rows whiten
    filters = filters.reshape(d, conv.in_channels, kh, kw)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    conv.weight.requires_grad_(False)
