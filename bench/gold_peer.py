"""TRL's GOLD trainer as a peer on bench.real_fusion's cross-tokenizer distillation (Gemma-3-270M → cut SmolLM2).

The same student, blocks, optimiser and test text as ``bench.real_fusion``, trained by
``trl.experimental.gold.GOLDTrainer`` with its cross-tokenizer ULD loss instead of by stillroom. Arms, each with
the same blocks, steps and seed:

- ``gold-uld``: GOLD's ULD (rank-wise L1 between the sorted student and teacher distributions);
- ``gold-uld-hybrid``: GOLD's hybrid ULD (``uld_use_hybrid_loss``): JSD (β = GOLDConfig's ``beta``, 0.5) on the
  token strings both vocabularies share, sorted L1 on the rest, weighted by vocabulary overlap (GOLD's adaptive
  weights, the default).

**Protocol.** Student: ``--layers`` of ``--student-from`` (SmolLM2-135M-Instruct), built by stillroom's own
``build_student`` from a ``student: {init_from, layers}`` spec, fp32, as every bench.real_fusion arm. Data: the
first ``steps × batch_size`` lines of ``--blocks-from``'s ``train_blocks.jsonl`` (an OUT of bench.real_fusion:
the blocks its arms train on, each one student block of ≤ 256 tokens, every block seen once), visited in the
order stillroom's trainer visits them (transformers' default sampler, seeded by ``seed``/``data_seed`` as
stillroom seeds it; GOLD's own ``RepeatSampler`` would shuffle them otherwise). Each block is one GOLD
prompt/completion example: the prompt is the characters of the block's first student token, the completion the
rest of the block, so GOLD's CE (``labels`` ≠ −100, shifted) predicts the block's tokens 1..n−1 from their
prefixes — the tokens stillroom's CE predicts. GOLD's collator refuses an empty prompt ("no prompt tokens left"),
hence the one-token prompt. GOLD appends EOS to every example; this bench's collator drops it again (a block ends
mid-text: an EOS target there is not in stillroom's CE) and sets ``uld_skip_student_eos=False`` to match.
Optimiser: AdamW (``adamw_torch``), ``--lr`` 5e-4, no weight decay, ``max(1, steps // 10)`` warm-up steps, cosine,
batch ``--batch-size``, max_grad_norm 1.0, fp32 (GOLD's defaults bf16 and gradient checkpointing are turned off),
``lmbda`` = 0 (pure off-policy: GOLD never samples), temperatures 1.0 on both sides. Teacher: ``--teacher``
(Gemma-3-270M) online, fp32, full logits.

**Weights.** GOLD's ULD loss is ``uld_crossentropy_weight · CE + uld_distillation_weight · D`` (``ULDLoss.__call__``:
CE = token-mean cross-entropy of the batch, D = mean over sequences of each sequence's ULD sum over its paired
positions divided by their count). This bench sets ``uld_crossentropy_weight = λ`` and ``uld_distillation_weight =
1 − λ`` with λ = ``--ce-weight`` = 0.9: stillroom's ``loss.ce_weight`` form λ·CE + (1−λ)·D exactly.

**Alignment.** GOLD's extended ULD (``use_extended_uld=True``, its default) pairs the two tokenisations by byte
offsets, which it computes only for ByteLevel BPE tokenizers: ``encode_with_byte_offsets`` raises
NotImplementedError for Gemma-3 (SentencePiece-style ▁ pieces with byte fallback). ``--alignment auto`` (the
default) asks TRL that same function on both tokenizers before training and takes the extended path only when
both are accepted, else GOLD's positional ULD (``use_extended_uld=False``: the original ULD paper's truncation —
student position k paired with teacher position k of the completion, up to the shorter of the two). For
Gemma → SmolLM2 the positional path runs. Which branch actually ran is recorded by counting calls on the trainer's
``ULDLoss`` (ULD calls, byte-alignment calls, hybrid calls) and written to ``result.json`` (``loss_path``).

**What still differs from stillroom's protocol** (bench.real_fusion's ``uld-gemma3`` / ``kd-gemma3``):
positional pairing (student token k vs Gemma token k, which drift apart along the block: Gemma needs 6.5% fewer
tokens for the 800 blocks of a 200 × 4 run, so a block's last ~16 student positions get no distillation term), where stillroom pairs rows by exact
byte alignment; the dense full-vocabulary teacher run online each step, where stillroom reads a top-k (k = 10)
cache (ULD ranks 1..k exact plus a tail bucket; KD through a projection); D averaged over each sequence's paired
positions then over the sequences, where stillroom sums D over its paired rows and divides by the batch's
CE-labelled tokens; GOLD's "observed" logit slice (positions at the completion tokens, predicting the next
token, on both sides); the block re-tokenised from its text (no separator
before a document that starts inside a block and no per-document attention isolation, which stillroom's packed
blocks have; the ids of a block's first token may differ from those cut out of the whole document); the teacher
sees ``<bos>`` + the prompt's characters + the completion tokenised separately (GOLD's
``build_teacher_inputs_from_texts``) plus an EOS it skips; GOLD's left padding; no validation pass at the end.

Resumable: each arm writes ``OUT/seed{S}/{arm}/result.json`` and is skipped when it exists. One OUT per setting
(``OUT/options.json``; a rerun with other options into the same OUT is refused). Writes ``OUT/results.json`` and
``OUT/report.md`` (with the stillroom arms of ``--blocks-from`` for the same seeds when its options match) and
ends with a ``SUMMARY:`` line.

    python -m bench.real_fusion --seeds 0 1 2 --steps 200 --batch-size 4 --out runs/bench-real-fusion  # the blocks
    python -m bench.gold_peer --blocks-from runs/bench-real-fusion --steps 200 --batch-size 4 --seeds 0 1 2 \\
        --out runs/bench-gold-peer                                                   # the full run
    python -m bench.gold_peer --blocks-from runs/bench-real-fusion --steps 2 --batch-size 2 --eval-chars 300 \\
        --seeds 0 --out runs/gold-smoke                                               # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from bench.common import StepTimer, console, machine, real_model, spread, summary  # noqa: E402

SMOLLM2 = real_model("smollm2-135m-instruct")
GEMMA3 = real_model("gemma3-270m")
LAYERS = [0, 6, 12, 18, 24, 29]
ARMS = ("gold-uld", "gold-uld-hybrid")
SCALE = ("steps", "batch_size", "lr", "ce_weight", "eval_chars", "student_from", "layers", "teacher", "blocks_from",
         "alignment")
# options of a bench.real_fusion OUT that must match for its arms to be shown next to these
COMPARABLE = {"steps": "steps", "batch_size": "batch_size", "lr": "lr", "ce_weight": "ce_weight",
              "eval_chars": "eval_chars", "student_from": "student_from", "layers": "layers", "teacher": "gemma3"}


# --- data ---------------------------------------------------------------------------------------------------


def read_blocks(blocks_from: Path, n: int) -> list[str]:
    """The texts of the first ``n`` training blocks of a bench.real_fusion OUT, in file order."""
    from stillroom.errors import ConfigError, MissingPathError

    path = blocks_from / "train_blocks.jsonl"
    if not path.exists():
        raise MissingPathError(f"--blocks-from {blocks_from}: no train_blocks.jsonl; point it at a bench.real_fusion OUT")
    texts = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(texts) == n:
                break
            texts.append(json.loads(line)["text"])
    if len(texts) < n:
        raise ConfigError(f"--blocks-from {blocks_from} holds {len(texts)} blocks, this run trains on {n} "
                          f"(steps × batch size): use fewer steps or a run over more blocks")
    return texts


def block_example(text: str, tok) -> dict[str, str]:
    """One block as a GOLD prompt/completion example: the prompt is the characters of the block's first student
    token (GOLD refuses an empty prompt), the completion the rest, so GOLD's CE covers tokens 1..n−1."""
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = max(1, offsets[0][1]) if offsets else 1
    return {"prompt": text[:cut], "completion": text[cut:]}


