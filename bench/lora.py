"""LoRA students vs full fine-tuning: peak memory and tokens/s of the same distillation step, side by side.

The student is cut from SmolLM2-135M-Instruct (``bench.real_fusion``'s layers), the teacher is SmolLM2 itself
(same tokenizer, top-10 online KD, λ = 0.9), the data the shared corpus's training works in blocks of
``--seq-len``. Two configurations, each in its own fresh process (peak RSS is per process), alternated over
``--repeats`` so a machine's drift hits both alike:

- ``full``: every student weight trains (AdamW state for all of them);
- ``lora``: ``student.lora`` with ``--rank`` on every linear layer but the head (``all-linear``); only the
  adapters train.

Tokens/s counts the student tokens of the timed steps (after ``--warmup``); medians over the repeats. Ends with a
``SUMMARY:`` line.

    python -m bench.lora --steps 6 --warmup 2 --repeats 2
    python -m bench.lora --steps 3 --warmup 1 --repeats 1 --batch 1 --seq-len 32   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import machine, medians, peak_rss_gb, print_table, run_child, summary  # noqa: E402

CONFIGS = ("full", "lora")


def child(config: str, args: argparse.Namespace) -> dict:
    """One configuration's training run; returns tokens/s and peak RSS."""
    import torch

    from bench.common import StepTimer
    from bench.real_fusion import TEST_WORKS, VALIDATION_WORKS
    from stillroom.training.run import train

    torch.set_num_threads(args.threads)
    works = sorted(p for p in Path(args.corpus).glob("*.txt") if p.name not in TEST_WORKS + VALIDATION_WORKS)
    timer = StepTimer(args.warmup)
    student = {"init_from": args.smollm2, "layers": args.layers}
    if config == "lora":
        student["lora"] = {"r": args.rank, "alpha": 2.0 * args.rank, "target_modules": "all-linear"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in works[:4]), encoding="utf-8")
        steps = args.warmup + args.steps
        train({"student": student, "teachers": [{"path": args.smollm2}],
               "data": {"train": str(data), "seq_len": args.seq_len, "max_blocks": steps * args.batch},
               "loss": {"ce_weight": 0.9}, "fusion": {"top_k": 10},
               "train": {"output_dir": str(Path(tmp) / "out"), "max_steps": steps, "batch_size": args.batch,
                         "lr": 1e-4, "logging_steps": steps, "progress": False, "plot": False,
                         "threads": args.threads}}, callbacks=[timer.callback()])
    tokens = timer.steps * args.batch * args.seq_len
    return {"tokens_per_s": tokens / timer.seconds, "peak_rss_gb": peak_rss_gb()}


def main(argv: list[str] | None = None) -> dict:
    from bench.real_fusion import CORPUS, LAYERS, SMOLLM2

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smollm2", default=SMOLLM2)
    ap.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--child", choices=CONFIGS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--json",)]
    if args.json is not None:
        i = passed.index(str(args.json))
        passed = passed[:i] + passed[i + 1:]
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for c in CONFIGS:
            runs[c].append(run_child("bench.lora", [*passed, "--child", c]))
    result = medians(runs)
    result["machine"] = machine()
    rows = [[c, f"{result[c]['tokens_per_s']:.1f}", f"{result[c]['peak_rss_gb']:.2f}"] for c in CONFIGS
            if "tokens_per_s" in result.get(c, {})]
    print_table(f"LoRA r={args.rank} vs full fine-tuning (student cut from SmolLM2, {args.batch}×{args.seq_len})",
                ["config", "tokens/s", "peak RSS (GB)"], rows)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": result}, indent=1))
    f, lo = result.get("full", {}), result.get("lora", {})
    if "tokens_per_s" in f and "tokens_per_s" in lo:
        summary(f"LoRA r={args.rank} {lo['tokens_per_s']:.1f} vs full {f['tokens_per_s']:.1f} tokens/s "
                f"({lo['tokens_per_s'] / f['tokens_per_s']:.2f}x), peak RSS {lo['peak_rss_gb']:.2f} vs "
                f"{f['peak_rss_gb']:.2f} GB ({f['peak_rss_gb'] / lo['peak_rss_gb']:.2f}x less)")
    else:
        summary(f"a configuration failed: {runs}")
    return result


if __name__ == "__main__":
    main()
