"""Copy generated reports into README.md between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers, so the README
shows exactly what the benchmark and reproduction commands wrote (never a hand-copied number).

    python bench/splice_readme.py BENCH-CPU bench/results/cpu/report.md [REPRO bench/results/repro/*/table.md ...]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def splice(text: str, name: str, body: str) -> str:
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->|<!-- {name} -->", re.S)
    if not pattern.search(text):
        raise SystemExit(f"splice_readme: no <!-- {name} --> marker in {README}")
    return pattern.sub(lambda _: block, text, count=1)


def main(argv: list[str]) -> int:
    text = README.read_text()
    i = 0
    while i < len(argv):
        name, files = argv[i], []
        i += 1
        while i < len(argv) and not argv[i].isupper():
            files.append(Path(argv[i]))
            i += 1
        # Demote the reports' headings below the README section they land in.
        body = "\n\n".join(re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 5) + " ", f.read_text(), flags=re.M)
                           for f in files)
        text = splice(text, name, body)
    README.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
