"""How the code is shaped, measured: the files one EDBA training step runs through, the places that spell the
selection op's positional contract, the longest functions, and the loop module's length.

    python bench/structure.py [REPO]      # REPO: a checkout (default: this one); run it from any folder

The step is traced (``sys.setprofile``) from ``Trainer._train_step`` of an EDBA run on the digits (tiny MLP, 4096
subsets), after two warm-up steps; the native kernel counts as ``csrc/dynbatch_native.cpp`` when the CPU selection
ran it. A "spelling" of the selection contract is defined in :func:`contract_spellings`.
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


def contract_spellings(repo: Path) -> list[str]:
    """Places writing the selection op's arguments out in order: its schema(s), Python functions, lambdas or calls
    with ten or more positional items of which at least eight are the schema's argument names, and C++ functions
    with ten or more parameters including ``num_subsets``."""
    import torch

    names = {a.name for a in torch.ops.dynbatch.select_subset.default._schema.arguments}
    out = []
    for path in sorted([*repo.glob("dynbatch/**/*.py"), *repo.glob("kernels/*.py")]):
        text = path.read_text()
        out += [f"{path.relative_to(repo)} schema" for _ in
                re.finditer(r'select_subset\(Tensor logits|"select_subset": f?"\(', text)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)):
                items = [a.arg for a in node.args.args]
            elif isinstance(node, ast.Call):
                items = [a.id for a in node.args if isinstance(a, ast.Name)] if len(node.args) >= 10 else []
            else:
                continue
            if len(items) >= 10 and len(names & set(items)) >= 8:
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


def main(argv: list[str]) -> int:
    repo = Path(argv[0] if argv else Path(__file__).resolve().parents[1]).resolve()
    files = step_files(repo)
    print(f"files one EDBA step runs through: {len(files)}")
    for f in files:
        print(f"  {f}")
    spellings = contract_spellings(repo)
    print(f"places spelling the selection contract positionally: {len(spellings)}")
    for s in spellings:
        print(f"  {s}")
    print("longest functions in dynbatch/: " + "; ".join(f"{n} lines {w}" for n, w in longest_functions(repo)))
    loop = repo / "dynbatch/train/trainer.py"
    print(f"loop module {loop.relative_to(repo)}: {len(loop.read_text().splitlines())} lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
