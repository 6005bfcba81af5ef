"""The one verdict procedure (``bench/verdicts.py``): Student's t exactly, arms paired by seed, Welch where they are
not, and the coverage that makes its 95 % mean 95 % at the 3–5 seeds a study has — where the old percentile
bootstrap falls short."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import verdicts  # noqa: E402
from bench.verdicts import Changes, Interval, compare, coverage, mean_interval, t_quantile, welch  # noqa: E402

# scipy.stats.t.ppf at 0.975 and 0.9 (scipy 1.17), non-integer degrees of freedom included (Welch's).
SCIPY_T = {1: (12.706204736174694, 3.0776835371752544), 2: (4.302652729749462, 1.8856180831641272),
           2.5: (3.5746548420036817, 1.7302509288071766), 4: (2.7764451051977934, 1.533206274058944),
           7: (2.364624251592784, 1.4149239276505086), 12.3: (2.172933481758962, 1.3542946376388478),
           30: (2.0422724563012378, 1.3104150253913955), 200: (1.9718962236339088, 1.2857987939948012)}


@pytest.mark.parametrize("df", SCIPY_T)
def test_t_quantiles_match_scipy(df):
    q975, q90 = SCIPY_T[df]
    assert t_quantile(0.975, df) == pytest.approx(q975, rel=1e-9)
    assert t_quantile(0.9, df) == pytest.approx(q90, rel=1e-9)


def test_a_paired_interval_by_hand():
    """Differences 1, 2, 3 by seed: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3)."""
    iv = compare({0: 11.0, 1: 12.0, 2: 13.0, 7: 99.0}, {0: 10.0, 1: 10.0, 2: 10.0, 5: 0.0})
    half = 4.302652729749462 / math.sqrt(3)
    assert iv.how == "paired t" and iv.n == "3"  # the seeds both arms have; 7 and 5 have no partner
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert iv.side(0.0) == "straddles" and iv.side(-1.0) == "above" and iv.side(5.0) == "below"
    assert iv.cell() == "+2.0 [-0.5, +4.5]"


def test_pairing_removes_what_the_seeds_share():
    """Arms that move together seed by seed: the unpaired interval straddles 0, the paired one does not."""
    a, b = {0: 50.0, 1: 60.0, 2: 70.0}, {0: 49.0, 1: 59.2, 2: 68.9}
    assert compare(a, b).side(0.0) == "above"
    assert compare(list(a.values()), list(b.values())).side(0.0) == "straddles"
    assert compare(list(a.values()), list(b.values())).how == "Welch t"


def test_welch_where_seeds_are_not_shared_and_nothing_below_two_values():
    iv = compare({0: 1.0, 1: 2.0, 2: 3.0}, {5: 0.0, 6: 1.0})
    assert iv.how == "Welch t" and iv.n == "3/2" and iv.mean == pytest.approx(1.5)
    assert compare({0: 1.0}, {0: 0.0, 1: 2.0}) is None
    assert welch([1.0, 1.0], [0.0, 0.0]) == Interval(1.0, 1.0, 1.0, "Welch t", "2/2")  # no spread: a point


def test_scale_and_the_one_sample_interval():
    iv = mean_interval([0.01, 0.02, 0.03], scale=100)
    assert iv.mean == pytest.approx(2.0) and iv.hi - iv.lo == pytest.approx(2 * 4.302652729749462 / math.sqrt(3))


@pytest.mark.parametrize("n", [3, 5, 8])
@pytest.mark.parametrize("shift", [0.0, 2.0])  # A/A and a known shift
def test_the_paired_interval_covers_95_percent_at_few_seeds(n, shift):
    assert 0.93 <= coverage(n, 2000, "paired", "normal", shift) <= 0.97


@pytest.mark.parametrize("n", [3, 5, 8])
def test_welch_covers_95_percent_on_independent_arms(n):
    assert 0.93 <= coverage(n, 2000, "welch", "normal", 2.0, shared=0.0) <= 0.97


def test_the_old_percentile_bootstrap_falls_short_at_three_seeds():
    """Its interval at 3 seeds is about the min–max of 27 resampled means: about 80 % coverage, not 95 %."""
    assert coverage(3, 2000, "bootstrap", "normal", 2.0, shared=0.0) < 0.90


def test_changes_list_only_the_verdicts_that_differ():
    changes = Changes()
    rule = lambda lo, hi: "loss" if hi < 0 else "no loss"  # noqa: E731
    assert changes.judge("a − b", Interval(-1.0, -2.0, 0.5, "paired t", "3"), (-1.5, -0.2), rule) == "no loss"
    assert changes.judge("c − d", Interval(-1.0, -2.0, -0.5, "paired t", "3"), (-1.5, -0.6), rule) == "loss"
    text = "\n".join(changes.lines())
    assert "1 of 2 verdicts differ" in text and "| a − b | [-1.5, -0.2] | loss | [-2.0, +0.5] | paired t | no loss |" \
        in text and "c − d" not in text


def test_the_sd_cell_says_it_is_an_sd():
    assert verdicts.sd_cell([0.5, 0.7]) == "60.0 ± 14.1 (sd)" and verdicts.sd_cell([]) == "–"
