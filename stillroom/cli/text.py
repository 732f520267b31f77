"""Verbs over a model and text: ``generate`` (token healing, sequence-level KD data) and ``eval``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from stillroom.cli.app import _positive, app, console
from stillroom.errors import ConfigError, MissingPathError


# --- generate ---------------------------------------------------------------------------------------------
@app.command()
def generate(
    ctx: typer.Context,
    model: Path = typer.Option(..., "--model", help="Folder with a causal LM and its tokenizer (save_pretrained)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue (kept exactly, whitespace "
                                         "included)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Batch mode: JSONL of prompt/completion or chat "
                                        "records (completions optional, ignored); each prompt is rendered with the "
                                        "model's own chat template and completed."),
    out: Optional[Path] = typer.Option(None, "--out", help="Batch mode: JSONL to write (one record per example; "
                                       "rerun the same command to resume)."),
    heal: bool = typer.Option(True, "--heal/--no-heal", help="Back off the prompt's last token(s) and regenerate "
                              "them under a hard constraint (token healing; --prompt only)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Tokens to generate after the prompt."),
    sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Batch mode with --sample: softmax "
                                                "temperature (default 1.0)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Batch mode with --sample: nucleus mass "
                                          "(default 1.0 = the whole distribution)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch mode: prompts decoded together."),
    seed: int = typer.Option(0, "--seed", help="Batch mode: sampling seed (batch k uses seed + k)."),
    device: Optional[str] = typer.Option(None, "--device", help="Batch mode: cpu, cuda, cuda:N (default: cuda "
                                         "when present)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Batch mode: start --out over (else a rerun "
                                   "resumes it, with the same settings only)."),
    progress: bool = typer.Option(True, help="Batch mode: show the progress bar."),
) -> None:
    """Continue a prompt (token healing on by default), or complete every prompt of a file (--data/--out)."""
    from stillroom.models.loading import check_device, check_model_dir

    check_model_dir(model, "--model")
    if (prompt is None) == (data is None):
        raise ConfigError("give exactly one of --prompt (continue one text) or --data with --out (complete a file)")
    batch_only = ("out", "temperature", "top_p", "batch_size", "seed", "device", "overwrite", "progress")
    given = [n for n in batch_only if ctx.get_parameter_source(n).name != "DEFAULT"]
    if prompt is not None:
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is for batch mode (--data); remove it or use --data")
        _generate_one(model, prompt, heal, max_new_tokens, sample)
        return
    if out is None:
        raise ConfigError("--data needs --out (the JSONL file to write)")
    if ctx.get_parameter_source("heal").name != "DEFAULT":
        raise ConfigError("--heal/--no-heal applies to --prompt only: --data prompts end where the model's "
                          "template ends, on a token boundary; remove it")
    if not sample and (temperature is not None or top_p is not None):
        raise ConfigError("--temperature and --top-p apply only with --sample (greedy decoding ignores them)")
    _positive("--temperature", temperature)
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if not data.exists():
        raise MissingPathError(f"--data {data} does not exist; pass a JSONL file of prompt/completion or chat records")
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    from transformers.utils import logging as hf_logging

    from stillroom.generation.rollout import generate_file

    hf_logging.disable_progress_bar()
    s = generate_file(model, data, out, max_new_tokens=max_new_tokens, do_sample=sample,
                      temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
                      batch_size=batch_size, seed=seed, overwrite=overwrite, device=device, progress=progress)
    empty = f", {s.empty} empty completions left out (listed in {out}.meta.json)" if s.empty else ""
    print(f"{out}: {s.written} completions written ({s.tokens:,} tokens in {s.seconds:.1f} s), {s.done_before} "
          f"already there, {s.total} examples{empty}", file=sys.stderr)


def _generate_one(model: Path, prompt: str, heal: bool, max_new_tokens: int, sample: bool) -> None:
    from stillroom.models.loading import load_causal_lm, load_tokenizer

    if not prompt:
        raise ConfigError("--prompt is empty; give some text to continue")
    from transformers.utils import logging as hf_logging

    from stillroom.generation.healing import generate as heal_generate

    hf_logging.disable_progress_bar()

    tok = load_tokenizer(model, "--model")
    lm = load_causal_lm(model, "--model", tokenizer=tok).eval()
    text = heal_generate(lm, tok, [prompt], heal=heal, max_new_tokens=max_new_tokens, do_sample=sample)[0]
    print(text)


# --- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_(
    model: list[Path] = typer.Option(..., "--model", help="Model folder(s) to evaluate (repeat to compare)."),
    data: Path = typer.Option(..., "--data", help="Text file, folder of .txt, JSONL with a text field, Parquet "
                                                  "file with a text column, or a datasets folder."),
    documents: str = typer.Option("file", help="What one document of a plain .txt is: file, paragraph or line "
                                               "(as the recipe's data.documents)."),
    teacher: Optional[list[Path]] = typer.Option(None, "--teacher", help="Teacher folder(s): also report top-1 "
                                                 "agreement and KL(teacher||student) on 1-to-1 aligned positions."),
    context: Optional[int] = typer.Option(None, min=2, help="Window length in tokens (default: the model's maximum, "
                                          "at most 2048)."),
    stride: Optional[int] = typer.Option(None, min=1, help="Tokens between window starts (default: context/2)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass, at most (fewer when their logits would pass 1 GiB)."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of reports instead of a table."),
) -> None:
    """Bits per byte (comparable across tokenizers), token perplexity, and agreement with teachers."""
    import json

    from transformers.utils import logging as hf_logging

    from stillroom.evaluation import evaluate_paths, report_table
    from stillroom.models.loading import check_device, check_model_dir

    hf_logging.disable_progress_bar()  # ours, not a transformers bar per weight load (as cache and generate)

    for option, paths in (("--model", model), ("--teacher", teacher or [])):
        for p in paths:
            check_model_dir(p, option)
    if context is not None and stride is not None and stride >= context:
        raise ConfigError(f"--stride {stride} must be below --context {context}")
    check_device(device)
    reports = evaluate_paths(model, data, teachers=teacher or [], context=context, stride=stride,
                             batch_size=batch_size, device=device, progress=not as_json,
                             documents=documents)
    if as_json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        console.print(report_table(reports))
