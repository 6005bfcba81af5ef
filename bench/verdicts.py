"""One verdict procedure for every study (the reproductions, the noisy-label study, the methods on the fast recipe,
the baseline question): intervals that keep their 95 % coverage at the 3–5 seeds a cell has, arms paired by seed.

Seeds share the initialisation, data order and noise draw across a study's arms, so the difference of two arms is
taken seed by seed, and the interval is Student's t on the mean of those differences (n − 1 degrees of freedom).
Where arms share fewer than two seeds it is Welch's unpaired t-interval. A one-arm quantity (a per-seed difference
the run measured itself, e.g. the mislabeled share trained on minus drawn) gets the one-sample t-interval.

The percentile bootstrap these studies used before (``percentile_bootstrap``) is kept only to list the verdicts that
changed: with 3 seeds an arm has 27 resamples and the interval is about the min–max of the resampled means, whose
coverage is about 80 %, not 95 % (``tests/test_verdicts.py`` shows both).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

LEVEL = 0.95
RULE = ("Intervals (`bench/verdicts.py`): 95 %, arms paired by seed — the difference per seed the two arms share, "
        "then Student's t on their mean (n − 1 degrees of freedom) — and Welch's unpaired t-interval where they "
        "share fewer than two seeds; a one-arm quantity per seed gets the one-sample t-interval. Every ± is a "
        "standard deviation over seeds (marked sd); intervals are written [low, high].")
TABLE_HEADER = "| comparison | mean [95 % interval] | procedure | seeds | verdict |"
TABLE_RULE = "|---|---|---|---|---|"

Arm = Mapping[int, float] | Sequence[float]  # values by seed (pairable) or a plain list (not)


# ---- Student's t, exactly (no scipy in the bench's dependencies) -------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz, 1e-14)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


@lru_cache(maxsize=4096)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` > 0 degrees of freedom, to 1e-10 (bisection on the
    exact CDF)."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-11 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


# ---- intervals ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A mean difference (or mean) and its 95 % interval, in the units the values were scaled to; ``how`` names the
    procedure, ``n`` the seeds it used (per arm for Welch, as "a/b")."""

    mean: float
    lo: float
    hi: float
    how: str
    n: str

    def side(self, bound: float) -> str:
        """Where the interval lies against ``bound``: "below", "above" or "straddles" (touching counts as
        straddling)."""
        return "below" if self.hi < bound else "above" if self.lo > bound else "straddles"

    def cell(self, digits: int = 1) -> str:
        """``+1.2 [-0.3, +2.7]``."""
        return f"{self.mean:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"

    def bounds(self, digits: int = 1) -> str:
        return f"[{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"


def mean_interval(values: Sequence[float], scale: float = 1.0, how: str = "one-sample t") -> Interval:
    """The one-sample t-interval of the mean of ``values`` (2 or more) times ``scale``."""
    xs = [scale * v for v in values]
    m, n = statistics.fmean(xs), len(xs)
    half = t_quantile((1 + LEVEL) / 2, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return Interval(m, m - half, m + half, how, str(n))


def welch(a: Sequence[float], b: Sequence[float], scale: float = 1.0) -> Interval:
    """Welch's t-interval of mean(a) − mean(b) (2 or more values each) times ``scale``."""
    xa, xb = [scale * v for v in a], [scale * v for v in b]
    va, vb = statistics.variance(xa) / len(xa), statistics.variance(xb) / len(xb)
    d, se = statistics.fmean(xa) - statistics.fmean(xb), math.sqrt(va + vb)
    if se == 0:
        return Interval(d, d, d, "Welch t", f"{len(xa)}/{len(xb)}")
    df = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
    half = t_quantile((1 + LEVEL) / 2, df) * se
    return Interval(d, d - half, d + half, "Welch t", f"{len(xa)}/{len(xb)}")


def shared_seeds(a: Arm, b: Arm) -> list[int]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return sorted(set(a) & set(b))
    return []


def compare(a: Arm, b: Arm, scale: float = 1.0) -> Interval | None:
    """The interval of arm ``a`` minus arm ``b`` (values by seed, or lists) times ``scale``: paired t over the seeds
    both have when they share two or more, else Welch; None when either arm has fewer than two values."""
    seeds = shared_seeds(a, b)
    if len(seeds) >= 2:
        return mean_interval([a[s] - b[s] for s in seeds], scale, how="paired t")
    va, vb = list(a.values() if isinstance(a, Mapping) else a), list(b.values() if isinstance(b, Mapping) else b)
    if len(va) < 2 or len(vb) < 2:
        return None
    return welch(va, vb, scale)


def percentile_bootstrap(a: Sequence[float], b: Sequence[float], n: int = 10_000, seed: int = 0
                         ) -> tuple[float, float]:
    """The rule these studies used before: a 95 % percentile bootstrap of mean(a) − mean(b), the seeds of each arm
    resampled with replacement, unpaired. Kept to list what changed, and to show its coverage; never a verdict."""
    import numpy as np

    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, float), np.asarray(b, float)
    diffs = xa[rng.integers(0, len(xa), (n, len(xa)))].mean(1) - xb[rng.integers(0, len(xb), (n, len(xb)))].mean(1)
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def old_interval(a: Arm, b: Arm | None = None, scale: float = 1.0) -> tuple[float, float]:
    """The old rule's interval of ``a`` − ``b`` (unpaired), or of the mean of ``a`` when ``b`` is None, times
    ``scale``."""
    va = list(a.values() if isinstance(a, Mapping) else a)
    vb = [0.0] * len(va) if b is None else list(b.values() if isinstance(b, Mapping) else b)
    lo, hi = percentile_bootstrap(va, vb)
    return scale * lo, scale * hi


