"""Write each CLI verb's options table into docs/cli/VERB.md (between the options markers).

    .venv/bin/python scripts/gen_cli_docs.py

tests/test_docs.py checks the pages match, so the reference cannot drift from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def options_table(verb: str) -> str:
    from stillroom.cli import app

    cmd = typer.main.get_command(app).commands[verb]
    if hasattr(cmd, "commands"):  # a verb with sub-commands: one table per sub-command
        return "\n\n".join(f"`stillroom {verb} {name}`: {(sub.help or '').splitlines()[0]}\n\n{_table(sub)}"
                             for name, sub in cmd.commands.items())
    return _table(cmd)


def _table(cmd) -> str:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for p in cmd.params:
        if p.param_type_name == "argument":
            name = f"`{p.name.upper()}`" + (" …" if p.nargs == -1 else "")
            default = ""
        else:
            name = " / ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            default = "" if p.default in (None, False) or p.multiple else f"`{p.default}`"
        text = (getattr(p, "help", None) or "").replace("\n", " ").replace("|", "\\|")
        rows.append(f"| {name} | {default} | {text} |")
    return "\n".join(rows)


def render(page: str, verb: str) -> str:
    table = options_table(verb)
    return re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{table}\n{END}", page,
                  flags=re.S)


def main() -> None:
    for page in sorted((ROOT / "docs" / "cli").glob("*.md")):
        page.write_text(render(page.read_text(encoding="utf-8"), page.stem), encoding="utf-8")
        print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