def test_texts(blocks_from: Path, eval_chars: int) -> list[str]:
    """bench.real_fusion's held-out text: the first ``eval_chars`` characters of each test work of its OUT."""
    from stillroom.demo import held_out_texts
    from stillroom.errors import MissingPathError

    folder = blocks_from / "data" / "test"
    if not folder.is_dir():
        raise MissingPathError(f"--blocks-from {blocks_from}: no data/test; point it at a bench.real_fusion OUT")
    return held_out_texts(str(folder), eval_chars)


class NoEosCollator:
    """GOLD's ``DataCollatorForChatML`` on examples without the EOS GOLD's dataset preparation appends (a block
    ends mid-text); counts the student tokens fed and the CE targets, and records which blocks came, in order."""

    def __init__(self, inner, eos_id: int | None, eos_text: str | None, index: dict[str, int]):
        self.inner, self.eos_id, self.eos_text, self.index = inner, eos_id, eos_text, index
        self.tokens = self.targets = 0
        self.order: list[int] = []

    def __call__(self, examples: list[dict]) -> dict:
        rows = []
        for ex in examples:
            ex = dict(ex)
            ids = list(ex["input_ids"])
            appended = (self.eos_id is not None and len(ids) > 1 and ids[-1] == self.eos_id
                        and not (self.eos_text and ex["original_completion_text"].endswith(self.eos_text)))
            if appended:
                for key in ("input_ids", "attention_mask", "byte_offsets", "completion_mask"):
                    if key in ex:
                        ex[key] = list(ex[key])[:-1]
            rows.append(ex)
            self.order.append(self.index.get(ex["original_prompt_text"] + ex["original_completion_text"], -1))
        batch = self.inner(rows)
        self.tokens += int(batch["attention_mask"].sum())
        self.targets += int(batch["labels"][:, 1:].ne(-100).sum())
        return batch


