"""The ``stillroom`` command line. Each verb is a thin wrapper over a library function.

Only verbs that work exist. Verbs are grouped by the module they front; keep each one short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import stillroom

app = typer.Typer(
    name="stillroom",
    help="Distil and fuse teacher language models into a student, whatever tokenizers they use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"stillroom {stillroom.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Distil and fuse teacher language models into a student, whatever tokenizers they use."""


# --- demo -------------------------------------------------------------------------------------------------
@app.command()
def demo(out: Optional[Path] = typer.Option(None, help="Output folder (default: runs/demo-TIMESTAMP).")) -> None:
    """Run the pipeline on the embedded default (shipped corpus, tiny models), on CPU, offline."""
    import time

    from rich.table import Table

    from stillroom.testing import build_fixture_models

    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    with console.status("training tokenizers and building tiny models on the shipped corpus"):
        models = build_fixture_models(out / "models")
    table = Table(title="models built from the shipped corpus")
    for col in ("name", "model", "vocab", "params", "folder"):
        table.add_column(col)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        params = f"{sum(p.numel() for p in model.parameters()):,}"
        table.add_row(name, type(model).__name__, str(len(tok)), params, str(path))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
