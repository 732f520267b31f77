"""The embedded default, end to end: what ``stillroom demo`` (and ``make demo``) runs.

Pipeline, each stage a library call a user can make on their own models:

1. vocabulary maps teacher → student (``VocabMap.cached``: exact bytes, then MinED);
2. one offline top-k cache per teacher over exactly the student's training blocks (``write_cache``);
3. the fused student: FuseLLM-style training, ``λ·CE + (1−λ)·CE(fused teacher, student)``, teachers read from
   their caches, aligned and projected onto the student's vocabulary, fused per sequence by MinCE;
4. a CE-only baseline: same student architecture, data, steps and seed, no teachers;
5. evaluation of the teachers and both students on held-out works, in bits per byte (comparable across
   tokenizers), and a report (``report.md``, ``results.json``, loss-curve and bits-per-byte plots).

Defaults use the shipped assets: two tiny teachers with different tokenizer families (byte-level BPE GPT-2,
``▁`` BPE Llama with byte fallback), a third tokenizer for the student, and the shipped Shakespeare corpus split
by whole works. Every default can be replaced (``DemoOptions``; CLI flags of ``stillroom demo``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from stillroom.files import PACKAGE_DATA

DEFAULT = PACKAGE_DATA / "default"
CORPUS = PACKAGE_DATA / "corpus"


@dataclass
class DemoOptions:
    """Everything the demo does, with the embedded default as default. Paths may be any HF model folders."""

    out: Path | None = None
    teachers: list[str] = field(default_factory=lambda: [str(DEFAULT / "teacher-bpe"), str(DEFAULT / "teacher-spm")])
    student_tokenizer: str = str(DEFAULT / "student-tokenizer")
    student_config: dict = field(default_factory=lambda: {"model_type": "gpt2", "n_layer": 2, "n_embd": 128,
                                                          "n_head": 4, "n_positions": 256})
    train: str = str(CORPUS / "train")
    validation: str = str(CORPUS / "validation")
    test: str = str(CORPUS / "test")
    seq_len: int = 128
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0
    top_k: int = 10
    ce_weight: float = 0.5
    temperature: float = 1.0
    fusion_method: str = "min_ce"
    fusion_level: str = "sequence"
    projection: str = "prefix"
    max_blocks: int | None = None  # None = steps × batch_size: each block is trained on once, none is cached idle
    eval_chars: int | None = None  # evaluate on the first N characters of each held-out work (None = all)

    def recipe(self, name: str, out_dir: Path, teachers: list[tuple[str, str]] = ()) -> dict:
        """The training recipe (a dict for :func:`stillroom.training.run.train`) for a student distilled from
        ``teachers`` — ``(model folder, cache folder)`` pairs; none = the CE-only baseline."""
        teachers = [{"path": t, "cache": c, "name": Path(t).name} for t, c in teachers]
        return {
            "name": name,
            "student": {"tokenizer": self.student_tokenizer, "config": dict(self.student_config)},
            "teachers": teachers,
            "data": {"train": self.train, "eval": self.validation, "seq_len": self.seq_len,
                     "max_blocks": self.max_blocks or self.steps * self.batch_size},
            "loss": {"kind": "forward_kl", "ce_weight": self.ce_weight if teachers else 1.0,
                     "temperature": self.temperature},
            "fusion": {"method": self.fusion_method, "level": self.fusion_level, "top_k": self.top_k,
                       "projection": self.projection},
            "train": {"output_dir": str(out_dir), "max_steps": self.steps, "batch_size": self.batch_size,
                      "lr": self.lr, "warmup_steps": min(20, self.steps // 10), "seed": self.seed,
                      "logging_steps": max(1, min(10, self.steps // 10)), "eval_steps": max(1, self.steps // 5),
                      "eval_max_blocks": 32, "plot": True, "overwrite": True},  # the demo's own folders: rerun = redo
        }


@dataclass
class DemoResult:
    out: Path
    rows: list[dict]  # one per model: name, role, bits_per_byte, token_perplexity, tokens, bytes
    seconds: dict[str, float]


def teacher_names(opts: DemoOptions) -> list[str]:
    from stillroom.errors import ConfigError
    from stillroom.models.loading import check_model_dir

    names = [Path(t).name for t in opts.teachers]
    for t in opts.teachers:
        check_model_dir(t, "--teacher")
    if len(set(names)) != len(names):
        raise ConfigError(f"--teacher: teacher folders need distinct names, got {names}; rename one folder")
    return names


def check_options(opts: DemoOptions) -> None:
    """Everything that can fail before stage 1, checked in seconds: option values (through the recipe they
    become), the teacher folders and tokenizers, the student tokenizer and the three DATA sets."""
    from stillroom.inputs.text import load_texts
    from stillroom.models.loading import load_tokenizer
    from stillroom.training.recipe import load_recipe

    teacher_names(opts)
    for path in (opts.train, opts.validation, opts.test):
        load_texts(path)
    load_tokenizer(opts.student_tokenizer, "--student-tokenizer", model=False)
    for t in opts.teachers:
        load_tokenizer(t, "--teacher")
    load_recipe(opts.recipe("demo", Path("unused"), [(t, None) for t in opts.teachers]))


def build_vocab_maps(opts: DemoOptions, out: Path, console: Console) -> None:
    """Stage 1: teacher → student vocabulary maps, saved under ``out/vocab`` (reused by training)."""
    from stillroom.models.loading import load_tokenizer
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    s_table = TokenTable.from_tokenizer(load_tokenizer(opts.student_tokenizer, "--student-tokenizer", model=False))
    for path, name in zip(opts.teachers, teacher_names(opts), strict=True):
        vmap = VocabMap.cached(TokenTable.from_tokenizer(load_tokenizer(path, "--teacher")), s_table,
                               out / "vocab", progress=True)
        st = vmap.stats()
        console.print(f"{name} → student: {st['exact_pct']:.1f}% of {st['ordinary']:,} tokens have an exact byte "
                      f"match; the rest are {st['mean_distance_inexact']:.2f} byte edits away on average")


def build_caches(opts: DemoOptions, out: Path, console: Console) -> list[str]:
    """Stage 2: one offline top-k cache per teacher over exactly the student's training blocks."""
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.training.data import export_training_blocks
    from stillroom.training.recipe import load_recipe

    blocks_file = out / "train_blocks.jsonl"
    n_blocks = export_training_blocks(load_recipe(opts.recipe("blocks", out / "unused")), blocks_file)
    console.print(f"{n_blocks} training blocks of ≤ {opts.seq_len} student tokens → {blocks_file}")
    caches = []
    for path, name in zip(opts.teachers, teacher_names(opts), strict=True):
        teacher = OnlineTeacher(path, top_k=opts.top_k, temperature=opts.temperature)
        s = write_cache(teacher, blocks_file, out / "cache" / name, console=console)
        if s.shards_written == 0 and s.complete:
            console.print(f"{name}: cache already complete ({s.shards_skipped} shards), reused → {s.out}")
        else:
            console.print(f"{name}: {s.rows} rows, {s.tokens:,} teacher tokens in {s.seconds:.1f} s → {s.out}")
        caches.append(str(out / "cache" / name))
        del teacher
    return caches


