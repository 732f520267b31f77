"""On-policy distillation throughput and peak memory: stillroom's OnPolicyTrainer vs TRL's GKDTrainer (and,
across tokenizers, TRL's GOLD trainer).

    flock /tmp/stillroom-heavy.lock .venv/bin/python -m bench.onpolicy [--steps 16] [--repeats 3] [--size full]
    python -m bench.onpolicy --size real [--smollm2 DIR] [--gemma3 DIR] [--steps 10] [--repeats 3]

Same student (GPT-2 4 × 256) and teacher (GPT-2 8 × 512, random weights: speed does not depend on them) on one
byte-level BPE vocabulary of 8,000 trained on the shipped corpus, with stillroom's plain chat template set on
the tokenizer so both trainers render the prompts identically; the shipped chat set's prompts
(``stillroom/data/chat/train.jsonl``), batch 4, rows of at most 128 tokens, 64 sampled tokens at temperature
1.0 (top-p 1), generalised JSD (β = 0.5, no CE term) on the dense teacher distribution, AdamW, fp32 on CPU.
λ = 1 and λ = 0.5. Both take the same λ choices: TRL's coin (``random.random() <= lmbda``) is replaced by
stillroom's (seed, step) coin for each step, so the two do the same number of sampled steps.

``--size real`` (issue 16's measurement): teacher SmolLM2-135M-Instruct (``--smollm2``), student cut from it
(layers ``--layers``, default 0, 6, 12, 18, 24, 29; saved once as safetensors under the temporary root so every
configuration loads the same weights), SmolLM2's tokenizer and its own chat template; batch 4, rows of at most 256
tokens, 32 sampled tokens, the same GKD settings. Configurations ``trl_*`` / ``sr_*`` as above, plus the
cross-tokenizer ones, where Gemma-3-270M (``--gemma3``, SentencePiece with byte fallback, no chat template)
grades the SmolLM2-tokenizer student's samples:

- ``srx_*``: stillroom's OnPolicyTrainer with Gemma as an ``AlignedTeacher`` (online, top-16, exact byte
  alignment, ``prefix`` projection onto the student's ids; Gemma renders the prompts with stillroom's
  ``FALLBACK_TEMPLATE``, as every template-less teacher does), generalised JSD β = 0.5;
- ``gold_*``: TRL's GOLD trainer, cross-tokenizer ULD with its default byte-offset alignment
  (``use_extended_uld=True``) — it refuses non-ByteLevel tokenizers, so this row records the error;
- ``goldpos_*``: GOLD with ``use_extended_uld=False``, the original ULD paper's positional truncation (sorted
  probabilities position by position, no alignment): what GOLD can run with a SentencePiece teacher. GOLD feeds
  the teacher the student's rendered prompt text (SmolLM2's template), tokenized by Gemma.

TRL's trainers run with ``bf16=False`` and ``gradient_checkpointing=False`` (their config defaults are True; on a
CPU without avx512_bf16 bf16 autocast crawls, and with checkpointing GKD samples without a KV cache): fp32 and no
checkpointing, as stillroom trains. GOLD's sampling defaults (τ 0.9, top-p 0.95) are set to τ 1, top-p 1.

tokens/s = completion tokens trained (labels ≠ -100, counted in each trainer's ``compute_loss``) per second of
wall time over the steps after the first ``WARM`` (warm-up). Each configuration runs in a fresh process (peak
RSS is per process), round-robin ``--repeats`` times; the table shows medians.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import real_model  # noqa: E402

BATCH, WARM, SEED = 4, 3, 0
SIZES = {"full": dict(vocab=8000, max_len=128, new=64, student=(4, 256, 4), teacher=(8, 512, 8)),
         "small": dict(vocab=1000, max_len=64, new=16, student=(2, 64, 4), teacher=(2, 96, 4)),  # a smoke run
         "real": dict(max_len=256, new=32)}
CONFIGS = ("trl_l1", "sr_l1", "trl_l05", "sr_l05")
CROSS = ("gold_l1", "goldpos_l1", "srx_l1", "gold_l05", "goldpos_l05", "srx_l05")
PEERS = {"sr": "trl", "srx": "goldpos"}  # each stillroom configuration's peer (same λ)
SMOLLM2 = real_model("smollm2-135m-instruct")  # `stillroom models get smollm2-135m-instruct`
GEMMA3 = real_model("gemma3-270m")
LAYERS = [0, 6, 12, 18, 24, 29]
X_TOP_K = 16  # the cross-tokenizer teacher's top-k (stillroom's cache default)


def build_assets(root: Path, size: str) -> None:
    """Tokenizer (with a chat template), student, teacher and the chat records, under ``root``."""
    from bench.common import build_pair
    from stillroom.inputs.chat import FALLBACK_TEMPLATE

    build_pair(root, SIZES[size], n_positions=256, chars=20000 if size == "small" else None,
               chat_template=FALLBACK_TEMPLATE)
    write_chat(root, {"student": str(root / "student"), "teacher": str(root / "teacher")})


def build_real(root: Path, smollm2: str, gemma3: str, layers: list[int]) -> None:
    """The student cut from ``smollm2`` (layers ``layers``) saved as safetensors with SmolLM2's tokenizer and chat
    template under ``root / "student"``; the teachers are the model folders themselves."""
    from stillroom.models.cut import cut_from
    from stillroom.models.loading import load_tokenizer

    student = cut_from(smollm2, layers)
    student.save_pretrained(root / "student", safe_serialization=True)
    load_tokenizer(smollm2, "student").save_pretrained(root / "student")
    write_chat(root, {"student": str(root / "student"), "teacher": smollm2, "xteacher": gemma3})


def write_chat(root: Path, paths: dict[str, str]) -> None:
    """The shipped chat set and the model folders every configuration loads (``paths.json``)."""
    from stillroom.files import PACKAGE_DATA

    (root / "chat.jsonl").write_text((PACKAGE_DATA / "chat" / "train.jsonl").read_text(encoding="utf-8"),
                                     encoding="utf-8")
    (root / "paths.json").write_text(json.dumps(paths), encoding="utf-8")


def child(config: str, root: Path, steps: int, threads: int, size: str, warm: int = WARM) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from bench.common import StepTimer, disable_dropout, peak_rss_gb, trainer_args
    from stillroom.inputs import chat
    from stillroom.teachers.kd import SameTokenizerTeacher
    from stillroom.training import onpolicy
    from stillroom.training.recipe import FusionSpec, LossSpec, OnPolicySpec

    sz = SIZES[size]
    paths = json.loads((root / "paths.json").read_text(encoding="utf-8"))
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    kind, lam_key = config.split("_")
    lam = {"l1": 1.0, "l05": 0.5}[lam_key]
    tok = AutoTokenizer.from_pretrained(paths["student"])
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher_path = paths["xteacher"] if kind in ("gold", "goldpos", "srx") else paths["teacher"]
    counted = {"tokens": 0}

    def count(trainer, inputs) -> None:
        if trainer.state.global_step >= warm:  # the step being computed is a timed one
            counted["tokens"] += int(inputs["labels"][:, 1:].ne(-100).sum())

    timer = StepTimer(warm)
    common = trainer_args(root / f"out-{config}", steps, BATCH, SEED)
    # TRL's configs default to bf16 autocast and gradient checkpointing (GKD then samples without a KV cache):
    # fp32 and no checkpointing, as stillroom trains
    trl_common = dict(common, lmbda=lam, beta=0.5, temperature=1.0, max_length=sz["max_len"], disable_dropout=True,
                      bf16=False, gradient_checkpointing=False)
    if kind in ("trl", "gold", "goldpos"):
        from datasets import Dataset

        rows = [json.loads(x) for x in (root / "chat.jsonl").read_text().splitlines()]
        ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    if kind == "trl":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Trl(GKDTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                self.lmbda = 1.0 if onpolicy.coin(SEED, self.state.global_step, lam) else 0.0  # stillroom's coin
                return super().training_step(model, inputs, num_items_in_batch)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                count(self, inputs)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        args = GKDConfig(**trl_common, max_new_tokens=sz["new"])
        trainer = Trl(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[timer.callback()])
    elif kind in ("gold", "goldpos"):
        trainer = gold_trainer(kind, lam, student, teacher, teacher_path, tok, ds, trl_common, sz, count, timer)
    else:
        class Sr(onpolicy.OnPolicyTrainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                count(self, inputs)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        disable_dropout(student)  # as GKD's disable_dropout
        if kind == "srx":
            teachers = [aligned_teacher(teacher_path, tok)]
        else:
            teachers = [SameTokenizerTeacher(AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32),
                                             top_k=None)]
        examples = chat.load_examples(root / "chat.jsonl")
        collate = (chat.PromptCollator(tok, sz["max_len"], sz["new"]) if lam == 1.0
                   else chat.CompletionCollator(tok, sz["max_len"]))
        cfg = OnPolicySpec(lambda_=lam, max_new_tokens=sz["new"], seed=SEED)  # rows: the collator's max_len
        trainer = Sr(model=student, args=TrainingArguments(**common), train_dataset=chat.ExampleDataset(examples),
                     data_collator=collate, processing_class=tok, teachers=teachers,
                     loss=LossSpec(kind="jsd", ce_weight=0.0, beta=0.5),
                     fusion=FusionSpec(fused_top_k=X_TOP_K if kind == "srx" else None),
                     callbacks=[timer.callback()], onpolicy=cfg)
    trainer.train()
    elapsed = timer.seconds
    sampled = sum(onpolicy.coin(SEED, s, lam) for s in range(warm, steps))
    return {"config": config, "tokens_per_s": counted["tokens"] / elapsed, "tokens": counted["tokens"],
            "seconds": elapsed, "sampled_steps": sampled, "steps_timed": timer.steps, "peak_rss_gb": peak_rss_gb()}


def aligned_teacher(path: str, student_tok):
    """``path`` as stillroom's cross-tokenizer teacher, as ``build_teachers`` makes it for a recipe: online, top-k,
    fp32, byte-aligned and projected (``prefix``) onto the student's vocabulary."""
    from stillroom.teachers.kd import AlignedTeacher
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    source = OnlineTeacher(path, top_k=X_TOP_K, dtype="float32")
    s_table, t_table = TokenTable.from_tokenizer(student_tok), TokenTable.from_tokenizer(source.tokenizer)
    return AlignedTeacher(source, s_table, t_table, VocabMap.cached(t_table, s_table), "prefix", "xteacher")


