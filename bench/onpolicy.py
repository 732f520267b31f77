"""On-policy distillation throughput and peak memory: stillroom's OnPolicyTrainer vs TRL's GKDTrainer.

    flock /tmp/stillroom-heavy.lock .venv/bin/python -m bench.onpolicy [--steps 16] [--repeats 3] [--size full]

Same student (GPT-2 4 × 256) and teacher (GPT-2 8 × 512, random weights: speed does not depend on them) on one
byte-level BPE vocabulary of 8,000 trained on the shipped corpus, with stillroom's plain chat template set on
the tokenizer so both trainers render the prompts identically; the shipped chat set's prompts
(``stillroom/data/chat/train.jsonl``), batch 4, rows of at most 128 tokens, 64 sampled tokens at temperature
1.0 (top-p 1), generalised JSD (β = 0.5, no CE term) on the dense teacher distribution, AdamW, fp32 on CPU.
λ = 1 and λ = 0.5. Both take the same λ choices: TRL's coin (``random.random() <= lmbda``) is replaced by
stillroom's (seed, step) coin for each step, so the two do the same number of sampled steps.

tokens/s = completion tokens trained (labels ≠ -100, counted in each trainer's ``compute_loss``) per second of
wall time over the steps after the first ``WARM`` (warm-up). Each configuration runs in a fresh process (peak
RSS is per process), round-robin ``--repeats`` times; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, WARM, SEED = 4, 3, 0
SIZES = {"full": dict(vocab=8000, max_len=128, new=64, student=(4, 256, 4), teacher=(8, 512, 8)),
         "small": dict(vocab=1000, max_len=64, new=16, student=(2, 64, 4), teacher=(2, 96, 4))}  # a smoke run
CONFIGS = ("trl_l1", "sr_l1", "trl_l05", "sr_l05")


def build_assets(root: Path, size: str) -> None:
    """Tokenizer (with a chat template), student, teacher and the chat records, under ``root``."""
    from stillroom.chat import FALLBACK_TEMPLATE
    from stillroom.data_io import PACKAGE_DATA
    from stillroom.testing import corpus_texts, save_pair, tiny_gpt2, train_byte_bpe

    sz = SIZES[size]
    texts = corpus_texts("train")
    if size == "small":
        texts = [t[:20000] for t in texts]
    chunks = [t[i:i + 2000] for t in texts for i in range(0, len(t), 2000)]
    tok = train_byte_bpe(chunks, vocab_size=sz["vocab"])
    tok.chat_template = FALLBACK_TEMPLATE
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    kw = dict(bos_token_id=eot, eos_token_id=eot, n_positions=256)
    for name, (layers, width, heads), seed in (("student", sz["student"], 0), ("teacher", sz["teacher"], 1)):
        save_pair(tiny_gpt2(len(tok), n_layer=layers, n_embd=width, n_head=heads, seed=seed, **kw), tok, root / name)
    (root / "chat.jsonl").write_text((PACKAGE_DATA / "chat" / "train.jsonl").read_text(encoding="utf-8"),
                                     encoding="utf-8")


def child(config: str, root: Path, steps: int, threads: int, size: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

    from bench.common import peak_rss_gb
    from stillroom import chat, onpolicy
    from stillroom.trainer import FusionConfig, LossConfig, SameTokenizerTeacher

    sz = SIZES[size]
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    lam = {"l1": 1.0, "l05": 0.5}[config.split("_")[1]]
    tok = AutoTokenizer.from_pretrained(root / "student")
    student = AutoModelForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32)
    counted = {"tokens": 0}

    class StepTimer(TrainerCallback):
        t0 = t1 = None
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARM:
                self.t0 = time.perf_counter()
            elif state.global_step > WARM:
                self.steps, self.t1 = state.global_step - WARM, time.perf_counter()

    def count(trainer, inputs) -> None:
        if trainer.state.global_step >= WARM:  # the step being computed is a timed one
            counted["tokens"] += int(inputs["labels"][:, 1:].ne(-100).sum())

    timer = StepTimer()
    common = dict(output_dir=str(root / f"out-{config}"), max_steps=steps, per_device_train_batch_size=BATCH,
                  learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True,
                  disable_tqdm=True, dataloader_num_workers=0, seed=SEED, remove_unused_columns=False,
                  lr_scheduler_type="constant")
    if config.startswith("trl"):
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Trl(GKDTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                self.lmbda = 1.0 if onpolicy.coin(SEED, self.state.global_step, lam) else 0.0  # stillroom's coin
                return super().training_step(model, inputs, num_items_in_batch)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                count(self, inputs)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        rows = [json.loads(x) for x in (root / "chat.jsonl").read_text().splitlines()]
        ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        args = GKDConfig(**common, lmbda=lam, beta=0.5, temperature=1.0, max_new_tokens=sz["new"],
                         max_length=sz["max_len"], disable_dropout=True)
        trainer = Trl(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[timer])
    else:
        class Sr(onpolicy.OnPolicyTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                count(self, inputs)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        for m in student.modules():  # as GKD's disable_dropout
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        examples = chat.load_examples(root / "chat.jsonl")
        collate = (onpolicy.PromptCollator(tok, sz["max_len"], sz["new"]) if lam == 1.0
                   else chat.CompletionCollator(tok, sz["max_len"]))
        cfg = onpolicy.OnPolicyConfig(lam, 1.0, 1.0, sz["new"], SEED, sz["max_len"])
        trainer = Sr(model=student, args=TrainingArguments(**common), train_dataset=chat.ExampleDataset(examples),
                     data_collator=collate, processing_class=tok, teachers=[SameTokenizerTeacher(teacher, top_k=None)],
                     loss=LossConfig(kind="jsd", ce_weight=0.0, beta=0.5), fusion=FusionConfig(), callbacks=[timer],
                     onpolicy=cfg)
    trainer.train()
    elapsed = timer.t1 - timer.t0
    sampled = sum(onpolicy.coin(SEED, s, lam) for s in range(WARM, steps))
    return {"config": config, "tokens_per_s": counted["tokens"] / elapsed, "tokens": counted["tokens"],
            "seconds": elapsed, "sampled_steps": sampled, "steps_timed": timer.steps, "peak_rss_gb": peak_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration (medians reported)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.root), a.steps, a.threads, a.size)), flush=True)
        return

    import torch

    from bench.common import console, machine, print_table, run_child, summary

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-onpolicy-") as tmp:
        root = Path(tmp)
        console.print(f"building tokenizer (vocab {SIZES[a.size]['vocab']:,}), student, teacher …")
        build_assets(root, a.size)
        runs: dict[str, list[dict]] = {c: [] for c in a.configs.split(",")}
        for rep in range(a.repeats):  # round-robin, so a slow patch of a noisy machine hits every config
            for config in runs:
                r = run_child("bench.onpolicy", ["--child", config, "--root", str(root), "--steps", str(a.steps),
                                                 "--threads", str(a.threads), "--size", a.size])
                runs[config].append(r)
                console.print(f"repeat {rep + 1}/{a.repeats}", config, r)
    results = {}
    for config, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        results[config] = rs[0] if not ok else {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in ok),
            "all": [round(r["tokens_per_s"]) for r in ok], "sampled": ok[0]["sampled_steps"],
            "timed": ok[0]["steps_timed"]}

    def tps(c):
        return results.get(c, {}).get("tokens_per_s", float("nan"))

    def mem(c):
        return results.get(c, {}).get("peak_rss_gb", float("nan"))

    rows = []
    for c, r in results.items():
        if "error" in r:
            rows.append([c, "error", str(r["error"]), "", "", ""])
            continue
        peer = tps("trl_" + c.split("_")[1])
        rows.append([c, round(r["tokens_per_s"]), " ".join(map(str, r["all"])), f"{r['sampled']}/{r['timed']}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['tokens_per_s'] / peer:.2f}×" if c.startswith("sr") else ""])
    sz = SIZES[a.size]
    print_table(f"on-policy distillation, batch {BATCH}, {sz['new']} new tokens, rows ≤ {sz['max_len']}, "
                f"{a.steps} steps ({WARM} warm-up), median of {a.repeats} ({machine()})",
                ["config", "tokens/s", "per run", "sampled steps", "peak RSS GB", "vs TRL GKD"], rows)
    summary(f"λ=1: TRL GKD {tps('trl_l1'):.0f} tok/s {mem('trl_l1'):.2f} GB, stillroom {tps('sr_l1'):.0f} tok/s "
            f"({tps('sr_l1') / tps('trl_l1'):.2f}x) {mem('sr_l1'):.2f} GB; λ=0.5: TRL GKD {tps('trl_l05'):.0f} tok/s "
            f"{mem('trl_l05'):.2f} GB, stillroom {tps('sr_l05'):.0f} tok/s ({tps('sr_l05') / tps('trl_l05'):.2f}x) "
            f"{mem('sr_l05'):.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
