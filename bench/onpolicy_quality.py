"""On-policy distillation quality on held-out prompts: off-policy KD vs seq-KD vs on-policy GKD (λ = 0.5, 1).

    nice -n 0 .venv/bin/python -m bench.onpolicy_quality [--out runs/bench-onpolicy-quality] [--seeds 0,1,2]

Setting (cross-tokenizer, stillroom's point): the teacher is the shipped ``teacher-spm`` (a 4-layer Llama,
SentencePiece with byte fallback, 3,200 ids); the student is a GPT-2 (2 × 128) on the demo's byte-level BPE
student tokenizer. Neither tokenizer ships a chat template, so both render the chat records with stillroom's
:data:`~stillroom.inputs.chat.FALLBACK_TEMPLATE`.

The shipped teachers are plain-text LMs that never saw this format (greedy, teacher-spm answers only spaces),
so the teacher is first made a task teacher: teacher-spm fine-tuned by CE on the completions of
``stillroom/data/chat/train.jsonl`` (``teacher_steps``, seed 1234). The student is warm-started once by plain CE
on the shipped corpus's training works (``warm_steps``, seed 0; the same warm start for every arm and seed, so
the seed spread is the distillation's own: data order, λ coins, samples), then distilled from that warm start by
every arm with the same steps, batch, lr, schedule and seed, on the prompts of ``stillroom/data/chat/train.jsonl``:

- ``off-policy KD``: the data's completions, teacher-graded (``stillroom.training.trainer.DistillTrainer``);
- ``seq-KD``: the teacher's own greedy completions of the train prompts (``stillroom.generation.rollout.generate_file``,
  produced once), teacher-graded — Kim & Rush's sequence-level data with the same token-level loss;
- ``on-policy λ=0.5`` / ``λ=1``: ``stillroom.training.onpolicy.OnPolicyTrainer``; sampled steps train on the student's
  own samples (temperature 1, top-p 1, ``--new`` tokens), the others on the data's completions.

Rows of a sampled batch that no teacher distribution reaches stay out of the loss (``stillroom.training.onpolicy``: the
one-hot *gold next token* FuseLLM fills in elsewhere would be the student's own sample there, training it to
repeat itself). Runs before that fix (2026-12-02, ``docs/benchmarks/onpolicy_quality.md``, History) had that self-fill and collapsed.

Every arm uses the generalised JSD (β = 0.5, no CE term: GKD's loss) against the teacher's top-10 distribution
aligned at byte level to the student's tokens (projection ``prefix``).

Metrics on ``stillroom/data/chat/validation.jsonl`` (39 prompts from a work no model trains on; never trained on,
never used to choose anything), from the student's greedy completion of at most ``--new`` student tokens:

- ``ll/byte``: the teacher's log-likelihood (nats) of the student's completion per UTF-8 byte. The teacher
  re-renders the prompt with its own template and tokenizes the completion text itself (plus its end token
  when the student's completion ended); the sum of its log-probabilities over those completion tokens, over
  all prompts, is divided by the completions' bytes (an end token counts as one byte). Higher is better;
  per byte is comparable across tokenizers. ``ll/tok`` is the same sum per teacher token.
- ``agree``: agreement with the teacher's own greedy completion (``--new`` teacher tokens) of the same prompt:
  the mean over prompts of the character-level edit similarity ``1 − lev(a, b) / max(|a|, |b|)`` of the first
  ``AGREE_CHARS`` characters of each (stripped; two empty strings agree fully). ``word1``: the share of
  prompts whose first word is the teacher's first word.

Rows give mean ± half-range over seeds; the paired difference on-policy − off-policy is taken per seed. Results
are appended to ``OUT/results.jsonl`` one (arm, seed) at a time, and a rerun skips those already there (a run
with other settings is refused).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import console, machine, print_table, spread, summary  # noqa: E402

AGREE_CHARS = 32
ARMS = ("off-policy KD", "seq-KD", "on-policy λ=0.5", "on-policy λ=1")
LAMBDA = {"on-policy λ=0.5": 0.5, "on-policy λ=1": 1.0}
REFERENCE = "student before distillation"
SIZES = {  # "toy": the smoke test's size
    "full": dict(teacher_steps=200, student=(2, 128, 4), warm_steps=300, steps=100, batch=8, lr=2e-3, new=24, train_prompts=None,
                 val_prompts=None),
    "toy": dict(teacher_steps=3, student=(1, 32, 2), warm_steps=2, steps=2, batch=4, lr=1e-3, new=6, train_prompts=8,
                val_prompts=4),
}


# --- metrics ------------------------------------------------------------------------------------------------


def edit_similarity(a: str, b: str) -> float:
    """``1 − Levenshtein(a, b) / max(|a|, |b|)``: 1 for equal strings (two empty ones included), 0 for
    strings with nothing in common at any position."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def agreement(student: str, teacher: str, chars: int = AGREE_CHARS) -> float:
    """Edit similarity of the first ``chars`` characters of the two stripped completions."""
    return edit_similarity(student.strip()[:chars], teacher.strip()[:chars])


