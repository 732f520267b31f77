"""Verbs that run the pipeline: ``demo``, ``cache``, ``train``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from stillroom.cli.app import _choice, _positive, app, console
from stillroom.errors import ConfigError, DataError


# --- demo -------------------------------------------------------------------------------------------------
@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Output folder (default: runs/demo-TIMESTAMP)."),
    teacher: Optional[list[Path]] = typer.Option(None, help="Teacher model folder; repeat for several "
                                                 "(default: the two shipped tiny teachers)."),
    student_tokenizer: Optional[Path] = typer.Option(None, help="Folder with the student's tokenizer "
                                                     "(default: the shipped third tokenizer)."),
    train: Optional[Path] = typer.Option(None, help="Training DATA (default: shipped corpus, train works)."),
    validation: Optional[Path] = typer.Option(None, help="Validation DATA (default: shipped validation work)."),
    test: Optional[Path] = typer.Option(None, help="Held-out DATA for the report (default: shipped test work)."),
    steps: int = typer.Option(300, min=1, help="Training steps for each student."),
    batch_size: int = typer.Option(8, min=1),
    seq_len: int = typer.Option(128, min=8),
    seed: int = typer.Option(0),
    fusion_method: str = typer.Option("min_ce", help="min_ce, avg_ce or mean."),
    fusion_level: str = typer.Option("sequence", help="sequence or token."),
    projection: str = typer.Option("prefix", help="How teacher mass reaches the student vocabulary: prefix, onehot "
                                   "(FuseLLM) or bytes (see fusion.projection in docs/training.md)."),
    ce_weight: float = typer.Option(0.5, min=0.0, max=1.0, help="λ in λ·CE + (1−λ)·fusion loss (FuseLLM used 0.9 "
                                    "for continual training; 0.5 for a student from scratch)."),
    max_blocks: Optional[int] = typer.Option(None, min=1, help="Use only the first N training blocks."),
    eval_chars: Optional[int] = typer.Option(None, min=1, help="Evaluate on the first N characters of each "
                                             "held-out work."),
) -> None:
    """Whole pipeline on the embedded default (or your teachers/data): vocab maps, caches, fusion, eval, report."""
    from stillroom.demo import DemoOptions, run_demo

    opts = DemoOptions(out=out, steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                       fusion_method=fusion_method, fusion_level=fusion_level, projection=projection,
                       ce_weight=ce_weight, max_blocks=max_blocks, eval_chars=eval_chars)
    if teacher:
        opts.teachers = [str(t) for t in teacher]
    for name, value in (("student_tokenizer", student_tokenizer), ("train", train), ("validation", validation),
                        ("test", test)):
        if value is not None:
            setattr(opts, name, str(value))
    _choice("--fusion-method", fusion_method, ("min_ce", "avg_ce", "mean"))
    _choice("--fusion-level", fusion_level, ("sequence", "token"))
    _choice("--projection", projection, ("prefix", "onehot", "bytes"))
    run_demo(opts, console)


# --- cache ------------------------------------------------------------------------------------------------
@app.command()
def cache(
    teacher: Optional[Path] = typer.Option(None, help="Teacher model folder (safetensors + tokenizer) or .gguf; "
                                           "with --server, a folder or .gguf with at least its tokenizer."),
    server: Optional[str] = typer.Option(None, help="Score with the teacher served at this OpenAI-compatible "
                                         "URL (llama.cpp, vLLM: http://HOST:PORT) instead of loading it here."),
    server_model: Optional[str] = typer.Option(None, help="With --server: the served model's name when it hosts "
                                               "several."),
    concurrency: int = typer.Option(4, min=1, help="With --server: requests in flight at once."),
    data: Optional[Path] = typer.Option(None, help="Text file, folder of .txt, JSONL with a text field, Parquet "
                                                   "file with a text column, or a datasets folder (streamed: "
                                                   "never held in memory)."),
    documents: str = typer.Option("file", help="What one example of a plain .txt is: file, paragraph or line."),
    out: Optional[Path] = typer.Option(None, help="Cache folder to write (rerun the same command to resume)."),
    top_k: int = typer.Option(16, "--top-k", min=1, help="Teacher entries kept per position."),
    temperature: float = typer.Option(1.0, help="Teacher softmax temperature for the stored log-probs."),
    max_length: Optional[int] = typer.Option(None, help="Window length in tokens (default: the teacher's "
                                                        "context); longer texts are cut into overlapping windows. "
                                                        "With --server: the longest text (default 2048)."),
    overlap: Optional[int] = typer.Option(None, help="Context tokens re-read by each later window "
                                                     "(default max-length/8)."),
    text_field: str = typer.Option("text", help="JSONL / datasets field holding the text."),
    shard_size: int = typer.Option(1000, min=1, help="Examples per shard (the unit of resumption)."),
    batch_tokens: Optional[int] = typer.Option(None, help="Padded tokens per teacher forward "
                                                          "(default 4096 on GPU, 1024 on CPU)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if present)."),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's "
                                          "choice, all cores; set it on a shared machine)."),
    verify: Optional[Path] = typer.Option(None, "--verify", help="Check CACHE_DIR's shards and exit."),
) -> None:
    """Run a teacher once over DATA and store its top-k signal compactly (sharded, resumable, verifiable)."""
    import os

    from stillroom.files import check_output_dir
    from stillroom.inputs.text import TextSource
    from stillroom.models.loading import check_device, check_model_dir
    from stillroom.teachers.cache import verify_cache
    from stillroom.teachers.online import OnlineTeacher

    if verify is not None:
        if any(v is not None for v in (teacher, data, out)):
            raise ConfigError("--verify CACHE_DIR checks a finished cache; give it alone, without --teacher, "
                              "--data or --out")
        report = verify_cache(verify)
        for p in report.problems:
            print(f"{verify}: {p}")
        if not report.ok:
            raise DataError(f"cache {verify}: {len(report.missing)} missing, {len(report.corrupt)} corrupt of "
                            f"{report.checked} shards; rerun the cache command that built it to rebuild them")
        console.print(f"cache {verify}: all {report.checked} shards present and intact")
        return
    missing = [n for n, v in (("--teacher", teacher), ("--data", data), ("--out", out)) if v is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or use --verify CACHE_DIR)")
    # cheap checks first: options, output folder, data, teacher folder; only then load the teacher
    _positive("--temperature", temperature)
    _positive("--max-length", max_length, minimum=2)
    _positive("--overlap", overlap, strict=False)
    _positive("--batch-tokens", batch_tokens)
    _choice("--dtype", dtype, ("auto", "float32", "bfloat16", "float16"))
    check_device(device)
    check_output_dir(out, "--out", marker="plan.json", create=False)
    rows = TextSource(data, text_field, documents)  # streamed, never held; a bad row stops the first pass
    next(iter(rows))  # the data opens and holds a first document (checked before the teacher loads)
    if server is not None:  # scored by the server: only the tokenizer is read here
        from stillroom.teachers.served import ServedTeacher

        local = [o for o, v, d in (("--device", device, None), ("--dtype", dtype, "auto"),
                                   ("--batch-tokens", batch_tokens, None), ("--overlap", overlap, None)) if v != d]
        if local:
            raise ConfigError(f"{', '.join(local)}: options of a teacher run here; with --server remove them")
        with console.status(f"probing {server}: its tokenizer and how it reports log-probs"):
            t = ServedTeacher.from_path(server, teacher, "--teacher", model=server_model, top_k=top_k,
                                        temperature=temperature, max_length=max_length or 2048,
                                        concurrency=concurrency)
        console.print(f"server {t.base} serves {t.model!r}: rows read at offset {t.offset:+d}")
        _write_cache(t, rows, out, shard_size, text_field, progress)
        console.print(f"server answers: {t.stats.line()}")
        return
    elif server_model is not None:
        raise ConfigError("--server-model names a model on --server; give --server URL too, or remove it")
    check_model_dir(teacher, "--teacher")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if progress:  # ours, not transformers' bar per weight load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ['LOCAL_RANK']}"
    t = OnlineTeacher(teacher, top_k=top_k, temperature=temperature, max_length=max_length, overlap=overlap,
                      batch_tokens=batch_tokens, device=device, dtype=dtype)
    _write_cache(t, rows, out, shard_size, text_field, progress)


def _write_cache(t, rows, out: Path, shard_size: int, text_field: str, progress: bool) -> None:
    import os

    from stillroom.teachers.cache import write_cache

    s = write_cache(t, rows, out, shard_size=shard_size, text_field=text_field, progress=progress,
                    console=console)
    console.print(f"rank {os.environ.get('RANK', 0)}: {s.shards_written} shards written, {s.shards_skipped} "
                  f"already done; {s.rows} rows, {s.tokens:,} tokens in {s.seconds:.1f} s")
    if s.manifest is not None:
        tot = s.manifest["totals"]
        console.print(f"cache {out} complete: {tot['rows']} rows, {tot['tokens']:,} tokens, {tot['bytes']:,} bytes "
                      f"({tot['bytes_per_token']:.1f} B/token, {tot['bytes_per_entry']:.2f} B/entry at "
                      f"k={s.manifest['top_k']}); quantisation KL {tot['kl_mean']:.2e} nats/token "
                      f"(max {tot['kl_max']:.2e}), max |Δ log-prob| {tot['max_abs_logprob_err']:.3f}")
    else:
        console.print("other ranks' shards are still running; the last rank to finish writes manifest.json")


# --- train ------------------------------------------------------------------------------------------------
@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/ and docs/training.md)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=20 "
                                                               "teachers.0.path=/models/t fusion.method=avg_ce"),
    export_blocks: Optional[Path] = typer.Option(None, "--export-blocks", help="Write the training blocks "
                                                 "(id, text) as JSONL for `stillroom cache --data` and exit."),
    check: bool = typer.Option(False, "--check", help="Validate the recipe (and tokenizers/caches) and exit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty train.output_dir (or an existing "
                                   "--export-blocks file); without it only this recipe's own folder is resumed."),
) -> None:
    """Distil / fuse teachers into a student as the recipe says (torchrun/accelerate launch for DDP)."""
    import os

    from stillroom.files import check_output_file
    from stillroom.inputs.text import is_blocks_file
    from stillroom.training.recipe import load_recipe

    if check and export_blocks is not None:
        raise ConfigError("--check and --export-blocks do different things; give one of them")
    r = load_recipe(recipe, list(overrides or []))  # the recipe first: pydantic only, no model, no torch
    if export_blocks is not None:  # a file written by a previous export is ours to replace
        check_output_file(export_blocks, "--export-blocks", overwrite=overwrite, ours=is_blocks_file)
    if check:  # tokenizers, configs, data, caches: everything knowable before training (`train` runs it too)
        from stillroom.training.plan import make_plan

        for note in make_plan(r).warnings:  # tokenizers, configs, data, caches, switches
            print(f"warning: {note}", file=sys.stderr)  # one unwrapped line each, like errors
        console.print(f"recipe {recipe} is valid")
        return
    from stillroom.training.data import export_training_blocks
    from stillroom.training.run import train as run_train
    from stillroom.training.runs import TrainInterrupted

    if export_blocks is not None:
        n = export_training_blocks(r, export_blocks, overwrite=overwrite)
        console.print(f"wrote {n} blocks to {export_blocks}")
        return
    try:
        result = run_train(r, overwrite=overwrite)
    except KeyboardInterrupt as e:  # TrainInterrupted says where it stopped; anything earlier trained nothing
        msg = str(e) if isinstance(e, TrainInterrupted) else "interrupted before training started; nothing written"
        print(msg, file=sys.stderr)
        raise typer.Exit(130) from None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.model is None:
        console.print(f"{result.output_dir}: this run already finished; nothing to train")
        return
    shown = {k: v for k, v in result.metrics.items() if k in ("train_loss", "eval_loss", "eval_bpb", "train_runtime")}
    console.print(f"student saved to {result.output_dir}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
