"""Running the CLI in-process (fast) and as a real subprocess (signals, tracebacks)."""
import os
import subprocess
import sys
from pathlib import Path

from dynbatch.cli import main
from dynbatch.train.run_folder import read_metrics

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
    """The run's rows of ``kind``, through the one reader of metrics.jsonl; a damaged line fails the test."""
    lines = (Path(run) / "metrics.jsonl").read_bytes().splitlines()
    all_rows = read_metrics(Path(run))
    assert len(all_rows) == len([line for line in lines if line.strip()]), "metrics.jsonl has unparseable lines"
    return [r for r in all_rows if r["kind"] == kind]


TIMING = {"wall_s", "step_s", "epoch_s", "samples_per_s", "selection_s", "candidates_s"}


def without_timing(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("util_")} for r in rs]


def assert_one_line_error(rc: int, err: str, needle: str, code: int = 2) -> None:
    """The CLI's promise for bad input and failures: exit ``code``, one line ``dynbatch: error: <problem>; <fix>``
    on stderr containing ``needle``, no traceback."""
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynbatch: error:") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert "; " in lines[0], f"no fix offered: {lines[0]}"


def example_diff(name: str) -> list[str]:
    """Changed lines between ``examples/plain_loop.py`` and ``examples/<name>``, docstrings aside."""
    import difflib

    def code(file):
        text = (REPO / "examples" / file).read_text()
        return text[text.index('"""', 3) + 3:].splitlines()

    return [line for line in difflib.unified_diff(code("plain_loop.py"), code(name), lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]
