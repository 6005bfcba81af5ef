"""A study's run folders as the bench scripts read and write them: where the data is, how a run is trained
(``dynbatch train --autoresume``, so every command resumes), its rows through dynbatch's one metrics reader, its
final numbers, the machine it ran on, and thinning a finished run for the repository."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def rows_of(run: Path, kind: str) -> list[dict]:
    """The run's rows of ``kind`` (none before it has started), through dynbatch's one metrics reader."""
    from dynbatch.train.run_folder import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return []
    return [r for r in read_metrics(run) if r["kind"] == kind]


def all_epochs_in(epoch_rows: list[dict], epochs: int) -> bool:
    """Whether a run's epoch rows reach its last epoch (of ``epochs``)."""
    return bool(epoch_rows) and epoch_rows[-1]["epoch"] + 1 >= epochs


def finished(run: Path, epochs: int) -> bool:
    """All epochs recorded (checkpoints are not committed, so a clone's finished runs count from their metrics)."""
    return all_epochs_in(rows_of(run, "epoch"), epochs)


def train_run(run: Path, args: list[str], *extra: str, env: dict | None = None, data: str = f"npz:{DATA}") -> int:
    """``dynbatch train`` into ``run`` on ``data`` (the shared CIFAR-10 subset by default); its exit code."""
    # --autoresume starts a new folder or continues the run in it; settings must match the folder's.
    return subprocess.run([sys.executable, "-m", "dynbatch", "train", "--no-progress", "--util-interval", "5",
                           "--data", data, "--out", str(run), "--autoresume", *args, *extra], cwd=REPO,
                          stdout=subprocess.DEVNULL, env=env).returncode


def cost_run(run: Path, args: list[str], label: str) -> list[dict]:
    """A quiet-machine cost measurement's run of ``args`` into ``run``: its epoch rows (the caller reads the last,
    the first having warmed the allocator); exits naming ``label`` when the run fails."""
    if rc := train_run(run, args):
        raise SystemExit(f"reproduce: the cost run of {label} failed (dynbatch exit {rc}); rerun --cost")
    return rows_of(run, "epoch")


def write_cost(path: Path, epochs: int, methods: dict) -> None:
    """``cost.json``: each setting's measured cost, with the machine and threads that measured it."""
    import torch

    from bench.common import machine

    path.write_text(json.dumps({"threads": torch.get_num_threads(), "cpu": machine()["cpu"], "epoch": epochs,
                                "methods": methods}, indent=1))


def checkpoint_step(run: Path) -> int:
    """The step the run's checkpoint was written at (0 before the first)."""
    import torch

    if not (run / "checkpoint.pt").is_file():
        return 0
    return int(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)["progress"]["step"])


def train_scoring(run: Path, args: list[str], score_at: tuple[int, ...], steps_per_epoch: int,
                  env: dict | None = None) -> int:
    """Train ``run``, stopping at the end of each epoch of ``score_at`` (``steps_per_epoch`` steps each) to score its
    training samples there (``dynbatch score``); exact resume makes the stops leave the run unchanged."""
    for epoch in score_at:
        step = epoch * steps_per_epoch
        if (run / "scores" / f"step-{step}.json").is_file():
            continue
        now = checkpoint_step(run)
        if now > step:  # resumed past it (a checkpoint written later): that score cannot be made any more
            print(f"  {run.name}: past epoch {epoch} already; its scores are missing", flush=True)
            continue
        if now < step:
            rc = train_run(run, args, "--stop-after-steps", str(step - now), env=env)
            if rc or checkpoint_step(run) != step:
                return rc or 1
        rc = subprocess.run([sys.executable, "-m", "dynbatch", "score", str(run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL).returncode
        if rc:
            return rc
    return train_run(run, args, env=env)


def aurocs(run: Path, epochs, steps_per_epoch: int) -> dict[tuple[int, str], float]:
    """The AUROCs ``dynbatch score`` wrote for ``run`` at the ends of ``epochs``: (epoch, score) -> value."""
    found = {}
    for epoch in epochs:
        f = run / "scores" / f"step-{epoch * steps_per_epoch}.json"
        if f.is_file():
            for score, value in json.loads(f.read_text()).get("auroc", {}).items():
                if value is not None:
                    found[(epoch, score)] = value
    return found


def final_acc(run: Path) -> float:
    return [r for r in rows_of(run, "epoch") if r.get("test_acc") is not None][-1]["test_acc"]


def best_acc(run: Path) -> float:
    return max(r["test_acc"] for r in rows_of(run, "epoch") if r.get("test_acc") is not None)


def wall(run: Path) -> float:
    return rows_of(run, "epoch")[-1]["wall_s"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def seed_of(run: Path) -> int:
    """The seed in a run folder's name, ``<name>-s<seed>``."""
    name, sep, seed = run.name.rpartition("-s")
    if not sep or not seed.isdigit():
        raise ValueError(f"{run.name!r} does not end in -s<seed>")
    return int(seed)


def by_seed(runs, value) -> dict:
    """``value(run)`` of each run, keyed by its seed (the key a study's arms are paired on)."""
    return {seed_of(run): value(run) for run in runs}


def machine_of(run: Path) -> str:
    """The CPU model (or GPU) named in the run's ``config.json``; "unknown" where it was not recorded (runs before
    the CPU model was recorded name only the architecture, e.g. "x86_64")."""
    try:
        return str(json.loads((run / "config.json").read_text())["device"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def thin(run: Path, every: int = 20) -> None:
    """Keep a finished run light for the repository: the evaluated epoch rows and every ``every``-th epoch and
    step row (its command regenerates the rest). Done once; the checkpoint (not committed) no longer matches the
    file and is removed."""
    from dynbatch.errors import UserError
    from dynbatch.train.run_folder import lock_run, unlock_run

    try:
        fd = lock_run(run)  # a run still writing its last files is left alone
    except UserError:
        return
    try:
        _thin(run, every)
    finally:
        unlock_run(fd)


def _thin(run: Path, every: int) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    def keep(row: dict) -> bool:
        if row["kind"] == "epoch":
            return row.get("test_acc") is not None or row["epoch"] % every == 0
        return row["step"] % every == 0

    kept = [line for line in lines if keep(json.loads(line))]
    if len(kept) < len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(kept) + "\n")
        tmp.replace(path)
        (run / "checkpoint.pt").unlink(missing_ok=True)
