"""Cross-tokenizer objectives on the embedded default: CE only, KD via MinED (onehot), prefix and next_bytes projection,
ULD, ALM (exact / unbiased chunks), ALM + prefix KD — one cross-tokenizer teacher, same data, steps and seeds.

Each arm trains the demo's from-scratch student (``stillroom.demo.DemoOptions``: λ = 0.5, lr 2e-3, batch 8,
seq 128) from the teacher's offline cache, then scores held-out bits per byte on the test works. Also reports
training tokens/s and the cache's bytes per teacher token (the top-k cache the KD/ULD arms read, and a top-1
cache, which is all ALM needs: ALM reads only ``gold_ce``). Results are appended to ``OUT/results.jsonl`` as
each run finishes, so a cut-short benchmark keeps what it did.

    python -m bench.objectives                            # 3 seeds, 300 steps
    python -m bench.objectives --seeds 0 --steps 100      # quick look
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

from bench.common import cache_bytes_per_token, console, machine, print_table, spread, summary  # noqa: E402
from stillroom.demo import DemoOptions, build_caches, build_vocab_maps, evaluate_folders, held_out_texts  # noqa: E402

PROJECTION = {"kd-mined": "onehot", "kd-next_bytes": "next_bytes"}  # every other arm with a KD term: prefix


def arms(teacher: str, cache: str, cache1: str) -> dict[str, list[dict]]:
    """Arm name -> teacher entries of the recipe (projection set per arm in ``run``)."""
    kd = {"path": teacher, "cache": cache, "name": "kd"}
    return {
        "ce-only": [],
        "kd-mined": [kd],
        "kd-prefix": [kd],
        "kd-next_bytes": [kd],
        "uld": [{**kd, "name": "uld", "objective": "uld"}],
        "alm": [{"path": teacher, "cache": cache1, "name": "alm", "objective": "alm"}],
        "alm-unbiased": [{"path": teacher, "cache": cache1, "name": "alm", "objective": "alm", "alm_chunks": "unbiased"}],
        "alm+kd-prefix": [kd, {"path": teacher, "cache": cache1, "name": "alm", "objective": "alm"}],
    }


def run(opts: DemoOptions, seeds: list[int], out: Path, teacher_index: int, only: list[str] | None) -> list[dict]:
    from transformers.utils import logging as hf_logging

    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.training.run import train

    hf_logging.disable_progress_bar()
    build_vocab_maps(opts, out, console)
    caches = build_caches(opts, out, console)
    teacher, cache = opts.teachers[teacher_index], caches[teacher_index]
    cache1 = out / "cache-top1" / Path(teacher).name
    write_cache(OnlineTeacher(teacher, top_k=1, temperature=opts.temperature), out / "train_blocks.jsonl", cache1,
                console=console)
    sizes = {"top-k": cache_bytes_per_token(Path(cache)), "top-1": cache_bytes_per_token(cache1)}
    console.print(f"cache bytes/teacher token: top-{opts.top_k} {sizes['top-k']:.2f}, top-1 {sizes['top-1']:.2f}")
    texts = held_out_texts(opts.test, opts.eval_chars)
    rows = []
    for seed in seeds:
        opts.seed = seed
        for name, teachers in arms(teacher, cache, str(cache1)).items():
            if only and name not in only:
                continue
            console.rule(f"seed {seed}: {name}")
            recipe = opts.recipe(f"bench-{name}", out / f"seed{seed}" / name)
            recipe["teachers"] = teachers
            recipe["loss"]["ce_weight"] = opts.ce_weight if teachers else 1.0
            recipe["fusion"]["projection"] = PROJECTION.get(name, "prefix")
            recipe["train"]["eval_steps"] = None  # the held-out score below is the result
            t = time.perf_counter()
            res = train(recipe)
            secs = res.metrics.get("train_runtime") or (time.perf_counter() - t)
            bpb = evaluate_folders([(res.output_dir, name)], texts)[0]["bits_per_byte"]
            row = {"arm": name, "seed": seed, "steps": opts.steps, "bpb": bpb,
                   "tokens_per_s": opts.steps * opts.batch_size * opts.seq_len / secs, "cache_bytes_per_token":
                   0.0 if not teachers else sizes["top-1"] if name in ("alm", "alm-unbiased") else sizes["top-k"]}
            rows.append(row)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            console.print(f"{name} seed {seed}: {bpb:.4f} bits/byte, {row['tokens_per_s']:.0f} tokens/s")
    return rows


def report(rows: list[dict]) -> None:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["arm"], []).append(r)
    table = []
    for name, rs in by.items():
        b = [r["bpb"] for r in rs]
        table.append((name, len(b), f"{statistics.mean(b):.4f} ± {spread(b):.4f}",
                      f"{statistics.median(r['tokens_per_s'] for r in rs):.0f}", f"{rs[0]['cache_bytes_per_token']:.2f}"))
    print_table(f"held-out bits/byte ({machine()})", ["arm", "seeds", "bpb mean ± half-range", "tokens/s",
                                                      "cache B/token"], table)
    best = min(by, key=lambda k: statistics.mean(r["bpb"] for r in by[k]))
    summary(f"best arm {best}: {statistics.mean(r['bpb'] for r in by[best]):.4f} bits/byte")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-objectives"))
    ap.add_argument("--eval-chars", type=int, default=None)
    ap.add_argument("--teacher", type=int, default=1, help="index into the demo's teachers (1 = teacher-spm)")
    ap.add_argument("--arms", default=None, help="comma-separated subset of arms")
    ap.add_argument("--report-only", action="store_true", help="print the table of OUT/results.jsonl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        opts = DemoOptions(out=args.out, steps=args.steps, eval_chars=args.eval_chars)
        run(opts, args.seeds, args.out, args.teacher, args.arms.split(",") if args.arms else None)
    rows = [json.loads(x) for x in (args.out / "results.jsonl").read_text().splitlines()]
    report(rows)


if __name__ == "__main__":
    main()
