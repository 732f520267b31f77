"""Rewrite the ``## Results`` table of docs/benchmarks.md from the benchmark pages under docs/benchmarks/.

    .venv/bin/python scripts/results_table.py          # rewrite the table in place
    .venv/bin/python scripts/results_table.py --check  # exit 1 if the committed table is stale

Every benchmark has a page docs/benchmarks/NAME.md (for bench/NAME.py). A page holds one or more sections
``## Title (`bench/NAME.py`)``; a section runs to the next ``#`` or ``##`` heading, so the ``## History`` that
ends every page (earlier runs, dated) belongs to no section. Each section holds one line

    Headline: machine M; peer P; median S / P; ratio R.

next to the measurements it summarises; the table gets one row per section (benchmark, linked to the section on
its page, the section's first ``python -m bench...`` command, and those four fields). Rows come in the fixed order
of PAGES below, sections within a page in page order. A page under docs/benchmarks/ that PAGES does not list, or
a listed page that is missing, is an error, so a new page cannot drop out of the table unnoticed; a page may hold
no section (packing measures padding, not a peer). tests/test_runs.py checks the committed table equals this
script's output, so the summary cannot drift from the pages.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
PAGES_DIR = ROOT / "docs" / "benchmarks"
PAGES = ("align", "vocab", "losses", "sparse_tail", "cache", "train", "onpolicy", "decode_kernels",
         "onpolicy_quality", "healing", "fusion", "real_fusion", "real_speed", "objectives", "projection_signal",
         "held_out_slices", "gold_peer", "served", "export_gguf", "lora", "packing", "streaming", "precision", "compile")
HEADER = ("| benchmark | command | machine | peer | median (stillroom / peer) | ratio |\n"
          "|---|---|---|---|---|---|\n")
SECTION = re.compile(r"^## (.*\(`bench/(\w+)\.py`\))$", re.M)
END = re.compile(r"^#{1,2} ", re.M)  # a section ends at the next heading of level 1 or 2
HEADLINE = re.compile(r"^Headline: machine (.+?); peer (.+?); median (.+?); ratio (.+?)\.$", re.M)
COMMAND = re.compile(r"(?:flock \S+ )?(?:env \S+ )?(?:\.venv/bin/)?python -m bench\.\w+[^`\n]*")


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def load_pages(folder: Path = PAGES_DIR) -> dict[str, str]:
    """``{name: text}`` of every page, in PAGES order; the pages on disk must be exactly PAGES."""
    found = {p.stem for p in folder.glob("*.md")}
    if found != set(PAGES):
        raise SystemExit(f"docs/benchmarks/: pages {sorted(found - set(PAGES))} are not in scripts/results_table.py's "
                         f"PAGES, and {sorted(set(PAGES) - found)} are missing; keep the two in step")
    return {name: (folder / f"{name}.md").read_text(encoding="utf-8") for name in PAGES}


def sections(pages: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(name, link to the section from docs/benchmarks.md, body)`` of every benchmark section, in table order."""
    out = []
    for page in PAGES:
        text = pages[page]
        for m in SECTION.finditer(text):
            if m.group(2) != page:
                raise SystemExit(f"docs/benchmarks/{page}.md: section '{m.group(1)}' belongs on "
                                 f"docs/benchmarks/{m.group(2)}.md")
            end = END.search(text, m.end())
            out.append((page, f"benchmarks/{page}.md#{anchor(m.group(1))}", text[m.end():end.start() if end else None]))
    return out


def results_rows(pages: dict[str, str]) -> list[dict]:
    rows = []
    for name, link, body in sections(pages):
        h = HEADLINE.search(body)
        if h is None:
            raise SystemExit(f"docs/benchmarks/{name}.md: a section of bench/{name}.py has no 'Headline: machine ...; "
                             "peer ...; median ...; ratio ...' line; add one next to its measurements")
        cmd = COMMAND.search(body)
        rows.append({"benchmark": name, "link": link, "command": cmd.group(0).strip() if cmd else f"python -m bench.{name}",
                     "machine": h.group(1), "peer": h.group(2), "median": h.group(3), "ratio": h.group(4)})
    return rows


def table(pages: dict[str, str]) -> str:
    return HEADER + "".join(f"| [{r['benchmark']}]({r['link']}) | `{r['command']}` | {r['machine']} | "
                            f"{r['peer']} | {r['median']} | {r['ratio']} |\n" for r in results_rows(pages))


def rewrite(text: str, pages: dict[str, str]) -> str:
    """``text`` (docs/benchmarks.md) with the table under ``## Results`` replaced by :func:`table`."""
    start = text.index("## Results\n")
    head = text.index("| benchmark |", start)
    end = head
    while end < len(text) and text[end] == "|":
        end = text.index("\n", end) + 1
    return text[:head] + table(pages) + text[end:]


def main(argv: list[str]) -> int:
    text = PAGE.read_text(encoding="utf-8")
    new = rewrite(text, load_pages())
    if "--check" in argv:
        if new != text:
            print("docs/benchmarks.md: the Results table is stale; run python scripts/results_table.py")
            return 1
        return 0
    PAGE.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
