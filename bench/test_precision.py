"""Suite 5 (precision): a training step (forward, backward, SGD) in each arithmetic and layout ``--amp`` and
``--channels-last`` can choose, as the trainer resolves them (``dynbatch.train.precision``): PreResNet-20 at batch
100 (where bf16 pays on a bf16-native CPU) and the overhead suite's tiny MLP on digit-sized inputs at batch 32 (where
autocast's casts cost more than bf16 saves). The report divides each by ``--amp none --channels-last off`` (fp32,
contiguous) of the same model in the same run and names what the defaults (``auto``/``auto``) chose here: where bf16
is native, ``auto`` is decided by the trainer's probe on this very batch; ``probe`` rows time the probe itself, which
also runs where bf16 is emulated, to show it choosing fp32 there."""
import pytest
import torch
import torch.nn.functional as F

from .common import DEVICE, run
from .minimal_loops import tiny_mlp
from dynbatch.models import build_model
from dynbatch.train import precision

SETTINGS = {"fp32_contiguous": ("none", "off"), "fp32_channels_last": ("none", "on"), "default": ("auto", "auto"),
            "bf16_channels_last": ("bf16", "on")}
MODELS = {  # name: (factory, batch, input shape), the settings timed for it
    "preresnet20": (lambda: build_model("preresnet20", 10), 100, (3, 32, 32), list(SETTINGS)),
    "digits_mlp": (lambda: tiny_mlp(10, 1), 32, (1, 8, 8), ["fp32_contiguous", "default"]),
}
CASES = [(m, s) for m, (*_, settings) in MODELS.items() for s in settings]


def _setup(model_name: str, setting: str):
    torch.manual_seed(0)
    factory, batch, shape, _ = MODELS[model_name]
    model = factory().to(DEVICE)
    p = precision.resolve(*SETTINGS[setting], DEVICE, model)
    if p.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape, device=DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if p.channels_last else x
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    if setting == "default" and precision.bf16_is_native(DEVICE):  # as the trainer: the probe decides (uncached)
        p = precision.Precision(p.device_type, precision.probe(model, x, y, DEVICE.type)["bf16"], p.channels_last)
    return model, p, x, y


@pytest.mark.parametrize("model_name, setting", CASES)
def test_precision(benchmark, model_name, setting):
    model, p, x, y = _setup(model_name, setting)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)

    def step():
        with p.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    run(benchmark, step, budget_s=4.0, suite="precision", impl=setting, model=model_name, resolved=p.name,
        native_bf16=precision.bf16_is_native(DEVICE))


@pytest.mark.parametrize("model_name", list(MODELS))
def test_probe(benchmark, model_name):
    """The probe's verdict on this machine (whether or not ``auto`` would ask it here) and its cost: one call."""
    model, p, x, y = _setup(model_name, "fp32_contiguous")
    verdicts = []
    benchmark.pedantic(lambda: verdicts.append(precision.probe(model, x, y, DEVICE.type)), rounds=1, iterations=1)
    benchmark.extra_info.update(suite="precision", impl="probe", model=model_name, verdict=verdicts[-1],
                                native_bf16=precision.bf16_is_native(DEVICE))