def gold_trainer(kind: str, lam: float, student, teacher, teacher_path: str, tok, ds, trl_common: dict, sz: dict,
                 count, timer):
    """TRL's GOLD trainer, cross-tokenizer ULD: ``gold`` with its default byte-offset alignment, ``goldpos`` with
    the positional one (``use_extended_uld=False``); stillroom's λ coin, tokens counted as for the others."""
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    from stillroom.training import onpolicy

    class Gold(GOLDTrainer):
        def _fill_buffer(self, generation_batch, buffer_steps):  # where GOLD draws its λ coin
            self.lmbda = 1.0 if onpolicy.coin(SEED, self.state.global_step, lam) else 0.0
            return super()._fill_buffer(generation_batch, buffer_steps)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            count(self, inputs)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = GOLDConfig(**trl_common, top_p=1.0, max_completion_length=sz["new"], use_uld_loss=True,
                      use_extended_uld=kind == "gold", teacher_tokenizer_name_or_path=teacher_path)
    return Gold(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok,
                callbacks=[timer.callback()])


def peer_of(config: str) -> str | None:
    """The configuration a stillroom one is compared with (same λ), else None."""
    kind, lam = config.split("_")
    return f"{PEERS[kind]}_{lam}" if kind in PEERS else None


def fmt(tps: float) -> str:
    """Tokens/s for the table: one decimal below 100 (the real size trains a few tokens per second here)."""
    return f"{tps:.1f}" if tps < 100 else f"{tps:.0f}"


