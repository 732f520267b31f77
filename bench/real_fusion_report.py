"""bench.real_fusion's bookkeeping: per-arm results gathered from a run folder, paired differences, the bar's
verdicts and the markdown report. No training here; the runner is :mod:`bench.real_fusion`."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import machine, spread


def aggregate(results: dict[str, dict[int, float]]) -> dict[str, dict]:
    """Per arm: mean, spread (half range) and the per-seed values, seeds in order."""
    return {arm: {"mean": statistics.fmean(v.values()), "spread": spread(list(v.values())),
                  "seeds": dict(sorted(v.items()))} for arm, v in results.items() if v}


def paired(results: dict[str, dict[int, float]], arm: str, ref: str) -> dict[int, float]:
    """Per-seed difference ``arm − ref`` over the seeds both have (negative: ``arm`` is better)."""
    return {s: results[arm][s] - results[ref][s] for s in sorted(results[arm]) if s in results[ref]}


def verdicts(results: dict[str, dict[int, float]], min_seeds: int = 3) -> list[str]:
    """The bar per fused arm: fused < best KD < CE-only, each gap larger than the larger spread of the pair."""
    agg = aggregate(results)
    kd = {a: agg[a]["mean"] for a in agg if a.startswith("kd-")}
    if "ce-only" not in agg or not kd:
        return ["not enough arms finished for a verdict"]
    best = min(kd, key=kd.get)
    out = []
    for f in (a for a in agg if a.startswith("fused-")):
        n = min(len(agg[a]["seeds"]) for a in (f, best, "ce-only"))
        g1, g2 = agg[best]["mean"] - agg[f]["mean"], agg["ce-only"]["mean"] - agg[best]["mean"]
        s1 = max(agg[f]["spread"], agg[best]["spread"])
        s2 = max(agg[best]["spread"], agg["ce-only"]["spread"])
        holds = g1 > s1 and g2 > s2
        state = (f"bar not yet tested ({n} seed{'s' if n != 1 else ''} < {min_seeds})" if n < min_seeds
                 else f"bar {'HOLDS' if holds else 'does NOT hold'}")
        d = paired(results, f, best)
        out.append(f"{f} {agg[f]['mean']:.4f} vs best KD ({best}) {agg[best]['mean']:.4f} vs CE-only "
                   f"{agg['ce-only']['mean']:.4f} bits/byte; gaps {g1:+.4f} (spread {s1:.4f}) and {g2:+.4f} "
                   f"(spread {s2:.4f}); paired {f} − {best} per seed: "
                   f"{', '.join(f'{s}: {v:+.4f}' for s, v in d.items())}: {state}")
    return out


def collect(out: Path) -> tuple[dict[str, dict[int, float]], dict[str, list[float]], dict[str, float]]:
    """Every finished arm under OUT: arm → {seed: test bits/byte}, arm → train seconds, arm → cache bytes per
    teacher token (``nan`` for results written before it was recorded)."""
    bpb: dict[str, dict[int, float]] = {}
    secs: dict[str, list[float]] = {}
    sizes: dict[str, float] = {}
    for f in sorted(out.glob("seed*/*/result.json")):
        r = json.loads(f.read_text())
        bpb.setdefault(r["arm"], {})[r["seed"]] = r["test_bpb"]
        secs.setdefault(r["arm"], []).append(r["train_seconds"])
        sizes[r["arm"]] = r.get("cache_bytes_per_token", float("nan"))
    return bpb, secs, sizes


def report_md(args, results, secs, refs: dict[str, float], lines: list[str], sizes: dict[str, float] | None = None,
              test_works: tuple[str, ...] | list[str] = ()) -> str:
    """Markdown: the command, machine, scale, per arm mean ± spread and per-seed values, references, verdicts."""
    agg = aggregate(results)
    tokens = args.steps * args.batch_size * args.seq_len
    out = [f"# bench.real_fusion report\n\nmachine: {machine()}\n\n`python -m bench.real_fusion --seeds "
           f"{' '.join(map(str, args.seeds))} --steps {args.steps} --batch-size {args.batch_size} --seq-len "
           f"{args.seq_len} --lr {args.lr} --ce-weight {args.ce_weight} --projection {args.projection} --top-k "
           f"{args.top_k} --eval-chars {args.eval_chars}{' --scratch' if args.scratch else ''}"
           f"{'' if args.temperature == 1 else f' --temperature {args.temperature}'}"
           f"{'' if args.support_temperature == 1 else f' --support-temperature {args.support_temperature}'}`\n\nstudent: "
           f"{'a fresh Llama of the shape of ' if args.scratch else ''}layers {args.layers} of `{args.student_from}`; "
           f"{tokens:,} training tokens per arm ({args.steps} steps × {args.batch_size} × {args.seq_len}); test: "
           f"first {args.eval_chars:,} characters of {', '.join(test_works)}\n",
           "| arm | mean bits/byte | ± spread (half range) | per seed | train s / arm (median) | cache B/token |",
           "|---|---|---|---|---|---|"]
    for arm, a in agg.items():
        out.append(f"| {arm} | {a['mean']:.4f} | {a['spread']:.4f} | "
                   f"{' '.join(f'{s}: {v:.4f}' for s, v in a['seeds'].items())} | "
                   f"{statistics.median(secs[arm]):.0f} | {(sizes or {}).get(arm, float('nan')):.2f} |")
    out.append("")
    if refs:
        out += ["| reference (same text) | bits/byte |", "|---|---|"]
        out += [f"| {k} | {v:.4f} |" for k, v in refs.items()]
        out.append("")
    out += [f"- {v}" for v in lines]
    return "\n".join(out) + "\n"
