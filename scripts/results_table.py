"""Rewrite the ``## Results`` table of docs/benchmarks.md from the benchmark sections below it.

    .venv/bin/python scripts/results_table.py          # rewrite the table in place
    .venv/bin/python scripts/results_table.py --check  # exit 1 if the committed table is stale

Each ``### Title (`bench/NAME.py`)`` section holds one line

    Headline: machine M; peer P; median S / P; ratio R.

next to the measurements it summarises; the table gets one row per section (benchmark, the section's first
``python -m bench...`` command, and those four fields), in section order. tests/test_runs.py checks the
committed table equals this script's output, so the summary cannot drift from the sections.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
HEADER = ("| benchmark | command | machine | peer | median (stillroom / peer) | ratio |\n"
          "|---|---|---|---|---|---|\n")
SECTION = re.compile(r"^### (.*\(`bench/(\w+)\.py`\))$", re.M)
HEADLINE = re.compile(r"^Headline: machine (.+?); peer (.+?); median (.+?); ratio (.+?)\.$", re.M)
COMMAND = re.compile(r"(?:flock \S+ )?(?:env \S+ )?(?:\.venv/bin/)?python -m bench\.\w+[^`\n]*")


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def sections(text: str) -> list[tuple[str, str, str]]:
    """``(name, heading anchor, body)`` of every benchmark section, in order."""
    marks = list(SECTION.finditer(text))
    ends = [m.start() for m in marks[1:]] + [len(text)]
    return [(m.group(2), anchor(m.group(1)), text[m.end():end]) for m, end in zip(marks, ends, strict=True)]


def results_rows(text: str) -> list[dict]:
    rows = []
    for name, link, body in sections(text):
        h = HEADLINE.search(body)
        if h is None:
            raise SystemExit(f"docs/benchmarks.md: section bench/{name}.py has no 'Headline: machine ...; peer ...; "
                             "median ...; ratio ...' line; add one next to its measurements")
        cmd = COMMAND.search(body)
        rows.append({"benchmark": name, "anchor": link, "command": cmd.group(0).strip() if cmd else f"python -m bench.{name}",
                     "machine": h.group(1), "peer": h.group(2), "median": h.group(3), "ratio": h.group(4)})
    return rows


def table(text: str) -> str:
    return HEADER + "".join(f"| [{r['benchmark']}](#{r['anchor']}) | `{r['command']}` | {r['machine']} | "
                            f"{r['peer']} | {r['median']} | {r['ratio']} |\n" for r in results_rows(text))


def rewrite(text: str) -> str:
    """``text`` with the table under ``## Results`` replaced by :func:`table`."""
    start = text.index("## Results\n")
    head = text.index("| benchmark |", start)
    end = head
    while end < len(text) and text[end] == "|":
        end = text.index("\n", end) + 1
    return text[:head] + table(text) + text[end:]


def main(argv: list[str]) -> int:
    text = PAGE.read_text(encoding="utf-8")
    new = rewrite(text)
    if "--check" in argv:
        if new != text:
            print("docs/benchmarks.md: the Results table is stale; run python scripts/results_table.py")
            return 1
        return 0
    PAGE.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
