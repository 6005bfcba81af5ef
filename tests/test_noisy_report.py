"""The noisy-label study's stated rules (bench/noisy_report.py) at their boundaries, and its tables on synthetic
run folders: the filtering difference weights epochs by the samples trained on, and the cost table reads
``cost.json`` as ``reproduce.py noisy --cost`` writes it."""
import json
from collections import Counter

import pytest

from dynbatch_bench.noisy_report import (Run, accuracy_lines, accuracy_verdict, comparisons, cost_lines,
                                         extend_lines, figure, filtering_lines, filtering_verdict, judged, to_extend)
from dynbatch_bench.verdicts import Changes


@pytest.mark.parametrize("lo, hi, expected", [
    (-0.05, -0.01, "filters"),
    (-0.05, 0.0, "inconclusive"),       # touching 0 is not entirely below it
    (0.0, 0.03, "does not filter"),
    (-0.01, 0.02, "inconclusive"),
])
def test_filtering_rule(lo, hi, expected):
    assert filtering_verdict(lo, hi) == expected


@pytest.mark.parametrize("lo, hi, expected", [
    (0.02, 0.05, "gain"),               # at +2 points counts
    (0.019, 0.05, "inconclusive"),      # straddles +2
    (-0.03, -0.001, "loss"),
    (-0.03, 0.0, "no gain"),            # reaches 0, below +2
    (0.005, 0.019, "no gain"),
])
def test_accuracy_rule(lo, hi, expected):
    assert accuracy_verdict(lo, hi) == expected


def write_run(folder, epochs, seed=0):
    """A run folder holding ``epochs`` as its epoch rows, read back as the report reads it (as seed ``seed``)."""
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"kind": "epoch", **r}) + "\n" for r in epochs))
    return Run.read(folder, seed)


def test_filtering_weights_epochs_by_samples_trained_on(tmp_path):
    run = write_run(tmp_path / "r", [
        {"epoch": 0, "trained_samples": 300, "mislabeled_trained": 0.2, "mislabeled_batch": 0.4, "test_acc": 0.3},
        {"epoch": 1, "trained_samples": 100, "mislabeled_trained": 0.6, "mislabeled_batch": 0.4, "test_acc": 0.4}])
    assert run.filtering == pytest.approx((0.2 * 300 + 0.6 * 100) / 400 - 0.4)


def test_cost_table_reads_the_measurement(tmp_path):
    assert "Not measured yet" in "\n".join(cost_lines(tmp_path))
    methods = {"fixed": {"epoch_s": 10.0, "step_s": 9.5, "selection_s": 0.0, "steps": 40},
               "small-loss": {"epoch_s": 15.0, "step_s": 14.8, "selection_s": 3.7, "steps": 40}}
    (tmp_path / "cost.json").write_text(json.dumps({"threads": 2, "cpu": "X", "epoch": 2, "methods": methods}))
    rows = [line for line in cost_lines(tmp_path) if line.startswith("| ") and "method" not in line]
    assert rows == ["| fixed | 10.0 | 1.00× | – |", "| small-loss | 15.0 | 1.50× | 25 % |"]


def test_figure_draws_the_finished_cells(tmp_path):
    rows = [{"epoch": e, "test_acc": 0.1 * e, "mislabeled_trained": 0.4, "mislabeled_batch": 0.4,
             "trained_samples": 10} for e in range(3)]
    done = {("sym40", "fixed"): [write_run(tmp_path / "a", rows)],
            ("sym40", "small-loss-control"): [write_run(tmp_path / "b", rows)],
            ("clean", "fixed"): [write_run(tmp_path / "c", rows)]}  # a row without a filtering panel
    figure(done, tmp_path)
    assert (tmp_path / "noisy.png").stat().st_size > 0


