"""Distillation step throughput and peak memory: stillroom's DistillTrainer vs TRL's GKDTrainer.

    flock /tmp/stillroom-heavy.lock .venv/bin/python -m bench.train [--steps 30] [--threads 2] [--repeats 3]

Same student (GPT-2 4 layers × 256), teacher (GPT-2 8 layers × 512, random weights: speed does not depend
on them), byte-level BPE vocabulary of 8,000 trained on the shipped corpus, batch 4 × 256 tokens, fp32 on
CPU, off-policy (TRL ``lmbda=0``) so both do the same work: teacher forward, student forward/backward,
generalised JSD (β = 0.5, no CE term), AdamW. Each configuration runs in a fresh process (peak RSS is per
process); tokens/s is measured over the steps after the first 5 (warm-up). Configurations run round-robin
``--repeats`` times; the table shows medians.

Configurations:
- ``trl_gkd``: TRL ``GKDTrainer`` (dense logits of both models, dense JSD);
- ``sr_dense``: stillroom, online teacher, dense JSD through the chunked fused-linear loss (teacher hidden
  states × its head, chunk by chunk; no B×T×V tensor for either model);
- ``sr_topk``: stillroom, online teacher, JSD on the teacher's top-10 + tail;
- ``sr_cache``: stillroom, the teacher's top-10 read from the offline cache (built untimed beforehand);
- ``ce_loop``: a hand-written CE-only loop on the same student (the limit for any distillation step);
- ``sr_ce``: stillroom's trainer with no teacher (CE only), for the trainer's own overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, WARM = 4, 5
SIZES = {"full": dict(vocab=8000, seq=256, student=(4, 256, 4), teacher=(8, 512, 8)),
         "small": dict(vocab=1000, seq=64, student=(2, 64, 4), teacher=(2, 96, 4))}  # a smoke run, seconds
CONFIGS = ("trl_gkd", "sr_dense", "sr_topk", "sr_cache", "ce_loop", "sr_ce")


def build_assets(root: Path, steps: int, size: str = "full") -> None:
    """Tokenizer, student, teacher, blocks (JSONL) and the teacher's top-10 cache, under ``root``."""
    from bench.common import build_pair, write_blocks
    from stillroom.inputs.blocks import make_blocks
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher

    sz = SIZES[size]
    tok, texts = build_pair(root, sz, n_positions=sz["seq"], chars=20000 if size == "small" else None)
    blocks = make_blocks([(f"w{i}", t) for i, t in enumerate(texts)], tok, sz["seq"], add_bos=False)
    blocks = [b for b in blocks if len(b.input_ids) >= sz["seq"] - 8][: BATCH * (steps + 2)]
    write_blocks(root / "blocks.jsonl", blocks)
    teacher = OnlineTeacher(str(root / "teacher"), top_k=10, max_length=sz["seq"])
    write_cache(teacher, [(b.example_id, b.text) for b in blocks], root / "cache", progress=False)