# --- GOLD ---------------------------------------------------------------------------------------------------


def choose_alignment(asked: str, student_tok, teacher_tok) -> tuple[bool, str]:
    """``(extended, why)``: GOLD's byte-offset (extended) ULD when ``asked`` is ``extended``, or ``auto`` and TRL's
    ``encode_with_byte_offsets`` accepts both tokenizers; else its positional ULD."""
    from trl.experimental.utils import encode_with_byte_offsets

    if asked != "auto":
        return asked == "extended", f"--alignment {asked}"
    for side, tok in (("student", student_tok), ("teacher", teacher_tok)):
        try:
            encode_with_byte_offsets(tok.backend_tokenizer, ["To be, or not to be"], add_special_tokens=False)
        except (NotImplementedError, AttributeError) as e:
            return False, f"extended ULD refused for the {side} tokenizer ({type(e).__name__}: {e})"
    return True, "both tokenizers are ByteLevel: GOLD's byte-offset alignment accepts them"


def probe_loss_path(uld) -> Counter:
    """Count, on GOLD's ``ULDLoss`` instance, the branches that run: ``uld`` (each distillation-term call),
    ``byte_alignment`` (extended ULD: one per sequence), ``hybrid`` (hybrid ULD: one per sequence)."""
    calls: Counter = Counter()

    def wrap(name: str, key: str) -> None:
        fn = getattr(uld, name)

        def counted(*a, **k):
            calls[key] += 1
            return fn(*a, **k)

        setattr(uld, name, counted)  # internal calls go through self.<name>: the instance attribute wins

    wrap("_compute_distillation_loss", "uld")
    wrap("_align_by_byte_offsets", "byte_alignment")
    wrap("_compute_hybrid_uld_loss", "hybrid")
    return calls


def path_name(calls: Counter) -> str:
    """The loss path the counts show: ``uld-extended`` / ``uld-positional`` (+ ``-hybrid``); ``none`` if ULD never
    ran (GOLD then took its same-tokenizer JSD branch)."""
    if not calls.get("uld"):
        return "none"
    name = "uld-extended" if calls.get("byte_alignment") else "uld-positional"
    return name + ("-hybrid" if calls.get("hybrid") else "")


