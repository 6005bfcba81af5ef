import pytest
import torch

from dynbatch.monitor import UtilisationMonitor, default_sources, summarise
from dynbatch.monitor.sources import NvmlSource


class FakeGpu:
    name = "fake"

    def __init__(self, values):
        self.values = list(values)

    def sample(self):
        return {"gpu0_util": self.values.pop(0), "gpu0_mem_mb": 100.0}


class Broken:
    name = "broken"

    def sample(self):
        raise OSError("device lost")


def test_summarise_mean_and_max():
    s = summarise([{"a": 1.0, "b": 4.0}, {"a": 3.0}, {"a": 5.0, "b": 2.0}])
    assert s == {"util_a_mean": 3.0, "util_a_max": 5.0, "util_b_mean": 3.0, "util_b_max": 4.0}


def test_monitor_summary_resets_and_survives_broken_sources():
    notes = []
    mon = UtilisationMonitor(sources=[FakeGpu([10, 30, 50, 70]), Broken()], on_note=notes.append)
    mon.sample_once()
    mon.sample_once()
    s = mon.summary()
    assert s["util_samples"] == 2 and s["util_gpu0_util_mean"] == 20 and s["util_gpu0_util_max"] == 30
    assert any("device lost" in n for n in notes) and len(mon.sources) == 1
    mon.sample_once()
    assert mon.summary()["util_gpu0_util_mean"] == 50  # only what came after the last summary
    assert mon.summary()["util_gpu0_util_mean"] == 70  # an empty window takes one reading itself


def test_thread_samples_in_background():
    import time

    mon = UtilisationMonitor(interval=0.01, sources=[FakeGpu(list(range(10000)))]).start()
    time.sleep(0.2)
    mon.stop()
    assert mon.summary()["util_samples"] >= 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a GPU")
def test_no_gpu_path_records_what_it_can():
    try:
        NvmlSource()
        raised = False
    except RuntimeError:
        raised = True
    sources, notes = default_sources()
    names = [s.name for s in sources]
    assert "psutil" in names
    if raised:
        assert "nvml" not in names and any(n.startswith("nvml") for n in notes)
    s = UtilisationMonitor(sources=sources).summary()
    assert s["util_samples"] == 1 and "util_cpu_percent_mean" in s and "util_ram_mb_max" in s