def child(config: str, root: Path, steps: int, threads: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from bench.common import StepTimer, disable_dropout, gkd_collator, peak_rss_gb, read_blocks, trainer_args
    from stillroom.inputs.blocks import BlockCollator, BlockDataset
    from stillroom.teachers.kd import AlignedTeacher, SameTokenizerTeacher
    from stillroom.training.recipe import FusionSpec, LossSpec
    from stillroom.training.trainer import DistillTrainer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(root / "student")
    blocks = read_blocks(root / "blocks.jsonl")
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    collate = BlockCollator(tok, seq)
    timer = StepTimer(WARM)

    if config == "ce_loop":
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        student.train()
        for step in range(steps):
            if step == WARM:
                t0 = time.perf_counter()
            batch = collate([BlockDataset(blocks)[i] for i in range(step * BATCH, (step + 1) * BATCH)])
            loss = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        elapsed, measured = time.perf_counter() - t0, steps - WARM
    else:
        common = trainer_args(root / f"out-{config}", steps, BATCH)
        if config == "trl_gkd":
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32)
            args = GKDConfig(**common, lmbda=0.0, beta=0.5, temperature=1.0, max_length=seq, disable_dropout=True)
            from datasets import Dataset

            ds = Dataset.from_list([{"input_ids": b.input_ids, "text": b.text, "example_id": b.example_id}
                                    for b in blocks])
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                 processing_class=tok, data_collator=gkd_collator(collate),
                                 callbacks=[timer.callback()])
        else:
            teachers = []
            loss = LossSpec(kind="jsd", ce_weight=0.0, beta=0.5)
            if config in ("sr_dense", "sr_topk"):
                teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32)
                teachers = [SameTokenizerTeacher(teacher, top_k=None if config == "sr_dense" else 10)]
            elif config == "sr_cache":
                from stillroom.teachers.cache import CachedTeacher
                from stillroom.tokenization.tokens import TokenTable
                from stillroom.tokenization.vocab import VocabMap

                table = TokenTable.from_tokenizer(tok)
                teachers = [AlignedTeacher(CachedTeacher(root / "cache"), table, table, VocabMap.cached(table, table))]
            else:  # sr_ce
                loss = LossSpec(kind="forward_kl", ce_weight=1.0)
            disable_dropout(student)  # as GKD's disable_dropout
            trainer = DistillTrainer(model=student, args=TrainingArguments(**common),
                                     train_dataset=BlockDataset(blocks), data_collator=collate, teachers=teachers,
                                     loss=loss, fusion=FusionSpec(), callbacks=[timer.callback()])
        trainer.train()
        elapsed, measured = timer.seconds, timer.steps
    return {"config": config, "tokens_per_s": measured * BATCH * seq / elapsed, "peak_rss_gb": peak_rss_gb(),
            "steps_timed": measured}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration (medians reported)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.root), a.steps, a.threads, SIZES[a.size]["seq"])), flush=True)
        return

    import torch

    from bench.common import console, machine, medians, print_table, run_child, summary

    torch.set_num_threads(a.threads)  # what machine() reports; each child sets its own

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        console.print("building tokenizer (vocab 8,000), student, teacher, blocks and the teacher cache …")
        build_assets(root, a.steps, a.size)
        runs: dict[str, list[dict]] = {c: [] for c in a.configs.split(",")}
        for rep in range(a.repeats):  # round-robin, so a slow patch of a noisy machine hits every config
            for config in runs:
                r = run_child("bench.train", ["--child", config, "--root", str(root), "--steps", str(a.steps),
                                              "--threads", str(a.threads), "--size", a.size])
                runs[config].append(r)
                console.print(f"repeat {rep + 1}/{a.repeats}", config, r)
        results = medians(runs)
    gkd = results.get("trl_gkd", {}).get("tokens_per_s")
    rows = []
    for c, r in results.items():
        if "error" in r:
            rows.append([c, "error", str(r["error"]), "", ""])
            continue
        ratio = f"{r['tokens_per_s'] / gkd:.2f}×" if gkd else ""
        rows.append([c, round(r["tokens_per_s"]), " ".join(str(round(x)) for x in r.get("all_tokens_per_s", [])),
                     f"{r['peak_rss_gb']:.2f}", ratio])
    print_table(f"distillation step, batch {BATCH}×{SIZES[a.size]['seq']}, {a.steps} steps, median of {a.repeats} "
                f"({machine()})", ["config", "tokens/s", "per run", "peak RSS GB", "vs TRL GKD"], rows)

    def tps(c):
        return results.get(c, {}).get("tokens_per_s", float("nan"))

    def mem(c):
        return results.get(c, {}).get("peak_rss_gb", float("nan"))

    summary(f"TRL GKD {tps('trl_gkd'):.0f} tok/s {mem('trl_gkd'):.2f} GB; stillroom online dense "
            f"{tps('sr_dense'):.0f} tok/s ({tps('sr_dense') / tps('trl_gkd'):.2f}x) {mem('sr_dense'):.2f} GB, "
            f"online top-10 {tps('sr_topk'):.0f} ({tps('sr_topk') / tps('trl_gkd'):.2f}x), cache "
            f"{tps('sr_cache'):.0f} ({tps('sr_cache') / tps('trl_gkd'):.2f}x, {tps('sr_cache') / tps('ce_loop'):.0%} "
            f"of CE loop {tps('ce_loop'):.0f}) {mem('sr_cache'):.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
