"""Where is the stronger teacher stronger? Real-fusion students and teachers scored on two slices of each test work.

``bench.real_fusion`` scores the first ``--eval-chars`` characters of each test work: a work's opening (title,
cast list, the first scene), the most reproduced part of the most reproduced texts in English. This benchmark
scores the same models on that *opening* and on the work's *body* (``--body-chars`` characters from the middle
of each test work, fixed before any result), and both teachers on the text they taught from (their own
cross-entropy over the training blocks, read from the caches the students were trained with). It trains nothing:
it re-scores the students a ``bench.real_fusion --keep-models`` run kept (``RUN/seed{S}/{arm}/model``).

    python -m bench.held_out_slices --runs runs/rf-200 runs/rf-200-keep --paired-with rf-200-keep/kd-smollm2

Writes ``OUT/scores-O-B.json`` (one entry per model and slice for ``--opening-chars O --body-chars B``, reused on a
rerun) and ``OUT/report.md``; ends with a ``SUMMARY:`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import console, machine, spread, summary  # noqa: E402
from bench.real_fusion import CORPUS, TEST_WORKS  # noqa: E402

SLICES = ("opening", "body")


def slices(corpus: Path, opening: int, body: int) -> dict[str, list[str]]:
    """``{"opening": the first ``opening`` characters of each test work, "body": ``body`` from its middle}``."""
    from stillroom.inputs.text import load_texts

    works = ["".join(t for _, t in load_texts(corpus / w)) for w in TEST_WORKS]
    return {"opening": [w[:opening] for w in works], "body": [w[len(w) // 2: len(w) // 2 + body] for w in works]}


def teacher_on_blocks(run: Path, name: str, folder: str) -> float:
    """A teacher's bits/byte over the blocks it taught from, read from its cache (``RUN/cache/NAME`` over
    ``RUN/train_blocks.jsonl``): its ``gold_ce`` summed over every text token but each block's first, over the
    UTF-8 bytes of the same tokens. The first text token is left out for every teacher alike: one with a BOS
    predicts it from nothing, one without does not predict it at all."""
    from stillroom.models.loading import load_tokenizer
    from stillroom.teachers.cache import CachedTeacher
    from stillroom.tokenization.tokens import TokenTable

    table = TokenTable.from_tokenizer(load_tokenizer(folder))
    rows = [json.loads(line) for line in (run / "train_blocks.jsonl").read_text().splitlines()]
    nats, nbytes = 0.0, 0
    for out in CachedTeacher(run / "cache" / name).signal([r["text"] for r in rows], [r["id"] for r in rows]):
        spelled = [len(table.token_bytes[i]) for i in out.input_ids.tolist()]
        text = [i for i, n in enumerate(spelled) if n > 0]
        for t in text[1:]:  # row t - 1 predicts token t
            ce = float(out.gold_ce[t - 1])
            if math.isfinite(ce):
                nats += ce
                nbytes += spelled[t]
    return nats / math.log(2) / nbytes


def models(runs: list[Path], smollm2: str, gemma3: str) -> dict[str, str]:
    """Label -> model folder: the two teachers, then every student whose weights were kept (``RUN-NAME/ARM/seedS``;
    without ``--keep-models`` a run keeps a student's folder but not its weights)."""
    found = {"teacher smollm2": smollm2, "teacher gemma3": gemma3}
    for run in runs:
        for folder in sorted({f.parent for f in run.glob("seed*/*/model/*.safetensors")}):
            found[f"{run.name}/{folder.parent.name}/{folder.parent.parent.name}"] = str(folder)
    return found


def score_all(found: dict[str, str], texts: dict[str, list[str]], path: Path) -> dict[str, float]:
    """``{"LABEL SLICE": bits/byte}`` for every model and slice, appended to ``path`` as each finishes."""
    from bench.real_fusion import bits_per_byte
    from stillroom.evaluation import load_model

    scores = json.loads(path.read_text()) if path.exists() else {}
    for label, folder in found.items():
        if all(f"{label} {s}" in scores for s in SLICES):
            continue
        model, tok = load_model(folder)
        for s in SLICES:
            scores[f"{label} {s}"] = bits_per_byte(model, tok, texts[s], label)
        console.print(f"{label}: opening {scores[f'{label} opening']:.4f}, body {scores[f'{label} body']:.4f}")
        path.write_text(json.dumps(scores, indent=1))
        del model
    return scores


def arm_table(scores: dict[str, float]) -> dict[str, dict[str, dict[int, float]]]:
    """``{"RUN/ARM": {slice: {seed: bits/byte}}}`` for the students."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for key, v in scores.items():
        label, s = key.rsplit(" ", 1)
        if label.startswith("teacher "):
            continue
        arm, seed = label.rsplit("/", 1)
        table.setdefault(arm, {}).setdefault(s, {})[int(seed.removeprefix("seed"))] = v
    return table


def report(args, scores: dict[str, float], on_blocks: dict[str, float]) -> tuple[str, str]:
    """Markdown report and the summary line."""
    t = {name: {s: scores[f"teacher {name} {s}"] for s in SLICES} for name in ("smollm2", "gemma3")}
    lines = [f"# Held-out slices\n\nmachine: {machine()}\n\ncommand: `python -m bench.held_out_slices --runs "
             f"{' '.join(str(r) for r in args.runs)} --opening-chars {args.opening_chars} --body-chars "
             f"{args.body_chars}`\n",
             "| teacher | opening bits/byte | body bits/byte | its training blocks (cache) |", "|---|---|---|---|"]
    for name in ("smollm2", "gemma3"):
        blk = f"{on_blocks[name]:.4f}" if name in on_blocks else "—"
        lines.append(f"| {name} | {t[name]['opening']:.4f} | {t[name]['body']:.4f} | {blk} |")
    lead = {s: t["smollm2"][s] - t["gemma3"][s] for s in SLICES}
    blk_lead = on_blocks["smollm2"] - on_blocks["gemma3"] if len(on_blocks) == 2 else float("nan")
    lines.append(f"\nGemma-3's lead as a model: opening {lead['opening']:+.4f}, body {lead['body']:+.4f}, training "
                 f"blocks {blk_lead:+.4f} bits/byte\n")
    table = arm_table(scores)
    lines += ["| arm | seeds | opening (mean ± half-range) | body (mean ± half-range) | opening per seed | body per seed |",
              "|---|---|---|---|---|---|"]
    for arm, by in table.items():
        cells = []
        for s in SLICES:
            v = list(by[s].values())
            cells.append(f"{statistics.fmean(v):.4f} ± {spread(v):.4f}")
        per = [" / ".join(f"{by[s][k]:.4f}" for k in sorted(by[s])) for s in SLICES]
        lines.append(f"| {arm} | {', '.join(str(k) for k in sorted(by['body']))} | {cells[0]} | {cells[1]} | "
                     f"{per[0]} | {per[1]} |")
    ref = args.paired_with
    if ref in table:
        lines += [f"\nPaired per seed against `{ref}` (negative = better):\n",
                  "| arm | opening per seed | body per seed |", "|---|---|---|"]
        for arm, by in table.items():
            if arm == ref:
                continue
            cells = []
            for s in SLICES:
                common = sorted(set(by[s]) & set(table[ref][s]))
                cells.append(" / ".join(f"{k}: {by[s][k] - table[ref][s][k]:+.4f}" for k in common) or "—")
            lines.append(f"| {arm} | {cells[0]} | {cells[1]} |")
    line = (f"Gemma-3 leads SmolLM2 by {lead['opening']:+.4f} bits/byte on the openings, {lead['body']:+.4f} on the "
            f"bodies, {blk_lead:+.4f} on its training blocks")
    return "\n".join(lines) + "\n", line


def main(argv: list[str] | None = None) -> None:
    from bench.real_fusion import GEMMA3, SMOLLM2

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="bench.real_fusion OUT folders")
    ap.add_argument("--opening-chars", type=int, default=2000, help="bench.real_fusion's --eval-chars")
    ap.add_argument("--body-chars", type=int, default=8000)
    ap.add_argument("--paired-with", default=None, help="RUN-NAME/ARM to pair every other arm with")
    ap.add_argument("--smollm2", default=SMOLLM2)
    ap.add_argument("--gemma3", default=GEMMA3)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/held-out-slices"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = slices(args.corpus, args.opening_chars, args.body_chars)
    scores = score_all(models(args.runs, args.smollm2, args.gemma3), texts,
                       args.out / f"scores-{args.opening_chars}-{args.body_chars}.json")
    cache_run = next((r for r in args.runs if (r / "cache" / "gemma3").is_dir()), None)
    folders = {"smollm2": args.smollm2, "gemma3": args.gemma3}
    on_blocks = {n: teacher_on_blocks(cache_run, n, f) for n, f in folders.items()} if cache_run else {}
    md, line = report(args, scores, on_blocks)
    (args.out / "report.md").write_text(md, encoding="utf-8")
    console.print(md)
    summary(line)


if __name__ == "__main__":
    main()
