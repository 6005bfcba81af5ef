"""The noisy-label study's stated rules (bench/noisy_report.py) at their boundaries, and its tables on synthetic
run folders: the filtering difference weights epochs by the samples trained on, and the cost table reads
``cost.json`` as ``reproduce.py noisy --cost`` writes it."""
import json

import pytest

from dynbatch_bench.noisy_report import _filtering, accuracy_verdict, cost_lines, figure, filtering_verdict


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


def write_run(folder, epochs):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"kind": "epoch", **r}) + "\n" for r in epochs))
    return folder


def test_filtering_weights_epochs_by_samples_trained_on(tmp_path):
    run = write_run(tmp_path / "r", [
        {"epoch": 0, "trained_samples": 300, "mislabeled_trained": 0.2, "mislabeled_batch": 0.4, "test_acc": 0.3},
        {"epoch": 1, "trained_samples": 100, "mislabeled_trained": 0.6, "mislabeled_batch": 0.4, "test_acc": 0.4}])
    assert _filtering(run) == pytest.approx((0.2 * 300 + 0.6 * 100) / 400 - 0.4)


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
    done = {("sym40", "fixed"): [(write_run(tmp_path / "a", rows), {})],
            ("sym40", "small-loss-control"): [(write_run(tmp_path / "b", rows), {})]}
    figure(done, tmp_path)
    assert (tmp_path / "noisy.png").stat().st_size > 0
