"""How the code is shaped, measured: the files one EDBA training step runs through, the files from the CLI to the CPU
kernel, the places that spell the selection op's contract, the largest signatures, private names called across
``dynbatch/train/``, import circles in ``bench/``, the longest functions, and the loop module's length.

    python bench/structure.py [REPO]      # REPO: a checkout (default: this one); run it from any folder

The step is traced (``sys.setprofile``) from ``Trainer._train_step`` of an EDBA run on the digits (tiny MLP, 4096
subsets), after two warm-up steps; the native kernel counts as ``csrc/dynbatch_native.cpp`` when the CPU selection
ran it. The CLI-to-kernel chain runs ``dynbatch train`` in-process (three steps) and counts every file of the
package entered by a call with EDBA's selection on the stack, with the files on the stack above it (the CLI and
the loop), and the C++ file. A "spelling" of the selection contract is defined in :func:`contract_spellings`.
"""
from __future__ import annotations

import ast
import re
import sys
import tempfile
from pathlib import Path


def step_files(repo: Path) -> list[str]:
    sys.path.insert(0, str(repo))
    from dynbatch.train.config import TrainConfig
    from dynbatch.train.trainer import Trainer

    cfg = TrainConfig(data="digits", model="dynbatch_bench.minimal_loops:tiny_mlp", policy="edba", batch_size=32,
                      augment=False, amp="none", channels_last="off", epochs=1, progress=False, util_interval=60.0,
                      policy_options={"subsets": 4096})
    with tempfile.TemporaryDirectory() as out:
        t = Trainer.new(cfg, Path(out) / "run", log=lambda m: None)
        for _ in range(2):
            t._train_step()
        seen: set[str] = set()

        def profile(frame, event, arg):
            if event == "call":
                seen.add(frame.f_code.co_filename)

        sys.setprofile(profile)
        try:
            t._train_step()
        finally:
            sys.setprofile(None)
    roots = {str(Path(m.__file__).resolve().parent): name for name, m in _packages().items()}
    files = sorted({f"{roots[r]}/{Path(f).resolve().relative_to(r)}" for f in seen for r in roots
                    if str(Path(f).resolve()).startswith(r + "/")})
    if _native_ran():
        files.append("csrc/dynbatch_native.cpp")
    return files


def _packages() -> dict:
    import dynbatch
    import dynbatch_kernels

    return {"dynbatch": dynbatch, "kernels": dynbatch_kernels}


def _native_ran() -> bool:
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("dynbatch::select_subset", "CPU") or \
        "dynbatch_native" in sys.modules


def chain_files(repo: Path) -> list[str]:
    """Files from ``dynbatch train`` to the CPU kernel of EDBA's selection (see the module's docstring)."""
    sys.path.insert(0, str(repo))
    from dynbatch import cli

    roots = {str(Path(m.__file__).resolve().parent): name for name, m in _packages().items()}

    def ours(filename: str) -> str | None:
        path = str(Path(filename).resolve())
        return next((f"{name}/{Path(path).relative_to(r)}" for r, name in roots.items()
                     if path.startswith(r + "/")), None)

    seen: set[str] = set()

    def profile(frame, event, arg):
        if event != "call" or ours(frame.f_code.co_filename) is None:
            return
        stack, f, selecting = [], frame, False
        while f is not None:
            name = ours(f.f_code.co_filename)
            if name is not None:
                stack.append(name)
                selecting |= name == "dynbatch/methods/edba.py" and f.f_code.co_name == "select_from"
            f = f.f_back
        if selecting:
            seen.update(stack)

    argv = ["train", "--data", "digits", "--model", "dynbatch_bench.minimal_loops:tiny_mlp", "--policy", "edba",
            "--batch-size", "32", "--no-augment", "--amp", "none", "--channels-last", "off", "--epochs", "1",
            "--stop-after-steps", "3", "--subsets", "4096", "--util-interval", "60", "--no-progress"]
    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(profile)
        try:
            cli.main(argv + ["--out", str(Path(out) / "run")])
        finally:
            sys.setprofile(None)
    return sorted(seen) + (["csrc/dynbatch_native.cpp"] if _native_ran() else [])


