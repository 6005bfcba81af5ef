"""The reproduction tables' verdict rules (bench/reproduce.py), on synthetic runs: each boundary of the stated rule
and the convergence claim's handling of runs that never reach the level."""
import json

import pytest

from dynbatch_bench.reproduce import convergence, epochs_to, interval_verdict, time_to, time_verdict, verdict
from dynbatch_bench.verdicts import Changes


@pytest.mark.parametrize("lo, hi, published_gain, expected", [
    (2.0, 40.0, 60.0, "reproduced"),    # above 0 and reaching half the published gain (30)
    (2.0, 20.0, 60.0, "refuted"),       # a real gain, but wholly below half the published one
    (-1.0, 2.4, 66.9, "refuted"),       # the 100-sample row's shape
    (-1.0, 35.0, 60.0, "inconclusive"),  # crosses 0 and reaches half the gain
    (0.0, 35.0, 60.0, "inconclusive"),  # touching 0 is not above it
])
def test_accuracy_verdict_boundaries(lo, hi, published_gain, expected):
    assert verdict(lo, hi, published_gain) == expected


@pytest.mark.parametrize("lo, hi, expected", [
    (-2.9, 0.5, "reproduced"),     # split min: inside "equal or slightly worse", [-5, +1]
    (0.6, 2.7, "inconclusive"),    # split max: crosses the band's upper edge
    (1.2, 3.0, "refuted"),         # wholly above it
    (-7.0, -5.5, "refuted"),       # wholly below it
    (-5.0, 1.0, "reproduced"),     # the band's own edges count as inside
])
def test_band_verdict_boundaries(lo, hi, expected):
    assert interval_verdict(lo, hi, -5.0, 1.0) == expected


def fake_run(tmp_path, name, accs, every=4):
    """A run folder whose epoch rows carry test accuracy every ``every`` epochs (the rest None, as --eval-every)."""
    run = tmp_path / name
    run.mkdir()
    rows = [{"kind": "epoch", "epoch": ep, "test_acc": accs[ep] if (ep + 1) % every == 0 else None}
            for ep in range(len(accs))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def step_curve(reach_epoch, epochs=40, top=0.6):
    """Accuracy at 0.1 until ``reach_epoch`` (1-based), ``top`` from then on."""
    return [top if ep + 1 >= reach_epoch else 0.1 for ep in range(epochs)]


def test_epochs_to_counts_only_evaluated_epochs(tmp_path):
    run = fake_run(tmp_path, "r", step_curve(10))
    assert epochs_to(run, 0.6) == 12  # reached at epoch 10, first evaluated at 12 (every 4)
    assert epochs_to(run, 0.1) == 4
    assert epochs_to(run, 0.61) is None


def test_convergence_reproduced_when_edba_is_faster_on_every_seed(tmp_path):
    base = [fake_run(tmp_path, f"b-s{s}", step_curve(r)) for s, r in enumerate((30, 31, 33))]
    edba = [fake_run(tmp_path, f"e-s{s}", step_curve(10 + s)) for s in range(3)]
    finding, claim = convergence(base, edba, 40, Changes())
    assert claim == "reproduced"
    assert "baseline 32, 32, 36" in finding and "EDBA 12, 12, 12" in finding


def test_convergence_counts_a_run_that_never_gets_there_as_a_lower_bound(tmp_path):
    base = [fake_run(tmp_path, f"b-s{s}", step_curve(20)) for s in range(3)]
    edba = [fake_run(tmp_path, f"e-s{s}", step_curve(20, top=0.4)) for s in range(3)]  # never reaches 95 % of 0.6
    finding, claim = convergence(base, edba, 40, Changes())
    assert claim == "refuted"
    assert "EDBA >40, >40, >40" in finding


def test_convergence_inconclusive_when_seeds_disagree(tmp_path):
    base = [fake_run(tmp_path, f"b-s{s}", step_curve(r)) for s, r in enumerate((12, 28, 20))]
    edba = [fake_run(tmp_path, f"e-s{s}", step_curve(r)) for s, r in enumerate((28, 12, 20))]
    assert convergence(base, edba, 40, Changes())[1] == "inconclusive"


@pytest.mark.parametrize("times, base, expected", [
    ([50.0, 55.0, 52.0], [80.0, 84.0, 79.0], "faster"),
    ([90.0, 95.0, 92.0], [80.0, 84.0, 79.0], "slower"),
    ([70.0, 95.0, 82.0], [80.0, 84.0, 79.0], "inconclusive"),
    ([50.0, None, 52.0], [80.0, 84.0, 79.0], "slower"),  # a seed that never gets there
])
def test_fast_recipe_time_verdict(times, base, expected):
    assert time_verdict(dict(enumerate(times)), dict(enumerate(base)))[1] == expected


def test_time_to_sums_the_epochs_own_seconds(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    rows = [{"kind": "epoch", "epoch": ep, "epoch_s": 10.0 + ep, "test_acc": acc}
            for ep, acc in enumerate([0.5, 0.7, 0.8])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert time_to(run, 0.7) == 21.0 and time_to(run, 0.9) is None
