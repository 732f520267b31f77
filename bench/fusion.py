"""Does fusion help? A small-scale reproduction of FuseLLM's claim on the embedded default.

With equal steps, data and seeds, train from scratch (student = a third tokenizer, GPT-2 architecture):
- a fused student per fusion method (both teachers at sequence level, λ·CE + (1−λ)·fusion; MinCE, as
  FuseLLM and the demo, and AvgCE),
- one single-teacher KD student per teacher (same loss, one teacher),
- a CE-only student (no teachers),
and report held-out bits per byte (mean ± spread over seeds; printed, and written to ``OUT/report.md`` and
``OUT/bench_fusion.json``). Defaults are the demo's: λ = 0.5, projection
``prefix`` (``--ce-weight 0.9 --projection onehot`` is FuseLLM's own setting). The claim holds when
fused < best single-teacher KD < CE-only and the fused vs CE-only gap exceeds the seed-to-seed spread.

``--emo`` adds the EMO paper's claim: continued training of a pretrained teacher with EMO vs plain CE, same
steps, data and seed, reported whatever the outcome.

    python -m bench.fusion                      # 3 seeds, 300 steps each, plus --emo
    python -m bench.fusion --seeds 0 --steps 50 # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import console, machine, print_table, spread, summary  # noqa: E402
from stillroom.demo import (  # noqa: E402
    DemoOptions,
    build_caches,
    build_vocab_maps,
    evaluate_folders,
    held_out_texts,
    teacher_names,
)


def run_fusion(opts: DemoOptions, seeds: list[int], out: Path, methods: list[str], only: list[str] | None = None
               ) -> dict[str, list[float]]:
    from transformers.utils import logging as hf_logging

    from stillroom.training.run import train

    hf_logging.disable_progress_bar()
    names = teacher_names(opts)
    build_vocab_maps(opts, out, console)
    caches = build_caches(opts, out, console)
    pairs = list(zip(opts.teachers, caches, strict=True))
    configs = {**{f"fused-{m}": (pairs, m) for m in methods},
               **{f"kd-{n}": ([p], methods[0]) for n, p in zip(names, pairs, strict=True)}, "ce-only": ([], methods[0])}
    if only:
        configs = {k: v for k, v in configs.items() if k in only}
    texts = held_out_texts(opts.test, opts.eval_chars)
    results: dict[str, list[float]] = {k: [] for k in configs}
    for seed in seeds:
        opts.seed = seed
        for name, (teachers, method) in configs.items():
            console.rule(f"seed {seed}: {name}")
            t = time.perf_counter()
            opts.fusion_method = method
            res = train(opts.recipe(f"bench-{name}", out / f"seed{seed}" / name, teachers))
            bpb = evaluate_folders([(res.output_dir, name)], texts)[0]["bits_per_byte"]
            results[name].append(bpb)
            console.print(f"{name} seed {seed}: {bpb:.4f} bits/byte ({time.perf_counter() - t:.0f} s)")
    teacher_rows = evaluate_folders([(t, "teacher") for t in opts.teachers], texts)
    for r in teacher_rows:
        results[f"teacher {r['model']}"] = [r["bits_per_byte"]]
    return results


def run_emo(opts: DemoOptions, steps: int, seed: int, out: Path) -> dict[str, float]:
    """Continue training the first teacher on the train works with CE, and with EMO (mode 1, fixed cost)."""
    from stillroom.training.run import train

    teacher = opts.teachers[0]
    texts = held_out_texts(opts.test, opts.eval_chars)
    base = evaluate_folders([(teacher, "pretrained")], texts)[0]["bits_per_byte"]
    rows = {"pretrained (no further training)": base}
    for label, loss in (("continued with CE", {"kind": "forward_kl", "ce_weight": 1.0}),
                        ("continued with EMO (mode 1, fixed cost)", {"kind": "emo", "ce_weight": 1.0,
                                                                     "emo_mode": 1, "emo_cost": "fixed"})):
        recipe = {"name": f"bench-emo-{loss['kind']}", "student": teacher, "teachers": [],
                  "data": {"train": opts.train, "eval": opts.validation, "seq_len": opts.seq_len},
                  "loss": loss,
                  "train": {"output_dir": str(out / "emo" / loss["kind"]), "max_steps": steps,
                            "batch_size": opts.batch_size, "lr": 3e-4, "warmup_steps": 10, "seed": seed,
                            "logging_steps": 10}}
        res = train(recipe)
        rows[label] = evaluate_folders([(res.output_dir, label)], texts)[0]["bits_per_byte"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-fusion"))
    ap.add_argument("--eval-chars", type=int, default=None)
    ap.add_argument("--ce-weight", type=float, default=0.5)
    ap.add_argument("--projection", default="prefix")
    ap.add_argument("--fusion-level", default="sequence")
    ap.add_argument("--fusion-methods", default="min_ce,avg_ce",
                    help="one fused student per method (min_ce = FuseLLM's and the demo's)")
    ap.add_argument("--arms", default=None, help="comma-separated subset of the students (e.g. fused-min_ce,ce-only)")
    ap.add_argument("--emo", action="store_true", help="also run the EMO vs CE continued-training comparison")
    ap.add_argument("--emo-steps", type=int, default=100)
    ap.add_argument("--no-fusion", action="store_true", help="only the EMO comparison")
    args = ap.parse_args()
    opts = DemoOptions(out=args.out, steps=args.steps, eval_chars=args.eval_chars, ce_weight=args.ce_weight,
                       projection=args.projection, fusion_level=args.fusion_level)
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"machine: {machine()}")
    record: dict = {"options": {k: str(v) for k, v in vars(args).items()}}
    line = []
    if not args.no_fusion:
        methods = args.fusion_methods.split(",")
        res = run_fusion(opts, args.seeds, args.out, methods, args.arms.split(",") if args.arms else None)
        rows = []
        for name, vals in res.items():
            rows.append([name, statistics.fmean(vals), spread(vals), " ".join(f"{v:.4f}" for v in vals)])
        print_table(f"held-out bits per byte, {args.steps} steps, seeds {args.seeds}",
                    ["student", "mean bits/byte", "± spread (half range)", "per seed"], rows)
        mean = {k: statistics.fmean(v) for k, v in res.items()}
        kd = {k: v for k, v in mean.items() if k.startswith("kd-")}
        record["fusion"] = res
        complete = kd and "ce-only" in mean and all(f"fused-{m}" in mean for m in methods)
        if not complete:
            line.append("a subset of the students ran (--arms): no verdict; " + ", ".join(
                f"{k} {v:.4f}" for k, v in mean.items() if not k.startswith("teacher ")))
        best_kd = min(kd, key=kd.get) if complete else ""
        for m in methods if complete else ():
            f = f"fused-{m}"
            gap = mean["ce-only"] - mean[f]
            noise = max(spread(res[f]), spread(res["ce-only"]))
            holds = mean[f] < mean[best_kd] < mean["ce-only"] and gap > noise
            line.append(f"{f} {mean[f]:.4f} vs best KD ({best_kd}) {mean[best_kd]:.4f} vs CE-only "
                        f"{mean['ce-only']:.4f} bits/byte; gap {gap:.4f} vs spread {noise:.4f}: claim "
                        f"{'HOLDS' if holds else 'does NOT hold'}")
    if args.emo or args.no_fusion:
        emo = run_emo(opts, args.emo_steps, args.seeds[0], args.out)
        print_table("EMO vs CE, continued training of a pretrained teacher (held-out bits per byte)",
                    ["model", "bits/byte"], [[k, v] for k, v in emo.items()])
        record["emo"] = emo
        ce, em = emo["continued with CE"], emo["continued with EMO (mode 1, fixed cost)"]
        line.append(f"EMO {em:.4f} vs CE {ce:.4f} bits/byte after {args.emo_steps} steps")
    (args.out / "bench_fusion.json").write_text(json.dumps(record, indent=2))
    (args.out / "report.md").write_text(report_md(record, args, line), encoding="utf-8")
    summary("; ".join(line))


def report_md(record: dict, args: argparse.Namespace, verdicts: list[str]) -> str:
    """The benchmark's results as Markdown: mean ± spread per student, per-seed values, the verdicts."""
    out = [f"# bench.fusion report\n\nmachine: {machine()}\n\n`python -m bench.fusion "
           f"--steps {args.steps} --seeds {' '.join(map(str, args.seeds))} --ce-weight {args.ce_weight} "
           f"--projection {args.projection} --fusion-level {args.fusion_level}`\n"]
    if "fusion" in record:
        out.append("| student | mean bits/byte | ± spread (half range) | per seed |\n|---|---|---|---|")
        for name, vals in record["fusion"].items():
            out.append(f"| {name} | {statistics.fmean(vals):.4f} | {spread(vals):.4f} | "
                       f"{' '.join(f'{v:.4f}' for v in vals)} |")
        out.append("")
    if "emo" in record:
        out.append("| continued training of a teacher | bits/byte |\n|---|---|")
        out.extend(f"| {k} | {v:.4f} |" for k, v in record["emo"].items())
        out.append("")
    out.extend(f"- {v}" for v in verdicts)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