def first_word_match(student: str, teacher: str) -> bool:
    s, t = student.split(), teacher.split()
    return bool(s) and bool(t) and s[0] == t[0]


def greedy(model, tokenizer, examples, new: int, batch: int = 16) -> list:
    """Each example's greedy completion (:class:`stillroom.generation.rollout.Sample`) under the model's own template."""
    from stillroom.generation import rollout
    from stillroom.inputs import chat

    out = []
    for i in range(0, len(examples), batch):
        prompts = [chat.prompt_ids(tokenizer, ex) for ex in examples[i:i + batch]]
        out += rollout.sample(model, tokenizer, prompts, max_new_tokens=new, do_sample=False)
    return out


def teacher_scores(teacher, tokenizer, examples, texts: list[str], ended: list[bool]) -> list[tuple[float, int, int]]:
    """Per example ``(sum of the teacher's log-probs of the completion tokens, teacher tokens, bytes)``: the
    teacher renders the prompt itself and tokenizes ``text`` (+ its end token when ``ended``); bytes are the
    text's UTF-8 bytes plus one for an end token."""
    import torch

    from stillroom.inputs import chat

    out = []
    with torch.no_grad():
        for ex, text, end in zip(examples, texts, ended, strict=True):
            p = chat.prompt_ids(tokenizer, ex)
            c = chat.completion_ids(tokenizer, text, end=end) if text or end else []
            nbytes = len(text.encode("utf-8")) + int(end)
            if not c:
                out.append((0.0, 0, nbytes))
                continue
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(teacher(input_ids=ids).logits[0, len(p) - 1:-1].float(), -1)
            ll = logp.gather(-1, torch.tensor(c)[:, None]).sum().item()
            out.append((ll, len(c), nbytes))
    return out


def quality(student, s_tok, teacher, t_tok, examples, teacher_texts: list[str], new: int) -> dict:
    """Both metrics (see the module docstring) of ``student``'s greedy completions of ``examples``."""
    samples = greedy(student, s_tok, examples, new)
    texts = [s.text for s in samples]
    sc = teacher_scores(teacher, t_tok, examples, texts, [s.ended for s in samples])
    ll, toks, nbytes = (sum(x[i] for x in sc) for i in range(3))
    return {"ll_per_byte": ll / max(nbytes, 1), "ll_per_token": ll / max(toks, 1),
            "agree": statistics.fmean(agreement(s, t) for s, t in zip(texts, teacher_texts, strict=True)),
            "word1": statistics.fmean(first_word_match(s, t) for s, t in zip(texts, teacher_texts, strict=True)),
            "ended": statistics.fmean(s.ended for s in samples), "mean_bytes": nbytes / len(samples),
            "examples": [{"id": ex.example_id, "student": s} for ex, s in zip(examples[:3], texts, strict=False)]}


# --- runs ---------------------------------------------------------------------------------------------------


