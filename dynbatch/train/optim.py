"""The optimizer the trainer builds, and how a step is applied only when it is finite.

Fused optimizers (``fused=True``; CPU and CUDA) accept a ``found_inf`` tensor and skip the whole update on the
device when it is non-zero, the mechanism ``torch.amp.GradScaler`` uses. The executor sets it from the step's
loss and gradient norm, so a non-finite step never reaches the weights and no host read is needed to decide.
"""
from __future__ import annotations

import torch
from torch import nn


OPTIMIZERS = ("sgd", "adam", "adamw")


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float = 1.0) -> list[dict]:
    """The trainable parameters in optimizer groups, each with its ``lr_factor`` (the executor sets a group's lr to
    the scheduled lr times it). With ``bias_lr_scale`` != 1 the BatchNorm biases form their own group, their lr
    scaled and their weight decay divided by the same factor, so that the decay per step (lr x weight decay) is
    the other parameters' (airbench's BatchNorm-bias scaler). Parameters frozen later in the run (the whitening
    layer's bias) belong to the groups too: without a gradient the optimizer skips them."""
    norm_biases = {id(m.bias) for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.bias is not None}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if bias_lr_scale == 1.0:
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay, "lr_factor": 1.0}]
    scaled = [p for p in trainable if id(p) in norm_biases]
    rest = [p for p in trainable if id(p) not in norm_biases]
    return [g for g in ({"params": scaled, "lr": lr * bias_lr_scale, "weight_decay": weight_decay / bias_lr_scale,
                         "lr_factor": bias_lr_scale},
                        {"params": rest, "lr": lr, "weight_decay": weight_decay, "lr_factor": 1.0}) if g["params"]]


def build_optimizer(name: str, model: nn.Module, *, lr: float, momentum: float, nesterov: bool,
                    weight_decay: float, bias_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """``sgd`` (momentum, Nesterov, L2 weight decay), ``adam`` (L2) or ``adamw`` (decoupled weight decay), fused,
    with torch's default betas, over :func:`param_groups`; every one honours ``found_inf`` (see
    :func:`step_unless`)."""
    groups = param_groups(model, lr, weight_decay, bias_lr_scale)
    if name == "sgd":
        return sgd(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    return cls(groups, lr=lr, weight_decay=weight_decay, fused=True)


def sgd(groups, *, lr: float, momentum: float, nesterov: bool, weight_decay: float) -> torch.optim.SGD:
    """Fused SGD over parameter ``groups`` with its momentum buffers seeded with zeros.

    Seeding matters for skipped steps: a fused step that is skipped on its very first call leaves freshly
    allocated, uninitialised buffers behind. With zero buffers (and no dampening) the first real update,
    ``buf = momentum * 0 + grad``, is exactly the one an unseeded optimizer makes.
    """
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, fused=True)
    if momentum:
        for group in opt.param_groups:
            for p in group["params"]:
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
