"""A background sampler of GPU and host utilisation, summarised per epoch.

Every ``interval`` seconds each source's ``sample()`` is read; :meth:`UtilisationMonitor.summary` returns, per
field, the mean and maximum since the previous summary (``util_<field>_mean``, ``util_<field>_max``) and resets.
Sources that fail to start are named once in ``notes`` and skipped; a source that raises while sampling is dropped
with a note. The monitor never raises into training.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable, Iterable, Protocol


class Source(Protocol):
    name: str

    def sample(self) -> dict[str, float]: ...


def default_sources() -> tuple[list[Source], list[str]]:
    """NVML (where a GPU is present) and psutil; returns (sources, notes on what is unavailable)."""
    from dynbatch.monitor.sources import NvmlSource, PsutilSource

    sources, notes = [], []
    for factory in (NvmlSource, PsutilSource):
        try:
            sources.append(factory())
        except Exception as e:
            notes.append(f"{factory.name}: {e}")
    return sources, notes


def summarise(samples: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean and max per field over a list of sample dicts (fields missing from some samples are averaged over
    the samples that have them)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        for k, v in s.items():
            acc[k].append(float(v))
    out = {}
    for k, vs in sorted(acc.items()):
        out[f"util_{k}_mean"] = sum(vs) / len(vs)
        out[f"util_{k}_max"] = max(vs)
    return out


class UtilisationMonitor:
    def __init__(self, interval: float = 0.5, sources: list[Source] | None = None,
                 on_note: Callable[[str], None] | None = None):
        if sources is None:
            sources, notes = default_sources()
        else:
            notes = []
        self.interval = interval
        self.sources = list(sources)
        self.notes = notes
        self._on_note = on_note
        for n in notes:
            self._note(n)
        self._samples: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _note(self, msg: str) -> None:
        if self._on_note:
            self._on_note(msg)

    def sample_once(self) -> None:
        row: dict[str, float] = {}
        for src in list(self.sources):
            try:
                row.update(src.sample())
            except Exception as e:
                self.sources.remove(src)
                self.notes.append(f"{src.name}: stopped sampling ({type(e).__name__}: {e})")
                self._note(self.notes[-1])
        if row:
            with self._lock:
                self._samples.append(row)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_once()

    def start(self) -> "UtilisationMonitor":
        if self.sources and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dynbatch-utilisation", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 1)
            self._thread = None

    def summary(self) -> dict[str, float]:
        """Summary since the last call; ``util_samples`` says how many samples it rests on."""
        with self._lock:
            samples, self._samples = self._samples, []
        if not samples:
            self.sample_once()  # short epochs still get one reading
            with self._lock:
                samples, self._samples = self._samples, []
        return {"util_samples": len(samples), **summarise(samples)}

    def epoch_summary(self, dist) -> dict[str, float]:
        """:meth:`summary` of every rank (``dist``: ``dynbatch.distributed.Dist``): rank 0's fields as they are,
        rank r's as ``util_rank<r>_*``. A collective under DDP."""
        per_rank = dist.gather_objects(self.summary())
        out = dict(per_rank[0])
        for r, summary in enumerate(per_rank[1:], start=1):
            out.update({k.replace("util_", f"util_rank{r}_", 1): v for k, v in summary.items()})
        return out