def sd_cell(values: Sequence[float], scale: float = 100.0, digits: int = 1, mark: bool = True) -> str:
    """``mean ± sd (sd)`` of ``values`` times ``scale`` (without "(sd)" where ``mark`` is off: a table whose header
    says so); the mean alone for one value, "–" for none."""
    if not values:
        return "–"
    xs = [scale * v for v in values]
    m = statistics.fmean(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs):.{digits}f}" + (" (sd)" if mark else "")


# ---- what changed --------------------------------------------------------------------------------------------------
@dataclass
class Changes:
    """The verdicts a report gives under this module's rule beside those the old percentile bootstrap gave on the
    same runs; ``lines()`` lists the ones that differ (old → new)."""

    rows: list = field(default_factory=list)  # (comparison, old interval, old verdict, new interval, how, new)

    def judge(self, what: str, new: Interval, old: tuple[float, float], rule: Callable[[float, float], str]) -> str:
        """The verdict ``rule(lo, hi)`` under the new interval, noting the old one's beside it."""
        verdict, before = rule(new.lo, new.hi), rule(*old)
        self.rows.append((what, f"[{old[0]:+.1f}, {old[1]:+.1f}]", before, new.bounds(), new.how, verdict))
        return verdict

    def lines(self, title: str = "Verdicts that changed under the paired t rule") -> list[str]:
        changed = [r for r in self.rows if r[2] != r[5]]
        head = [f"## {title}", "",
                "Every verdict above was re-derived with `bench/verdicts.py` (seeds paired, Student's t). Here the "
                "old rule (a percentile bootstrap of the unpaired difference of seed means, whose coverage is about "
                "80 % at 3 seeds: `bench/results/verdicts/coverage.md`) is applied to the same runs; "
                f"{len(changed)} of {len(self.rows)} verdicts differ.", ""]
        if not changed:
            return head
        return head + ["| comparison | old interval | old verdict | new interval | how | new verdict |",
                       "|---|---|---|---|---|---|", *(f"| {' | '.join(r)} |" for r in changed), ""]


# ---- coverage, simulated -------------------------------------------------------------------------------------------
def coverage(n: int, draws: int, method: str, shape: str = "normal", shift: float = 0.0, shared: float = 1.0,
             seed: int = 0) -> float:
    """The share of ``draws`` simulated studies with ``n`` seeds an arm whose 95 % interval of (a − b) holds the true
    difference ``shift``. The arms share a per-seed effect of sd ``shared`` (initialisation, data order, noise draw)
    and add their own noise of sd 0.5 — for ``shape="skewed"`` arm a's is exponential (minus its mean), so the
    differences are skewed. ``method``: "paired", "welch" or "bootstrap" (the old rule)."""
    import numpy as np

    rng = np.random.default_rng([seed, n, len(method), len(shape)])
    common = rng.normal(0.0, shared, (draws, n))
    own_a = 0.5 * (rng.exponential(1.0, (draws, n)) - 1.0) if shape == "skewed" else rng.normal(0.0, 0.5, (draws, n))
    a, b = common + shift + own_a, common + rng.normal(0.0, 0.5, (draws, n))
    hits = 0
    for i in range(draws):
        if method == "bootstrap":
            lo, hi = percentile_bootstrap(a[i], b[i], n=2000, seed=i)
        else:
            iv = compare(dict(enumerate(a[i])), dict(enumerate(b[i]))) if method == "paired" else welch(a[i], b[i])
            lo, hi = iv.lo, iv.hi
        hits += lo <= shift <= hi
    return hits / draws


def coverage_table(draws: int = 4000) -> list[str]:
    """Markdown: the simulated coverage of each procedure at 3, 5 and 8 seeds, for normal and skewed noise."""
    lines = [f"Coverage of the true difference by each 95 % interval ({draws:,} simulated studies a cell, true "
             "difference 2; each arm's own noise sd 0.5, arm a's exponential when skewed; `python -m bench.verdicts`). "
             "Paired t on arms that share a per-seed effect of sd 1 (as a study's arms share initialisation, data "
             "order and noise draw); Welch and the old bootstrap on independent arms, where they are meant to hold.",
             "", "| differences | seeds | paired t (the rule) | Welch t (unpaired) | percentile bootstrap (old rule) |",
             "|---|---|---|---|---|"]
    for shape in ("normal", "skewed"):
        for n in (3, 5, 8):
            cells = [coverage(n, draws, "paired", shape, 2.0)] + [coverage(n, draws, m, shape, 2.0, shared=0.0)
                                                                  for m in ("welch", "bootstrap")]
            lines.append(f"| {shape} | {n} | " + " | ".join(f"{100 * c:.1f} %" for c in cells) + " |")
    return lines


def main(argv=None) -> int:
    """``python -m bench.verdicts [--out FILE]``: the coverage table, printed and written."""
    import argparse

    ap = argparse.ArgumentParser(description="The simulated coverage of each 95 % interval procedure.")
    ap.add_argument("--draws", type=int, default=4000)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "verdicts" / "coverage.md"))
    a = ap.parse_args(argv)
    text = "\n".join(["# Do the intervals keep their coverage at 3–8 seeds?", "", *coverage_table(a.draws)]) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