def teacher_recipe(sz: dict, teacher: str, data: Path, out: Path, threads: int) -> dict:
    """The task teacher: the shipped teacher fine-tuned by CE on the train split's completions (seed 1234,
    the same for every arm and seed). The shipped teachers are plain-text LMs that never saw the chat format
    (greedy, teacher-spm answers only spaces, teacher-bpe stage directions), so their own completions and their
    grades would say nothing about continuing verse."""
    steps = sz["teacher_steps"]
    return {"name": "teacher-sft", "student": {"path": teacher},
            "data": {"train": str(data), "format": "chat", "seq_len": 128},
            "loss": {"ce_weight": 1.0},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": sz["batch"], "lr": 1e-3,
                      "warmup_steps": max(1, steps // 10), "seed": 1234, "threads": threads,
                      "logging_steps": max(1, steps // 5), "progress": False, "plot": False, "overwrite": True}}


WARM_SEED = 0


def student_recipe(sz: dict, out: Path, threads: int, seed: int = WARM_SEED) -> dict:
    """The CE warm start: the student from scratch on the corpus's training works."""
    from stillroom.demo import CORPUS, DEFAULT

    layers, width, heads = sz["student"]
    return {"name": "warm",
            "student": {"tokenizer": str(DEFAULT / "student-tokenizer"),
                        "config": {"model_type": "gpt2", "n_layer": layers, "n_embd": width, "n_head": heads,
                                   "n_positions": 256}},
            "data": {"train": str(CORPUS / "train"), "seq_len": 128, "max_blocks": sz["warm_steps"] * sz["batch"]},
            "loss": {"ce_weight": 1.0},
            "train": {"output_dir": str(out), "max_steps": sz["warm_steps"], "batch_size": sz["batch"], "lr": 2e-3,
                      "warmup_steps": max(1, sz["warm_steps"] // 10), "seed": seed, "threads": threads,
                      "logging_steps": max(1, sz["warm_steps"] // 5), "progress": False, "plot": False,
                      "overwrite": True}}


def arm_recipe(arm: str, sz: dict, warm: Path, teacher: str, data: Path, out: Path, seed: int,
               threads: int) -> dict:
    """One distillation arm from the warm start (see the module docstring)."""
    r = {"name": f"{arm}-s{seed}", "student": {"path": str(warm)}, "teachers": [{"path": teacher, "name": "teacher"}],
         "data": {"train": str(data), "format": "chat", "seq_len": 128},
         "loss": {"kind": "jsd", "beta": 0.5, "ce_weight": 0.0},
         "fusion": {"method": "min_ce", "top_k": 10, "projection": "prefix"},
         "train": {"output_dir": str(out), "max_steps": sz["steps"], "batch_size": sz["batch"], "lr": sz["lr"],
                   "warmup_steps": max(1, sz["steps"] // 10), "seed": seed, "threads": threads,
                   "logging_steps": max(1, sz["steps"] // 5), "progress": False, "plot": False, "overwrite": True}}
    if arm in LAMBDA:
        r["onpolicy"] = {"lambda": LAMBDA[arm], "temperature": 1.0, "top_p": 1.0, "max_new_tokens": sz["new"]}
    return r


def read_results(path: Path) -> dict[tuple[str, int], dict]:
    """(arm, seed) -> result of every whole line of ``path``."""
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a torn last line: that result is redone
            continue
        out[(r["arm"], int(r["seed"]))] = r
    return out


def finished(folder: Path) -> bool:
    """Did a stillroom training run finish in ``folder``?"""
    from stillroom.training.runs import read_marker

    return bool((read_marker(folder) or {}).get("finished"))


def check_settings(out: Path, settings: dict) -> None:
    path = out / "settings.json"
    settings = json.loads(json.dumps(settings))  # as read back (tuples become lists)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            sys.exit(f"{out} holds results of other settings ({old} vs {settings}); pass another --out")
    else:
        path.write_text(json.dumps(settings, indent=1), encoding="utf-8")


def run(out: Path, seeds: list[int], size: str, teacher: str, threads: int, log=print,
        arms: tuple[str, ...] = ARMS) -> dict:
    """Every (arm, seed) not yet in ``out/results.jsonl``, appended as it finishes; returns them all."""
    import torch

    from stillroom.evaluation import load_model
    from stillroom.generation import rollout
    from stillroom.inputs import chat
    from stillroom.testing import PACKAGE_DATA
    from stillroom.training.run import train

    torch.set_num_threads(threads)
    sz = SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, {"size": size, "teacher": str(teacher), "warm_seed": WARM_SEED, **sz})
    train_file, val_file = out / "train.jsonl", out / "validation.jsonl"
    for src, dst, n in ((PACKAGE_DATA / "chat" / "train.jsonl", train_file, sz["train_prompts"]),
                        (PACKAGE_DATA / "chat" / "validation.jsonl", val_file, sz["val_prompts"])):
        lines = src.read_text(encoding="utf-8").splitlines()
        dst.write_text("\n".join(lines[:n] if n else lines) + "\n", encoding="utf-8")
    val = chat.load_examples(val_file)
    if not finished(out / "teacher"):
        t0 = time.perf_counter()
        train(teacher_recipe(sz, teacher, train_file, out / "teacher", threads))
        log(f"task teacher: {sz['teacher_steps']} CE steps on the train completions in {time.perf_counter() - t0:.1f} s")
    teacher = str(out / "teacher")
    t_model, t_tok = load_model(teacher, what="teacher")
    teacher_val = greedy(t_model, t_tok, val, sz["new"])
    teacher_texts = [s.text for s in teacher_val]
    raw = out / "seqkd-raw.jsonl"  # the teacher's greedy completions of the train prompts (resumable)
    t0 = time.perf_counter()
    g = rollout.generate_file(teacher, train_file, raw, max_new_tokens=sz["new"], do_sample=False,
                              progress=False)
    log(f"seq-KD data: {g.written} new + {g.done_before} earlier teacher completions ({g.empty} empty) → {raw} "
        f"({time.perf_counter() - t0:.1f} s)")
    seqkd = out / "seqkd.jsonl"
    recs = [json.loads(x) for x in raw.read_text(encoding="utf-8").splitlines()]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    if not seqkd.exists() or seqkd.read_text(encoding="utf-8") != text:
        seqkd.write_text(text, encoding="utf-8")
    results_path = out / "results.jsonl"
    results = read_results(results_path)
    if ("teacher (reference)", -1) not in results:  # references: the teacher's own text, and the data's
        refs = []
        for name, texts, ended in (("teacher greedy (reference)", teacher_texts, [s.ended for s in teacher_val]),
                                   ("data completion (reference)", [ex.completion for ex in val], [True] * len(val))):
            sc = teacher_scores(t_model, t_tok, val, texts, ended)
            ll, toks, nbytes = (sum(x[i] for x in sc) for i in range(3))
            refs.append({"arm": name, "seed": -1, "ll_per_byte": ll / max(nbytes, 1),
                         "ll_per_token": ll / max(toks, 1),
                         "agree": statistics.fmean(agreement(s, t) for s, t in zip(texts, teacher_texts, strict=True)),
                         "word1": statistics.fmean(first_word_match(s, t)
                                                   for s, t in zip(texts, teacher_texts, strict=True)),
                         "mean_bytes": nbytes / len(val)})
        refs.append({"arm": "teacher (reference)", "seed": -1, "examples": [
            {"id": ex.example_id, "teacher": t} for ex, t in zip(val[:3], teacher_texts, strict=False)]})
        with open(results_path, "a", encoding="utf-8") as f:
            for r in refs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                results[(r["arm"], -1)] = r
    warm = out / "warm"
    for seed in seeds:
        todo = [a for a in (REFERENCE, *arms) if (a, seed) not in results]
        if not todo:
            continue
        if not finished(warm):
            t0 = time.perf_counter()
            train(student_recipe(sz, warm, threads))
            log(f"warm start ({sz['warm_steps']} CE steps) in {time.perf_counter() - t0:.1f} s")
        for arm in todo:
            t0 = time.perf_counter()
            if arm == REFERENCE:
                folder = warm
            else:
                folder = out / "runs" / f"{arm.replace(' ', '_').replace('λ=', 'l')}-s{seed}"
                train(arm_recipe(arm, sz, warm, teacher, seqkd if arm == "seq-KD" else train_file, folder, seed,
                                 threads))
            trained = time.perf_counter() - t0
            s_model, s_tok = load_model(folder)
            q = quality(s_model, s_tok, t_model, t_tok, val, teacher_texts, sz["new"])
            r = {"arm": arm, "seed": seed, **q, "train_s": round(trained, 1),
                 "eval_s": round(time.perf_counter() - t0 - trained, 1)}
            with open(results_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            results[(arm, seed)] = r
            log(f"seed {seed} {arm}: ll/byte {q['ll_per_byte']:.4f} ll/tok {q['ll_per_token']:.4f} agree "
                f"{q['agree']:.4f} word1 {q['word1']:.3f} ended {q['ended']:.2f} ({trained:.0f} s train)")
    return results


# --- report -------------------------------------------------------------------------------------------------


def rows_and_verdict(results: dict, seeds: list[int]) -> tuple[list[list[str]], list[str], str]:
    """The table rows (mean ± half-range per arm), the paired-difference lines and the verdict."""
    rows = []
    for key in ("teacher greedy (reference)", "data completion (reference)"):
        r = results.get((key, -1))
        if r:
            rows.append([key, f"{r['ll_per_byte']:.4f}", f"{r['ll_per_token']:.4f}", f"{r['agree']:.4f}",
                         f"{r['word1']:.3f}", "", f"{r['mean_bytes']:.1f}"])
    for arm in (REFERENCE, *ARMS):
        rs = [results[(arm, s)] for s in seeds if (arm, s) in results]
        if not rs:
            continue
        cells = [arm]
        for k, fmt in (("ll_per_byte", ".4f"), ("ll_per_token", ".4f"), ("agree", ".4f"), ("word1", ".3f"),
                       ("ended", ".2f"), ("mean_bytes", ".1f")):
            vals = [r[k] for r in rs]
            cells.append(f"{statistics.fmean(vals):{fmt}} ± {spread(vals):{fmt}}")
        rows.append(cells)
    paired, wins = [], {}
    base = "off-policy KD"
    for arm in ("on-policy λ=0.5", "on-policy λ=1", "seq-KD"):
        ss = [s for s in seeds if (arm, s) in results and (base, s) in results]
        if not ss:
            continue
        for k in ("ll_per_byte", "agree"):
            d = [results[(arm, s)][k] - results[(base, s)][k] for s in ss]
            half = max(spread([results[(a, s)][k] for s in ss]) for a in (arm, base))
            wins[(arm, k)] = min(d) > 0 and statistics.fmean(d) > half
            paired.append(f"{arm} − {base}, {k}: per seed {' '.join(f'{x:+.4f}' for x in d)}; mean "
                          f"{statistics.fmean(d):+.4f}; larger seed half-range {half:.4f}; "
                          f"{'beats' if wins[(arm, k)] else 'does not beat'} the spread")
    on = [a for a in LAMBDA if wins.get((a, "ll_per_byte")) and wins.get((a, "agree"))]
    some = [f"{a} on {k}" for (a, k), w in wins.items() if w and a in LAMBDA]
    if on:
        verdict = f"goal met: {', '.join(on)} beat off-policy KD by more than the seed spread on both metrics"
    elif some:
        verdict = f"goal partly met: only {', '.join(some)} beat off-policy KD by more than the seed spread"
    else:
        verdict = "goal not met: no on-policy arm beats off-policy KD by more than the seed spread"
    return rows, paired, verdict


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench-onpolicy-quality", help="results folder (resumable)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--size", default="full", choices=sorted(SIZES))
    ap.add_argument("--teacher", default=None, help="teacher folder (default: the shipped teacher-spm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default=",".join(ARMS), help="arms to run")
    a = ap.parse_args(argv)

    from stillroom.demo import DEFAULT

    seeds = [int(s) for s in a.seeds.split(",")]
    teacher = a.teacher or str(DEFAULT / "teacher-spm")
    t0 = time.perf_counter()
    results = run(Path(a.out), seeds, a.size, teacher, a.threads, log=console.print, arms=tuple(a.arms.split(",")))
    sz = SIZES[a.size]
    rows, paired, verdict = rows_and_verdict(results, seeds)
    print_table(f"held-out quality, {len(seeds)} seeds, {sz['steps']} steps × {sz['batch']}, greedy ≤ {sz['new']} "
                f"new tokens; mean ± half-range ({machine()}, {time.perf_counter() - t0:.0f} s)",
                ["arm", "teacher ll/byte", "teacher ll/tok", f"agree ({AGREE_CHARS} ch)", "1st word",
                 "ended", "bytes"], rows)
    for line in paired:
        console.print(line)
    for key in ("teacher (reference)",):
        for e in results.get((key, -1), {}).get("examples", []):
            console.print(f"teacher   {e['id']}: {e['teacher']!r}")
    for arm in (REFERENCE, *ARMS):
        for e in results.get((arm, seeds[0]), {}).get("examples", [])[:1]:
            console.print(f"{arm:>28} {e['id']}: {e['student']!r}")

    def cell(arm: str, k: str) -> str:
        vals = [results[(arm, s)][k] for s in seeds if (arm, s) in results]
        return f"{statistics.fmean(vals):.4f}±{spread(vals):.4f}" if vals else "n/a"

    summary("teacher ll/byte (agree): " + "; ".join(f"{arm} {cell(arm, 'll_per_byte')} ({cell(arm, 'agree')})"
                                                      for arm in (REFERENCE, *ARMS)) + f"; {verdict}")
    return results


if __name__ == "__main__":
    main()