def test_accuracy_table_compares_only_cells_that_exist_and_extends_inconclusive_ones(tmp_path):
    finals = {"fixed": [0.40, 0.41, 0.42], "edba-paper": [0.30, 0.31, 0.32],  # edba-paper has no control
              "small-loss": [0.42, 0.44, 0.43], "small-loss-control": [0.43, 0.43, 0.43]}
    done = {("sym40", m): [write_run(tmp_path / f"{m}{i}", [{"epoch": 0, "test_acc": a}], seed=i)
                           for i, a in enumerate(accs)] for m, accs in finals.items()}
    planned = Counter({cell: 3 for cell in done})
    lines, extend = accuracy_lines(done, planned, comparisons(done, planned))
    rows = {line.split(" | ")[1]: line.split(" | ")[5:] for line in lines if line.startswith("| sym40")}
    assert rows["fixed"][:2] == ["–", "–"] and rows["fixed"][2:] == ["–", "– |"]
    assert rows["edba-paper"][1] == "loss" and rows["edba-paper"][2:] == ["–", "– |"]
    # paired by seed: +2, +3, +1 straddles +2; -1, +1, 0 is [-2.5, +2.5], which straddles +2 too
    assert rows["small-loss"][1] == "inconclusive" and rows["small-loss"][3] == "inconclusive |"
    assert rows["edba-paper"][0] == "-10.0 [-10.0, -10.0]"  # every seed 10 points down: no spread
    assert rows["small-loss-control"][1] == "inconclusive" and rows["small-loss-control"][2:] == ["–", "– |"]
    # the inconclusive comparisons' cells get seeds 3 and 4, and the report names them
    assert extend == {("sym40", "fixed"), ("sym40", "small-loss"), ("sym40", "small-loss-control")}
    assert "`sym40-fixed`, `sym40-small-loss`, `sym40-small-loss-control`" in "\n".join(extend_lines(extend))
    assert extend_lines(set()) == []


def test_seed_rule_stops_at_five():
    assert to_extend(Counter({("sym40", "fixed"): 5, ("sym40", "importance"): 3}),
                     ("sym40", "fixed"), ("sym40", "importance")) == {("sym40", "importance")}


def test_a_method_that_keeps_all_it_draws_gets_no_filtering_verdict_and_no_extra_seeds(tmp_path):
    def run(name, trained, batch_noise, trained_noise):
        return write_run(tmp_path / name, [{"epoch": e, "trained_samples": trained, "samples_seen": 1000 * (e + 1),
                                            "mislabeled_batch": batch_noise, "mislabeled_trained": trained_noise}
                                           for e in range(2)])
    done = {("sym40", "fixed"): [run(f"f{i}", 1000, 0.4, 0.4) for i in range(3)],
            ("sym40", "all"): [run(f"a{i}", 1000, 0.4, 0.4 + d) for i, d in enumerate((-1e-4, 1e-4, 0))],
            ("sym40", "half"): [run(f"h{i}", 500, 0.4, 0.4 + d) for i, d in enumerate((-1e-4, 1e-4, 0))]}
    lines, extend = filtering_lines(done, Counter({c: 3 for c in done}), Changes())
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| sym40")}
    assert rows["fixed"].endswith("keeps all it draws (no verdict) |")  # by the same rule, not by its name
    assert rows["all"].endswith("keeps all it draws (no verdict) |")
    assert rows["half"].endswith("inconclusive |") and extend == {("sym40", "half")}


def test_the_changed_verdicts_are_listed_old_and_new(tmp_path):
    """Arms that move together seed by seed: unpaired, the old bootstrap straddles +2 ("inconclusive"); paired,
    every seed is a point down ("loss"). A clear loss stays a loss under both, and is not listed."""
    finals = {"fixed": [0.50, 0.60, 0.70], "a": [0.49, 0.59, 0.69], "b": [0.30, 0.31, 0.32]}
    done = {("sym40", m): [write_run(tmp_path / f"{m}{i}", [{"epoch": 0, "test_acc": v}], seed=i)
                           for i, v in enumerate(vs)] for m, vs in finals.items()}
    planned = Counter({c: 3 for c in done})
    text = "\n".join(judged(comparisons(done, planned)).lines())
    assert "1 of 2 verdicts differ" in text
    assert "| sym40 a − fixed | [-14.3, +12.3] | inconclusive | [-1.0, -1.0] | paired t | loss |" in text
