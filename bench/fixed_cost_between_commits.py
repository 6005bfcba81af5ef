"""The selection's fixed cost (``select_subset`` at B = 8, N = 16 on the CPU, where the work is nil) of two
checkouts of dynbatch, interleaved in one run so that both see the same machine load.

    git worktree add /tmp/before <commit>
    python bench/fixed_cost_between_commits.py /tmp/before .

Each checkout runs in its own process, with its own native extension build (in the temporary directory);
prints each one's median and best per-call time over ``--repeats`` alternations.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
try:
    from dynbatch.ops import select_subset
except ImportError:  # before the restructure (#28)
    from dynbatch.selection.functional import select_subset
try:  # the spec, built once, from #48 on
    from dynbatch.ops import SubsetSpec
    spec = SubsetSpec(16)
    select = lambda *head, **kw: select_subset(*head, spec, **kw)
except ImportError:
    select = lambda *head, **kw: select_subset(*head, num_subsets=16, **kw)
g = torch.Generator().manual_seed(0)
logits, targets = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
features, loss = torch.randn(8, 64, generator=g).relu(), torch.tensor(1.0)
call = lambda: select(logits, targets, features, seed=1, loss=loss, loss_ema=1.1,
                             grad_ema=0.2).stats
for _ in range(500):
    call()
times = []
for _ in range(15):
    t = time.perf_counter()
    for _ in range(2000):
        call()
    times.append((time.perf_counter() - t) / 2000 * 1e6)
print(statistics.median(times), min(times))
"""


def probe(checkout: Path) -> tuple[float, float]:
    # The checkout's own kernels and C++ source under their installed names, ahead of the installed copies
    names = Path(tempfile.gettempdir()) / f"dynbatch-packages-{checkout.name}"
    names.mkdir(exist_ok=True)
    for name, folder in (("dynbatch_kernels", "kernels"), ("dynbatch_csrc", "csrc")):
        if not (names / name).exists():
            (names / name).symlink_to(checkout / folder)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(Path(tempfile.gettempdir()) / f"dynbatch-ext-{checkout.name}"),
               PYTHONPATH=os.pathsep.join([str(names), str(checkout), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PROBE, str(checkout)], env=env, capture_output=True, text=True,
                         check=True, cwd=checkout)
    median, best = out.stdout.split()[-2:]
    return float(median), float(best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name in results:
            results[name].append(probe(getattr(args, name).resolve()))
    for name, rows in results.items():
        medians = ", ".join(f"{m:.0f}" for m, _ in rows)
        print(f"{name:>6}: median per call {medians} µs; best {min(b for _, b in rows):.0f} µs")


if __name__ == "__main__":
    main()
