"""Copy generated reports into the documents between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers (README.md,
docs/*.md and the reports under bench/results/repro/: whichever holds the marker), so they show exactly what the
benchmark and reproduction commands wrote (never a hand-copied number).

    python bench/splice_readme.py BENCH-CPU bench/results/cpu/report.md [REPRO bench/results/repro/*/table.md ...]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "bench/results/repro").glob("**/REPORT.md"))]


def splice(name: str, body: str) -> None:
    """Replace the block ``name`` in the one document that holds its marker."""
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->|<!-- {name} -->", re.S)
    for doc in DOCUMENTS:
        text = doc.read_text() if doc.is_file() else ""
        if pattern.search(text):
            doc.write_text(pattern.sub(lambda _: block, text, count=1))
            return
    raise SystemExit(f"splice_readme: no <!-- {name} --> marker in {', '.join(str(d) for d in DOCUMENTS)}")


def main(argv: list[str]) -> int:
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
        splice(name, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
