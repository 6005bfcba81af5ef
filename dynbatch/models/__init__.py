"""CIFAR models by name, and the one accessor for a model's final linear layer."""
from __future__ import annotations

from functools import partial

from torch import nn

from dynbatch.errors import UserError
from dynbatch.models.alexnet import AlexNetCifar, TorchvisionAlexNet
from dynbatch.models.preresnet import PreResNet
from dynbatch.models.resnet import ResNet18
from dynbatch.models.vgg import VGG16BN

MODELS = {
    "preresnet20": partial(PreResNet, 20),
    "preresnet56": partial(PreResNet, 56),
    "preresnet110": partial(PreResNet, 110),
    "preresnet20_gn": partial(PreResNet, 20, norm="gn"),
    "preresnet56_gn": partial(PreResNet, 56, norm="gn"),
    "alexnet": TorchvisionAlexNet,
    "alexnet_cifar": AlexNetCifar,
    "resnet18": ResNet18,
    "vgg16_bn": VGG16BN,
}


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """A freshly initialised model; any input size and channel count is accepted."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


def final_linear(model: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that produces the logits: the last one registered in the model.

    Every model here registers its head last; for a user's model the same rule holds unless the model names its
    head with a ``final_linear`` attribute.
    """
    head = getattr(model, "final_linear", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(
            f"{type(model).__name__} has no nn.Linear head; EDBA needs a final linear layer (or a `final_linear` attribute)"
        )
    return linears[-1]


__all__ = ["MODELS", "build_model", "final_linear"]