def table_rows(results: dict[str, dict]) -> list[list]:
    """One row per configuration; stillroom's carry tokens/s and peak RSS ratios against their peer."""
    rows = []
    for c, r in results.items():
        if "error" in r:
            rows.append([c, "error", " ".join(map(str, r["error"]))[:300], "", "", "", ""])
            continue
        peer = results.get(peer_of(c) or "", {})
        ok = "tokens_per_s" in peer
        rows.append([c, fmt(r["tokens_per_s"]), " ".join(map(fmt, r["all_tokens_per_s"])),
                     f"{r['sampled_steps']}/{r['steps_timed']}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}×" if ok else "",
                     f"{peer['peak_rss_gb'] / r['peak_rss_gb']:.2f}×" if ok else ""])
    return rows


def summary_line(results: dict[str, dict]) -> str:
    """Each stillroom configuration against its peer: tokens/s, ratio, peak RSS (or the peer's error)."""
    parts = []
    for c, r in results.items():
        p = peer_of(c)
        if p is None or "error" in r:
            continue
        peer = results.get(p, {})
        if "error" in peer or "tokens_per_s" not in peer:
            parts.append(f"{c} {fmt(r['tokens_per_s'])} tok/s {r['peak_rss_gb']:.2f} GB ({p}: no number)")
            continue
        parts.append(f"{c} {fmt(r['tokens_per_s'])} tok/s {r['peak_rss_gb']:.2f} GB vs {p} "
                     f"{fmt(peer['tokens_per_s'])} tok/s {peer['peak_rss_gb']:.2f} GB "
                     f"({r['tokens_per_s'] / peer['tokens_per_s']:.2f}x)")
    for c, r in results.items():
        if "error" in r:
            parts.append(f"{c} error: {' '.join(map(str, r['error']))[:160]}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, dict] | None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration (medians reported)")
    ap.add_argument("--configs", default=None, help=f"default {','.join(CONFIGS)} (--size real: also "
                                                     f"{','.join(CROSS)})")
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--smollm2", default=SMOLLM2, help="--size real: teacher folder the student is cut from")
    ap.add_argument("--gemma3", default=GEMMA3, help="--size real: the cross-tokenizer teacher's folder")
    ap.add_argument("--layers", type=int, nargs="+", default=LAYERS, help="--size real: the student's layers")
    ap.add_argument("--warmup", type=int, default=WARM, help="untimed first steps")
    ap.add_argument("--json", default=None, help="write every run so far here after each run (a long run that is "
                                                 "stopped keeps its finished repeats)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, Path(a.root), a.steps, a.threads, a.size, a.warmup)), flush=True)
        return None

    import torch

    from bench.common import console, machine, medians, print_table, run_child, summary

    torch.set_num_threads(a.threads)
    configs = (a.configs or ",".join(CONFIGS + CROSS if a.size == "real" else CONFIGS)).split(",")
    with tempfile.TemporaryDirectory(prefix="bench-onpolicy-") as tmp:
        root = Path(tmp)
        if a.size == "real":
            console.print(f"cutting the student from {a.smollm2} (layers {a.layers}) …")
            build_real(root, a.smollm2, a.gemma3, a.layers)
        else:
            console.print(f"building tokenizer (vocab {SIZES[a.size]['vocab']:,}), student, teacher …")
            build_assets(root, a.size)
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for rep in range(a.repeats):  # round-robin, so a slow patch of a noisy machine hits every config
            for config in runs:
                if runs[config] and all("error" in r for r in runs[config]):
                    continue  # it failed before: same code, same inputs, same error
                r = run_child("bench.onpolicy", ["--child", config, "--root", str(root), "--steps", str(a.steps),
                                                 "--threads", str(a.threads), "--size", a.size,
                                                 "--warmup", str(a.warmup)])
                runs[config].append(r)
                console.print(f"repeat {rep + 1}/{a.repeats}", config, r)
                if a.json:
                    Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs}, indent=1), encoding="utf-8")
    results = medians(runs, first=("sampled_steps", "steps_timed"))
    sz = SIZES[a.size]
    print_table(f"on-policy distillation ({a.size}), batch {BATCH}, {sz['new']} new tokens, rows ≤ {sz['max_len']}, "
                f"{a.steps} steps ({a.warmup} warm-up), median of {a.repeats} ({machine()})",
                ["config", "tokens/s", "per run", "sampled steps", "peak RSS GB", "tokens/s vs peer",
                 "peer RSS / ours"], table_rows(results))
    summary(summary_line(results))
    return results


if __name__ == "__main__":
    main()
