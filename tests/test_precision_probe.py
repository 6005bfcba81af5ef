"""``--amp auto`` picks what is faster for the model at hand: the probe's choice, its cache, its record in
config.json, and a resumed run keeping its own choice. The CPUs this runs on may lack native bf16; where the tests
need a bf16-native machine they say so to the resolver (``bf16_is_native``) and time with a scripted clock."""
import json

import pytest
import torch
from torch import nn

from dynbatch.train import precision
from dynbatch.train.config import TrainConfig
from dynbatch.train.trainer import Trainer


class ScriptedClock:
    """A ``timer`` whose steps last ``fp32_s`` or ``bf16_s``: the probe reads it at each step's start and end, and
    its steps alternate fp32, bf16 (warm-up included)."""

    def __init__(self, fp32_s: float, bf16_s: float):
        self.now, self.fp32_s, self.bf16_s, self.calls = 0.0, fp32_s, bf16_s, 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 0:  # the end of step calls // 2 - 1
            self.now += self.bf16_s if (self.calls // 2 - 1) % 2 else self.fp32_s
        return self.now


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4 * 6 * 6, 5))


def test_choose_bf16_needs_a_win_beyond_noise():
    assert precision.choose_bf16([1.0, 1.0, 1.0], [0.5, 0.6, 0.5])
    assert not precision.choose_bf16([1.0, 1.0, 1.0], [0.97, 0.97, 0.97])  # within noise: fp32
    assert not precision.choose_bf16([1.0, 1.0, 1.0], [1.9, 1.8, 1.9])  # the digits MLP's case


@pytest.mark.parametrize("fp32_s, bf16_s, want", [(0.010, 0.004, True), (0.010, 0.019, False)])
def test_probe_picks_the_faster_and_leaves_no_trace(fp32_s, bf16_s, want):
    """Scripted step times decide; weights, gradients, BatchNorm statistics and the RNG come out as they went in."""
    model = small_model().train()
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    clock = ScriptedClock(fp32_s, bf16_s)
    verdict = precision.probe(model, x, y, "cpu", timer=clock)
    assert verdict["bf16"] is want
    assert verdict["steps"] >= 3 and clock.calls == 2 * (2 + 2 * verdict["steps"])
    assert verdict["fp32_ms"] == pytest.approx(1e3 * fp32_s) and verdict["bf16_ms"] == pytest.approx(1e3 * bf16_s)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_choice_is_cached_per_model_and_batch_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNBATCH_CACHE_DIR", str(tmp_path / "cache"))
    probes = []
    monkeypatch.setattr(precision, "probe", lambda *a, **k: probes.append(1) or
                        {"fp32_ms": 2.0, "bf16_ms": 1.0, "steps": 3, "bf16": True})
    model, dev = small_model(), torch.device("cpu")
    start = precision.Precision("cpu", True, False)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    first = precision.choose_amp(start, model, x, y, "small", dev)
    again = precision.choose_amp(start, model, x, y, "small", dev)
    other = precision.choose_amp(start, model, x[:4], y[:4], "small", dev)  # another batch shape: its own probe
    assert first.bf16 and again.bf16 and other.bf16 and len(probes) == 2
    assert first.decided_by["cached"] is False and again.decided_by["cached"] is True
    assert len(json.loads((tmp_path / "cache" / "precision.json").read_text())) == 2


def test_a_damaged_or_unwritable_cache_costs_only_a_probe(tmp_path, monkeypatch):
    cache = tmp_path / "precision.json"
    cache.write_text("{not json")
    monkeypatch.setenv("DYNBATCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32_ms": 1.0, "bf16_ms": 2.0, "steps": 3,
                                                             "bf16": False})
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    got = precision.choose_amp(precision.Precision("cpu", True, False), small_model(), x, y, "m", torch.device("cpu"))
    assert not got.bf16 and json.loads(cache.read_text())  # rewritten whole
    monkeypatch.setenv("DYNBATCH_CACHE_DIR", str(cache / "not-a-folder"))
    got = precision.choose_amp(precision.Precision("cpu", True, False), small_model(), x, y, "m", torch.device("cpu"))
    assert not got.bf16


def test_without_native_bf16_auto_is_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("no probe where bf16 is emulated"))
    p = precision.resolve("auto", "auto", torch.device("cpu"), small_model())
    assert not p.bf16 and p.decided_by["why"].startswith("bf16 is not native")
    assert precision.resolve("bf16", "off", torch.device("cpu"), small_model()).bf16  # an explicit choice stays


def test_run_records_the_probe_and_resume_keeps_the_choice(tmp_path, monkeypatch):
    """On a (declared) bf16-native CPU the probe decides, config.json records it, and a resume neither probes
    again nor changes the arithmetic, even after the cached verdict changed."""
    monkeypatch.setenv("DYNBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(precision, "probe", lambda *a, **k: {"fp32_ms": 3.0, "bf16_ms": 5.0, "steps": 3,
                                                             "bf16": False})
    cfg = TrainConfig(data="digits", model="dynbatch_bench.minimal_loops:tiny_mlp", train_samples=64, batch_size=32,
                      epochs=2, progress=False, util_interval=5.0, stop_after_steps=2)
    Trainer.new(cfg, tmp_path / "run", log=lambda m: None).run()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["amp_bf16"] is False and saved["amp_decided_by"]["probe"]["bf16_ms"] == 5.0
    (tmp_path / "cache" / "precision.json").write_text(json.dumps({}))
    monkeypatch.setattr(precision, "probe", lambda *a, **k: pytest.fail("a resumed run keeps its recorded choice"))
    t = Trainer.resume(tmp_path / "run", log=lambda m: None)
    assert t.precision.bf16 is False and "recorded" in t.precision.decided_by