def evaluate_folders(folders: list[tuple[str, str]], texts: list[str]) -> list[dict]:
    """Bits per byte (and token perplexity) of each ``(model folder, role)`` on ``texts``."""
    import torch

    from stillroom.evaluation import evaluate, load_model

    rows = []
    for path, role in folders:
        model, tok = load_model(path)
        with torch.no_grad():
            r = evaluate(model, tok, texts, name=Path(path).name, progress=True)
        rows.append({"model": r.model, "role": role, "bits_per_byte": r.bits_per_byte,
                     "token_perplexity": r.token_perplexity, "tokens": r.tokens, "bytes": r.bytes})
    return rows


def held_out_texts(path: str, eval_chars: int | None = None) -> list[str]:
    from stillroom.inputs.text import load_texts

    texts = [t for _, t in load_texts(path)]
    return [t[:eval_chars] for t in texts] if eval_chars else texts


def run_demo(opts: DemoOptions | None = None, console: Console | None = None) -> DemoResult:
    """Run the whole pipeline; returns the results table and writes ``OUT/report.md``."""
    from transformers.utils import logging as hf_logging

    from stillroom.training.run import train

    hf_logging.disable_progress_bar()  # one Rich progress per stage, not a bar per weight load
    opts = opts or DemoOptions()
    console = console or Console()
    check_options(opts)
    out = Path(opts.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(title: str) -> float:
        if seconds:
            console.print(f"({list(seconds)[-1]}: {list(seconds.values())[-1]:.1f} s)", highlight=False)
        console.rule(f"[bold]{title}")
        return time.perf_counter()

    t0 = stage("1/5 vocabulary maps (teacher → student: exact bytes, then minimum edit distance)")
    build_vocab_maps(opts, out, console)
    seconds["vocab maps"] = time.perf_counter() - t0

    t0 = stage("2/5 offline teacher caches (top-k, compact, resumable)")
    caches = build_caches(opts, out, console)
    seconds["teacher caches"] = time.perf_counter() - t0

    t0 = stage(f"3/5 fused student ({opts.fusion_method} at {opts.fusion_level} level, λ = {opts.ce_weight})")
    fused = train(opts.recipe("demo-fused", out / "fused", list(zip(opts.teachers, caches, strict=True))))
    seconds["fused student"] = time.perf_counter() - t0
    t0 = stage("4/5 CE-only baseline (same architecture, data, steps and seed; no teachers)")
    baseline = train(opts.recipe("demo-ce-only", out / "ce-only"))
    seconds["CE-only student"] = time.perf_counter() - t0

    t0 = stage("5/5 evaluation on held-out works (bits per byte: lower is better)")
    folders = [*[(t, "teacher") for t in opts.teachers], (fused.output_dir, "fused student"),
               (baseline.output_dir, "CE-only student")]
    rows = evaluate_folders(folders, held_out_texts(opts.test, opts.eval_chars))
    seconds["evaluation"] = time.perf_counter() - t0
    print_rows(rows, console)

    result = DemoResult(out, rows, seconds)
    write_report(result, opts, fused.history, baseline.history)
    console.print(f"\nreport: {out / 'report.md'}")
    return result


def print_rows(rows: list[dict], console: Console) -> None:
    from rich.table import Table

    console.print("held-out bits per byte: lower is better, comparable across tokenizers", highlight=False,
                  soft_wrap=True)
    table = Table(title="held-out evaluation")
    for col in ("model", "role", "bits/byte", "token ppl", "tokens", "bytes"):
        table.add_column(col, justify="left" if col in ("model", "role") else "right")
    for r in rows:
        table.add_row(r["model"], r["role"], f"{r['bits_per_byte']:.4f}", f"{r['token_perplexity']:.2f}",
                      f"{r['tokens']:,}", f"{r['bytes']:,}")
    console.print(table)


def write_report(result: DemoResult, opts: DemoOptions, fused_history: list[dict],
                 baseline_history: list[dict]) -> None:
    """``report.md`` + ``results.json`` + ``loss_curves.png`` + ``bits_per_byte.png`` in ``result.out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stillroom.training.report import compare_panels, plot_panels

    out = result.out
    # Like with like: the fused student's CE part against the CE-only student's CE (not its λ·CE + (1−λ)·KD
    # total), and validation bits per byte where evaluated; the plotted series go to results.json as well.
    curves = compare_panels({"fused student": fused_history, "CE-only student": baseline_history})
    plot_panels(curves, out / "loss_curves.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['model']}\n({r['role']})" for r in result.rows]
    ax.bar(range(len(labels)), [r["bits_per_byte"] for r in result.rows],
           color=["#999999" if r["role"] == "teacher" else "#3366cc" for r in result.rows])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("bits per byte (held-out)")
    ax.set_title("held-out bits per byte (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "bits_per_byte.png", dpi=120)
    plt.close(fig)

    opts_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}
    curves_json = {panel: {name: {"step": x, "value": y} for name, (x, y) in series.items()}
                   for panel, series in curves.items()}
    (out / "results.json").write_text(json.dumps({"rows": result.rows, "seconds": result.seconds,
                                                  "options": opts_dict, "curves": curves_json}, indent=2),
                                      encoding="utf-8")
    table = "\n".join(f"| {r['model']} | {r['role']} | {r['bits_per_byte']:.4f} | {r['token_perplexity']:.2f} | "
                      f"{r['tokens']:,} | {r['bytes']:,} |" for r in result.rows)
    timing = "\n".join(f"| {k} | {v:.1f} |" for k, v in result.seconds.items())
    by_role = {r["role"]: r["bits_per_byte"] for r in result.rows}
    verdict = ""
    if "fused student" in by_role and "CE-only student" in by_role:
        gain = by_role["CE-only student"] - by_role["fused student"]
        verdict = (f"\nThe fused student is **{abs(gain):.4f} bits/byte {'better' if gain > 0 else 'worse'}** than "
                   f"the CE-only student trained with the same steps, data and seed (one seed here; "
                   f"`python -m bench.fusion` repeats it over seeds with single-teacher KD students too).\n")
    (out / "report.md").write_text(f"""# stillroom demo report

Teachers: {', '.join(f'`{t}`' for t in opts.teachers)}. Student tokenizer: `{opts.student_tokenizer}`;
student `{opts.student_config}` trained from scratch for {opts.steps} steps of {opts.batch_size} × {opts.seq_len}
tokens (seed {opts.seed}). Fusion: {opts.fusion_method} at {opts.fusion_level} level, top-{opts.top_k},
λ = {opts.ce_weight}, temperature {opts.temperature}, projection `{opts.projection}`.

## Held-out results (`{opts.test}`)

| model | role | bits/byte | token ppl | tokens | bytes |
|---|---|---|---|---|---|
{table}
{verdict}
Bits per byte = total negative log-likelihood of the text in bits ÷ its UTF-8 bytes: comparable across models
with different tokenizers (token perplexity is not).

Training curves (`loss_curves.png`): each student's cross-entropy of the gold next token on its training
batches (for the fused student the CE part of its loss, not the λ·CE + (1−λ)·KD total), and validation bits per
byte every {max(1, opts.steps // 5)} steps.

![loss curves](loss_curves.png)

![bits per byte](bits_per_byte.png)

## Time (seconds)

| stage | seconds |
|---|---|
{timing}
""", encoding="utf-8")