def largest_signatures(repo: Path, at_least: int = 12) -> list[str]:
    """Functions in ``dynbatch/`` taking ``at_least`` parameters or more (``self`` and ``cls`` not counted)."""
    out = []
    for path in sorted(repo.glob("dynbatch/**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) >= at_least:
                    out.append(f"{path.relative_to(repo)}:{node.lineno} {node.name} ({len(names)})")
    return out


def private_cross_calls(repo: Path) -> list[str]:
    """Names with one leading underscore that a file in ``dynbatch/train/`` reads from an object or module of
    ours other than ``self``/``cls`` (torch's own private operators aside), or imports from another module."""
    out = []
    for path in sorted(repo.glob("dynbatch/train/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if not (isinstance(base, ast.Name) and base.id in ("self", "cls", "torch", "nn", "F")):
                    out.append(f"{path.relative_to(repo)}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom):
                out += [f"{path.relative_to(repo)}:{node.lineno} imports {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def bench_import_circles(repo: Path) -> list[str]:
    """Circles among ``bench/``'s modules (imports at any depth of the file, either spelling)."""
    graph: dict[str, set[str]] = {}
    for path in repo.glob("bench/*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1 or mod == "bench":
                    deps |= {a.name for a in node.names} if not mod or mod == "bench" else {mod}
                elif mod.startswith("bench."):
                    deps.add(mod.split(".", 1)[1])
        graph[path.stem] = {d for d in deps if (repo / "bench" / f"{d}.py").is_file()}
    circles = []

    def walk(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == trail[0]:
                circles.append(" -> ".join(trail + [nxt]))
            elif nxt not in trail and nxt > trail[0]:
                walk(nxt, trail + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return circles


RENAMED = {"mode_id": "mode", "thr": "threshold", "route": "gram", "metric": "sum_metric",
           "grad_metric": "sum_metric"}  # the renamed copies the selection contract had between layers


def contract_spellings(repo: Path) -> list[str]:
    """Places writing the selection op's arguments out: its schema(s); Python functions or lambdas whose parameters
    name at least five of the selection's own arguments (``trend``, ``num_subsets``, ``seed``, ``mode``,
    ``threshold``, ``gram``, ``sum_metric``, ``eps``, or a renamed copy of one: ``mode_id``, ``thr``, ``route``,
    ``metric``, ``grad_metric``); calls passing five or more of them by keyword under a renamed copy's name, or
    ten or more positional names of the schema; and C++ functions with ten or more parameters including
    ``num_subsets``. A function taking the op's argument tuple, or building it once positionally, spells nothing."""
    import torch

    names = {a.name for a in torch.ops.dynbatch.select_subset.default._schema.arguments}
    own = {"trend", "num_subsets", "seed", "mode", "threshold", "gram", "sum_metric", "eps"}
    out = []
    for path in sorted([*repo.glob("dynbatch/**/*.py"), *repo.glob("kernels/*.py")]):
        text = path.read_text()
        out += [f"{path.relative_to(repo)} schema" for _ in
                re.finditer(r'select_subset\(Tensor logits|"select_subset": f?"\(|SCHEMA = f"\(\{library.HEAD\}, Tensor trend', text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                a = node.args
                items = {RENAMED.get(x.arg, x.arg) for x in a.posonlyargs + a.args + a.kwonlyargs}
                hit = len(own & items) >= 5
            elif isinstance(node, ast.Call):
                renamed = {RENAMED[k.arg] for k in node.keywords if k.arg in RENAMED}
                keyed = {k.arg for k in node.keywords if k.arg in own}
                positional = [x.id for x in node.args if isinstance(x, ast.Name)]
                hit = (renamed and len(renamed | keyed) >= 5) or (len(positional) >= 10
                                                                  and len(names & set(positional)) >= 8)
            else:
                continue
            if hit:
                what = getattr(node, "name", None) or (ast.unparse(node.func) if isinstance(node, ast.Call) else "lambda")
                out.append(f"{path.relative_to(repo)}:{node.lineno} {what}")
    for path in sorted(repo.glob("csrc/*.cpp")):
        for m in re.finditer(r"\n[\w:<>, ]+ (\w+)\(([^)]*)\)\s*\{", path.read_text()):
            if m.group(2).count(",") >= 9 and "num_subsets" in m.group(2):
                out.append(f"{path.relative_to(repo)} {m.group(1)}")
    return out


def longest_functions(repo: Path, top: int = 3) -> list[tuple[int, str]]:
    rows = []
    for path in repo.glob("dynbatch/**/*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(repo)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)[:top]


def _listed(title: str, items: list[str]) -> None:
    print(f"{title}: {len(items)}")
    for item in items:
        print(f"  {item}")


def main(argv: list[str]) -> int:
    repo = Path(argv[0] if argv else Path(__file__).resolve().parents[1]).resolve()
    _listed("files one EDBA step runs through", step_files(repo))
    _listed("files from the CLI to the CPU kernel of EDBA's selection", chain_files(repo))
    _listed("places spelling the selection contract", contract_spellings(repo))
    _listed("signatures in dynbatch/ with 12 or more parameters", largest_signatures(repo))
    _listed("private names of another module called in dynbatch/train/", private_cross_calls(repo))
    _listed("import circles in bench/", bench_import_circles(repo))
    train = sorted(p.name for p in (repo / "dynbatch/train").glob("*.py"))
    print(f"files in dynbatch/train/: {len(train)} ({', '.join(train)})")
    print("longest functions in dynbatch/: " + "; ".join(f"{n} lines {w}" for n, w in longest_functions(repo)))
    loop = repo / "dynbatch/train/trainer.py"
    print(f"loop module {loop.relative_to(repo)}: {len(loop.read_text().splitlines())} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
