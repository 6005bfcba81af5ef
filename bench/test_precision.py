"""Suite 5 (precision): a PreResNet-20 training step (batch 100, forward, backward, SGD) in each arithmetic and
layout ``--amp``/``--channels-last`` can choose, as the trainer resolves them (``dynbatch.train.precision``).
The report divides each by ``--amp none --channels-last off`` (fp32, contiguous) from the same run and names what
the defaults (``auto``/``auto``) chose on this machine."""
import pytest
import torch
import torch.nn.functional as F

from .common import DEVICE, run
from dynbatch.models import build_model
from dynbatch.train import precision

SETTINGS = {"fp32_contiguous": ("none", "off"), "fp32_channels_last": ("none", "on"), "default": ("auto", "auto"),
            "bf16_channels_last": ("bf16", "on")}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_precision(benchmark, name):
    torch.manual_seed(0)
    model = build_model("preresnet20", 10).to(DEVICE)
    p = precision.resolve(*SETTINGS[name], DEVICE, model)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    x = torch.randn(100, 3, 32, 32, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if p.channels_last else x
    y = torch.randint(0, 10, (100,), device=DEVICE)

    def step():
        with p.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    run(benchmark, step, budget_s=4.0, suite="precision", impl=name, resolved=p.name,
        native_bf16=precision.cpu_has_native_bf16() if DEVICE.type == "cpu" else True)
