"""Running the CLI in-process (fast) and as a real subprocess (signals, tracebacks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from dynbatch.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def spawn(*argv, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dynbatch", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=kw.get("cwd", REPO))


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


TIMING = {"wall_s", "step_s", "epoch_s", "samples_per_s", "selection_s", "candidates_s"}


def without_timing(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("util_")} for r in rs]
