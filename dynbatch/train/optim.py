"""The optimizer the trainer builds, and how a step is applied only when it is finite.

Fused optimizers (``fused=True``; CPU and CUDA) accept a ``found_inf`` tensor and skip the whole update on the
device when it is non-zero, the mechanism ``torch.amp.GradScaler`` uses. The executor sets it from the step's
loss and gradient norm, so a non-finite step never reaches the weights and no host read is needed to decide.
"""
from __future__ import annotations

import torch
from torch import nn


OPTIMIZERS = ("sgd", "adam", "adamw")


def build_optimizer(name: str, model: nn.Module, *, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float) -> torch.optim.Optimizer:
    """``sgd`` (momentum, Nesterov, L2 weight decay), ``adam`` (L2) or ``adamw`` (decoupled weight decay), fused,
    with torch's default betas; every one honours ``found_inf`` (see :func:`step_unless`)."""
    if name == "sgd":
        return sgd(model, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return cls(params, lr=lr, weight_decay=weight_decay, fused=True)


def sgd(model: nn.Module, *, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    """Fused SGD with its momentum buffers seeded with zeros.

    Seeding matters for skipped steps: a fused step that is skipped on its very first call leaves freshly
    allocated, uninitialised buffers behind. With zero buffers (and no dampening) the first real update,
    ``buf = momentum * 0 + grad``, is exactly the one an unseeded optimizer makes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, fused=True)
    if momentum:
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``bad`` (a one-element bool or float tensor) is true; no host sync for fused
    optimizers."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, bad.float()
        try:
            optimizer.step()
        finally:
            optimizer.found_inf = None
    elif not bool(bad):  # any other optimizer: one read of the flag
        optimizer.step()
