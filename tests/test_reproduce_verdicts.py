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


# ---- the frontier rule (bench/fast_study.py, #47) -------------------------------------------------------------------
def frontier_of(points):
    from dynbatch_bench.fast_study import Frontier

    return Frontier({seed: list(points) for seed in range(3)})


def test_the_frontier_interpolates_between_its_points_and_says_where_it_ends():
    f = frontier_of([(100.0, 0.70), (200.0, 0.78)])
    assert f.at(0, 99.0) is None  # before its first point: no verdict
    assert f.at(0, 150.0) == (pytest.approx(0.74), "on") and f.at(0, 200.0) == (0.78, "on")
    assert f.at(0, 250.0) == (0.78, "beyond") and f.at(7, 150.0) is None  # a seed it lacks


def selection_runs(tmp_path, samples, accs):
    """Runs ``m-s<seed>`` whose last epoch row holds the loader samples drawn and the final accuracy."""
    runs = []
    for seed, acc in enumerate(accs):
        run = tmp_path / f"m-s{seed}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 0, "samples_seen": samples,
                                                       "test_acc": acc}) + "\n")
        runs.append(run)
    return runs


@pytest.mark.parametrize("samples, accs, expected", [
    (150, [0.785, 0.790, 0.788], "pays"),          # above the frontier (0.74) at 150 s, past fixed-10's 0.78
    (150, [0.760, 0.770, 0.765], "inconclusive"),  # above the frontier, short of fixed-10's accuracy
    (150, [0.700, 0.710, 0.705], "costs"),         # below it
    (150, [0.700, 0.780, 0.740], "inconclusive"),  # the interval straddles 0
    (250, [0.800, 0.805, 0.810], "inconclusive"),  # beyond the last point: may cost, never pays
    (250, [0.700, 0.705, 0.710], "costs"),
    (90, [0.9, 0.9, 0.9], "no verdict"),           # before the first point
])
def test_the_frontier_verdict_boundaries(tmp_path, samples, accs, expected):
    from dynbatch_bench.fast_study import judge_on_frontier

    f = frontier_of([(100.0, 0.70), (200.0, 0.78)])
    cells = judge_on_frontier(selection_runs(tmp_path, samples, accs), 1.0, f, {s: 0.78 for s in range(3)}, 200.0)
    assert cells["verdict"].startswith(expected)