def gold_config(args, folder: Path, seed: int, arm: str, extended: bool):
    """GOLD's config for one arm: stillroom's optimiser settings, λ as the ULD weights, off-policy, fp32."""
    import dataclasses

    import torch
    from trl.experimental.gold import GOLDConfig

    # TRL defaults to activation checkpointing (named gradient_checkpointing before transformers 5.2x) and bf16
    names = {f.name for f in dataclasses.fields(GOLDConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return GOLDConfig(
        output_dir=str(folder / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, weight_decay=0.0, warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="cosine", max_grad_norm=1.0, optim="adamw_torch", seed=seed, data_seed=seed,
        logging_steps=max(1, args.steps // 10), save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        bf16=False, fp16=False, **{ckpt: False},  # fp32 and no checkpointing, as stillroom trains
        lmbda=0.0, use_uld_loss=True, use_extended_uld=extended, uld_use_hybrid_loss=arm == "gold-uld-hybrid",
        uld_crossentropy_weight=args.ce_weight, uld_distillation_weight=round(1.0 - args.ce_weight, 12),
        uld_student_temperature=1.0, uld_teacher_temperature=1.0, uld_skip_student_eos=False,
        uld_skip_teacher_eos=True, teacher_tokenizer_name_or_path=args.teacher)


def make_trainer(args, folder: Path, seed: int, arm: str, blocks: list[str], timer: StepTimer | None = None):
    """``(trainer, collator, calls, why)``: GOLD set up for one arm and seed (student built, teacher loaded)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed
    from trl.experimental.gold import GOLDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from stillroom.models.student import build_student, student_tokenizer
    from stillroom.training.recipe import StudentSpec

    class InOrderGOLD(GOLDTrainer):
        def _get_train_sampler(self, dataset=None):  # the sampler stillroom's (transformers') trainer uses
            return Trainer._get_train_sampler(self, dataset)

    spec = StudentSpec(init_from=args.student_from, layers=args.layers)
    tok = student_tokenizer(spec)
    teacher_tok = AutoTokenizer.from_pretrained(args.teacher)
    extended, why = choose_alignment(args.alignment, tok, teacher_tok)
    set_seed(seed)
    student = build_student(spec, tok)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    examples = [block_example(t, tok) for t in blocks]
    index = {}
    for i, e in enumerate(examples):
        index.setdefault(e["prompt"] + e["completion"], i)
    config = gold_config(args, folder, seed, arm, extended)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    collate = NoEosCollator(DataCollatorForChatML(tokenizer=tok, max_length=config.max_length), tok.eos_token_id,
                            tok.eos_token, index)
    trainer = InOrderGOLD(model=student, teacher_model=teacher, args=config, data_collator=collate,
                          train_dataset=Dataset.from_list(examples), processing_class=tok,
                          callbacks=[timer.callback()] if timer is not None else None)
    calls = probe_loss_path(trainer.uld_loss_fn)
    return trainer, collate, calls, why


# --- running ------------------------------------------------------------------------------------------------


def check_scale(args: argparse.Namespace, out: Path) -> None:
    """One OUT per setting: finished arms are reused only by a rerun with the same options."""
    from stillroom.errors import ConfigError

    path = out / "options.json"
    now = {k: str(getattr(args, k)) if k == "blocks_from" else getattr(args, k) for k in SCALE}
    if path.exists():
        have = json.loads(path.read_text())
        diff = {k: (have.get(k), now[k]) for k in SCALE if have.get(k) != now[k]}
        if diff:
            raise ConfigError(f"--out {out} holds a run with other options {diff} (was, now); pass another --out")
    else:
        path.write_text(json.dumps(now, indent=1))


def run_arm(args, out: Path, seed: int, arm: str, blocks: list[str], texts: list[str]) -> dict:
    """Train one arm with GOLD, evaluate it on the test text, write ``result.json``; reuse it when it exists."""
    import trl

    from bench.real_fusion import bits_per_byte

    folder = out / f"seed{seed}" / arm
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    console.rule(f"seed {seed}: {arm}")
    folder.mkdir(parents=True, exist_ok=True)
    timer = StepTimer(1)
    trainer, collate, calls, why = make_trainer(args, folder, seed, arm, blocks, timer)
    t = time.perf_counter()
    res = trainer.train()
    train_s = time.perf_counter() - t
    if (folder / "trainer").is_dir() and not any((folder / "trainer").iterdir()):
        (folder / "trainer").rmdir()  # nothing saved there (save_strategy "no")
    model = trainer.accelerator.unwrap_model(trainer.model)
    t = time.perf_counter()
    bpb = bits_per_byte(model, trainer.processing_class, texts, arm)
    per_step = timer.seconds / timer.steps if timer.steps else train_s / args.steps
    result = {"arm": arm, "seed": seed, "test_bpb": bpb, "train_seconds": train_s,
              "seconds_per_step": per_step, "eval_seconds": time.perf_counter() - t,
              "train_tokens": collate.tokens, "ce_targets": collate.targets,
              "train_loss": res.metrics.get("train_loss"),
              "loss_path": {"name": path_name(calls), "calls": dict(calls), "alignment": why,
                            "use_extended_uld": trainer.uld_loss_fn.use_extended_uld,
                            "hybrid": trainer.uld_loss_fn.use_hybrid_loss,
                            "ce_weight": trainer.uld_loss_fn.crossentropy_weight,
                            "distillation_weight": trainer.uld_loss_fn.distillation_weight,
                            "merge_strategy": trainer.uld_loss_fn.token_merge_strategy},
              "checkpointing": bool(getattr(model, "is_activation_checkpointing",
                                            getattr(model, "is_gradient_checkpointing", False))),
              "block_order": collate.order, "trl": trl.__version__}
    done.write_text(json.dumps(result, indent=1))
    console.print(f"{arm} seed {seed}: {bpb:.4f} bits/byte (train {train_s:.0f} s, {per_step:.1f} s/step, "
                  f"{result['loss_path']['name']})")
    return result


def collect(out: Path) -> dict[str, list[dict]]:
    """Every finished arm under OUT: arm → its results, seeds in order."""
    found: dict[str, list[dict]] = {}
    for f in sorted(out.glob("seed*/*/result.json")):
        r = json.loads(f.read_text())
        found.setdefault(r["arm"], []).append(r)
    return {a: sorted(rs, key=lambda r: r["seed"]) for a, rs in found.items()}


def stillroom_arms(args, seeds: list[int]) -> dict[str, dict[int, float]]:
    """The bench.real_fusion arms of ``--blocks-from`` (same blocks), for the seeds given, when its options match
    this run's (else empty)."""
    opts, res = args.blocks_from / "options.json", args.blocks_from / "results.json"
    if not (opts.exists() and res.exists()):
        return {}
    have = json.loads(opts.read_text())
    if any(have.get(theirs) != getattr(args, ours) for ours, theirs in COMPARABLE.items()):
        return {}
    table = json.loads(res.read_text()).get("test_bpb", {})
    return {a: {int(s): v for s, v in by_seed.items() if int(s) in seeds} for a, by_seed in table.items()
            if any(int(s) in seeds for s in by_seed)}


def report_md(args, found: dict[str, list[dict]], theirs: dict[str, dict[int, float]]) -> str:
    lines = [f"# bench.gold_peer report\n\nmachine: {machine()}\n\n`python -m bench.gold_peer --blocks-from "
             f"{args.blocks_from} --seeds {' '.join(map(str, args.seeds))} --steps {args.steps} --batch-size "
             f"{args.batch_size} --lr {args.lr} --ce-weight {args.ce_weight} --eval-chars {args.eval_chars} "
             f"--alignment {args.alignment}`\n\nstudent: layers {args.layers} of `{args.student_from}`; teacher "
             f"`{args.teacher}` through TRL's GOLD (λ = {args.ce_weight}: uld_crossentropy_weight {args.ce_weight}, "
             f"uld_distillation_weight {1 - args.ce_weight:g}); the first {args.steps * args.batch_size} blocks of "
             f"`{args.blocks_from}`\n",
             "| arm | mean bits/byte | ± spread (half range) | per seed | train s (median) | s/step (median) | "
             "loss path |", "|---|---|---|---|---|---|---|"]
    for arm, rs in found.items():
        v = [r["test_bpb"] for r in rs]
        paths = sorted({r["loss_path"]["name"] for r in rs})
        per_seed = " ".join(f"{r['seed']}: {r['test_bpb']:.4f}" for r in rs)
        lines.append(f"| {arm} | {statistics.fmean(v):.4f} | {spread(v):.4f} | {per_seed} | "
                     f"{statistics.median(r['train_seconds'] for r in rs):.0f} | "
                     f"{statistics.median(r['seconds_per_step'] for r in rs):.2f} | {', '.join(paths)} |")
    if theirs:
        lines += ["", f"stillroom arms of `{args.blocks_from}` (bench.real_fusion, same blocks and options):", "",
                  "| arm | mean bits/byte | ± spread | per seed |", "|---|---|---|---|"]
        for arm, by_seed in theirs.items():
            v = list(by_seed.values())
            lines.append(f"| {arm} | {statistics.fmean(v):.4f} | {spread(v):.4f} | "
                         f"{' '.join(f'{s}: {x:.4f}' for s, x in sorted(by_seed.items()))} |")
    why = sorted({r["loss_path"]["alignment"] for rs in found.values() for r in rs})
    lines += [""] + [f"- alignment: {w}" for w in why]
    return "\n".join(lines) + "\n"


def summary_line(found: dict[str, list[dict]]) -> str:
    parts = []
    for arm, rs in found.items():
        v = [r["test_bpb"] for r in rs]
        parts.append(f"{arm} {statistics.fmean(v):.4f} ± {spread(v):.4f} bits/byte ({len(v)} seed"
                     f"{'s' if len(v) != 1 else ''}, {rs[0]['loss_path']['name']}, "
                     f"{statistics.median(r['seconds_per_step'] for r in rs):.2f} s/step)")
    return "; ".join(parts) or "no arm finished"


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks-from", type=Path, required=True,
                    help="a bench.real_fusion OUT: its train_blocks.jsonl and data/test (read only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per arm (each block seen once)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ce-weight", type=float, default=0.9, help="λ: uld_crossentropy_weight; 1 − λ the ULD weight")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--alignment", choices=("auto", "extended", "positional"), default="auto",
                    help="GOLD's ULD pairing: byte offsets (extended) or positions; auto: extended when TRL accepts "
                         "both tokenizers")
    ap.add_argument("--eval-chars", type=int, default=2000, help="characters of each test work evaluated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student-from", default=SMOLLM2)
    ap.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    ap.add_argument("--teacher", default=GEMMA3, help="the teacher model folder (default Gemma-3-270M)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-gold-peer"))
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    check_scale(args, args.out)
    console.print(f"machine: {machine()}")
    blocks = read_blocks(args.blocks_from, args.steps * args.batch_size)
    texts = test_texts(args.blocks_from, args.eval_chars)
    theirs = stillroom_arms(args, args.seeds)
    found: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            r = run_arm(args, args.out, seed, arm, blocks, texts)
            if not math.isfinite(r["test_bpb"]):
                console.print(f"[red]{arm} seed {seed}: bits/byte is not finite[/red]")
            found = collect(args.out)  # report after every arm: a killed run keeps what it finished
            (args.out / "report.md").write_text(report_md(args, found, theirs), encoding="utf-8")
            (args.out / "results.json").write_text(json.dumps(
                {"test_bpb": {a: {r["seed"]: r["test_bpb"] for r in rs} for a, rs in found.items()},
                 "train_seconds": {a: [r["train_seconds"] for r in rs] for a, rs in found.items()},
                 "seconds_per_step": {a: [r["seconds_per_step"] for r in rs] for a, rs in found.items()},
                 "loss_path": {a: sorted({r["loss_path"]["name"] for r in rs}) for a, rs in found.items()},
                 "stillroom": theirs}, indent=1))
    console.print((args.out / "report.md").read_text())
    summary(summary_line(found))
    return found


if __name__ == "__main__":
    main()
