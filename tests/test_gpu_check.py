"""``dynbatch bench --gpu-check`` on a CPU: its plan fits the budget, bad data gets one line, and the check itself
(parts as subprocesses, timeouts, the report) runs without network and never stops at the first failure."""
import json
import textwrap

import pytest
import torch
from cli_helpers import REPO, assert_one_line_error, run_cli

from dynbatch import gpu_check
from dynbatch.errors import UserError


def test_full_plan_fits_the_budget_and_names_existing_tests():
    chosen = gpu_check.plan(gpu_check.BUDGET_S)
    assert [p.name for p in chosen] == [p.name for p in gpu_check.parts()]  # everything, with the full grid
    assert sum(p.planned_s for p in chosen) <= gpu_check.BUDGET_S <= 480
    for part in chosen:
        for arg in part.args:
            if arg.startswith("tests/"):
                assert (REPO / arg).is_file(), arg


def test_a_smaller_budget_trims_the_benchmark_grid_first_then_drops_parts():
    full = sum(p.planned_s for p in gpu_check.parts())
    trimmed = gpu_check.plan(full - 1)
    assert [p.name for p in trimmed] == [p.name for p in gpu_check.parts()]
    assert gpu_check.BENCH_SUITES[1] in " ".join(next(p for p in trimmed if p.name == "bench").args)
    small = gpu_check.plan(200)
    assert sum(p.planned_s for p in small) <= 200 and small[0].name == "triton" and len(small) < len(trimmed)


def test_dry_run_prints_the_plan_on_a_cpu(capsys):
    rc, out, _ = run_cli(capsys, "bench", "--gpu-check", "--dry-run", "--budget-s", "300")
    assert rc == 0 and "in all" in out and "skipped (budget)" in out
    total = int(next(line for line in out.splitlines() if "in all" in line).split()[1])
    assert total <= 300


def test_bad_budget_gets_one_line(capsys):
    rc, _, err = run_cli(capsys, "bench", "--gpu-check", "--dry-run", "--budget-s", "0")
    assert_one_line_error(rc, err, "--budget-s must be positive")


@pytest.mark.parametrize("spec, needle", [("cifar10", "instead of 'cifar10'"), ("npz:nowhere/x.npz", "no data file")])
def test_data_must_be_a_local_file(spec, needle):
    with pytest.raises(UserError, match=needle) as e:
        gpu_check.local_data(spec, REPO)
    assert "\n" not in str(e.value)


BLOCK_NETWORK = """
    import socket

    _connect = socket.socket.connect


    def _connect_locally_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError("network blocked by the test")
        return _connect(self, address)


    socket.socket.connect = _connect_locally_only
"""


def test_check_runs_every_part_without_network(tmp_path, tiny_npz, monkeypatch):
    """The check's loop with CUDA faked and three parts: one that reaches for the network (the blocker makes it
    fail, proving the blocker live in the subprocesses), one that overruns its timeout, and the real training
    part's command on a tiny npz (without --compile, which needs a GPU to be quick, on all 96 images). The first
    two must not stop the third, and the report must record all three."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(textwrap.dedent(BLOCK_NETWORK))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "no GPU (test)")
    train = next(p for p in gpu_check.parts() if p.name == "train")
    args = tuple({"5000": "96"}.get(a, a) for a in train.args if a != "--compile")  # --train-samples: all 96
    train = gpu_check.Part(train.name, train.title, args + ("--epochs", "1", "--batch-size", "32", "--util-interval",
                                                            "5"), 120)
    reach = gpu_check.Part("net", "reaches for the network",
                           ("-c", "import urllib.request; urllib.request.urlopen('http://1.1.1.1', timeout=5)"), 10)
    sleep = gpu_check.Part("sleep", "overruns", ("-c", "import time; time.sleep(60)"), 3)
    monkeypatch.setattr(gpu_check, "parts", lambda suites=None: [reach, sleep, train])
    out = tmp_path / "gpu"
    rc = gpu_check.run_check(out, f"npz:{tiny_npz}", 300, REPO)
    record = json.loads((out / "check.json").read_text())
    status = {r["part"]: r["status"] for r in record["parts"]}
    assert rc == 1 and status == {reach.title: "FAIL", sleep.title: "TIMEOUT", train.title: "PASS"}, record
    assert "network blocked by the test" in (out / "logs" / "0-net.log").read_text()
    report = (out / "report.md").read_text()
    assert "| TIMEOUT |" in report and "Compiled training: test accuracy" in report


@pytest.mark.slow
def test_the_selection_part_measures_its_three_runs_on_a_cpu(tmp_path, tiny_npz):
    from dynbatch_bench import selection_gpu

    out = tmp_path / "selection.md"
    assert selection_gpu.main(["--data", f"npz:{tiny_npz}", "--out", str(out), "--extra", "--train-samples", "96",
                               "--batch-size", "8", "--model", "airbench-proxy", "--amp", "none"]) == 0
    text = out.read_text()
    assert "| fixed | steps |" in text and "| proxy | learning batches |" in text and "| infobatch | steps |" in text
    assert "nan" not in text
