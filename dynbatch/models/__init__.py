"""CIFAR models by name, and the one accessor for a model's final linear layer."""
from __future__ import annotations

from functools import partial

from torch import nn

from dynbatch.errors import UserError
from dynbatch.models.airbench import AirbenchNet
from dynbatch.models.alexnet import AlexNetCifar, TorchvisionAlexNet
from dynbatch.models.gpt import gpt
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
    "airbench": AirbenchNet,
    "airbench-proxy": partial(AirbenchNet, widths=(32, 64, 64)),
    "airbench-proxy-wide": partial(AirbenchNet, widths=(64, 128, 128)),
    "gpt": gpt,  # text data: sizes from the run's --context, --gpt-layers, --gpt-width, --gpt-heads
}
SIZED = ("gpt",)  # models that take sizes beside num_classes and in_channels


def build_model(name: str, num_classes: int, in_channels: int = 3, **sizes) -> nn.Module:
    """A freshly initialised model: one of ``MODELS``, or ``package.module:factory`` for a model of your own (a
    callable taking ``num_classes`` and ``in_channels`` and returning an ``nn.Module``). ``sizes``: the keywords
    of a model in ``SIZED`` (``gpt``: context, layers, width, heads)."""
    if ":" in name:
        return _user_model(name, num_classes, in_channels)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or give package.module:factory")
    try:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels, **(sizes if name in SIZED else {}))
    except ValueError as e:
        raise UserError(f"--model {name}: {e}") from None


def _user_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # the console script does not put the working folder on the path; python -m does
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UserError(f"--model {spec}: cannot import {module_name} ({type(e).__name__}: {e}); make it importable "
                        "from the working folder or PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"--model {spec}: {module_name} has no callable {attr!r}; give module:factory") from None
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    except Exception as e:
        raise UserError(f"--model {spec}: the factory raised {type(e).__name__}: {e}; it must accept num_classes= and "
                        "in_channels=") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec}: the factory returned {type(model).__name__}, not an nn.Module; return the "
                        "model")
    return model


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
