"""The shape of KD targets on the blocks a student is taught from: how confident, how soft, how close to each other.

``bench.real_fusion`` trains the same student from several teachers' top-k caches; this script reads those caches
over the first ``--blocks`` training blocks and builds each teacher's target on the student's rows exactly as
training does (``student_targets``: a same-tokenizer cache as it is, another tokenizer's projected with
``--projection``, uncovered rows left out). On the rows where every target is defined and the next token has bytes,
per target (means over rows):

- ``mass``: probability on the target's support (the rest is its tail);
- ``top-1``: its largest entry; ``top-1 = gold``: how often that entry is the next token;
- ``q(gold)``: its probability of the next token (0 outside the support);
- ``entropy``: of the support renormalised, in bits — how soft the target is;
- ``bits/byte``: −log₂ q(gold) over the next tokens' UTF-8 bytes, a gold outside the support getting the tail spread
  uniformly over the rest of the student's vocabulary;
- ``TV to X``: total variation between the two targets' supports (½ Σ |q − q'|).

``--soften LABEL=T`` reshapes a target within its support as ``loss.support_temperature: T`` does in training
(``SparseTarget.soften_support``; the row becomes another target, labelled ``LABEL@T``); ``--match-entropy LABEL``
finds, for every other target, the support temperature that gives it ``LABEL``'s mean entropy (bisection; the entropy
of p^(1/T) renormalised rises with T). ``--split-by LABEL`` also reports the rows in two classes by ``LABEL``'s own
tokenization of the block: the student's next token starts where one of ``LABEL``'s tokens starts (both tokenizers cut
there: a cross-tokenizer target gets the teacher's whole top-k), or inside one of ``LABEL``'s tokens (the target is the
teacher's belief conditioned on the bytes of its token the student has already seen, from the same thin top-k).

Trains nothing; minutes on two cores. Writes ``OUT/report.md``, ends with a ``SUMMARY:`` line.

    python -m bench.target_shapes --blocks-from runs/rf-200 --blocks 100 \\
        --target smollm2=runs/rf-200/cache/smollm2 --target gemma3=runs/rf-200/cache/gemma3
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from bench.common import console, machine, summary  # noqa: E402
from bench.kd_rows import inside_rows  # noqa: E402

STATS = ("mass", "top-1", "top-1 = gold", "q(gold)", "entropy")


def support_entropy(probs, temperature: float = 1.0) -> float:
    """Entropy (bits) of a support renormalised after p → p^(1/T) (T = 1: the support as it is)."""
    lp = [math.log(p) / temperature for p in probs if p > 0]
    top = max(lp)
    w = [math.exp(x - top) for x in lp]
    z = sum(w)
    return -sum(x / z * math.log2(x / z) for x in w if x > 0)


def row_stats(q: dict[int, float], gold: int, vocab_size: int) -> tuple[dict[str, float], float]:
    """One row's statistics (:data:`STATS`) and its −log₂ q(gold) (a gold outside the support gets the tail mass
    spread over the ``vocab_size − len(q)`` other ids)."""
    z = sum(q.values())
    top = max(q, key=q.get)
    stats = {"mass": z, "top-1": q[top], "top-1 = gold": float(top == gold), "q(gold)": q.get(gold, 0.0),
             "entropy": support_entropy(q.values())}
    p_gold = q[gold] if gold in q else max(1.0 - z, 1e-12) / (vocab_size - len(q))
    return stats, -math.log2(p_gold)


def total_variation(a: dict[int, float], b: dict[int, float]) -> float:
    """½ Σ |a − b| over the union of the two supports."""
    return 0.5 * sum(abs(a.get(i, 0.0) - b.get(i, 0.0)) for i in set(a) | set(b))


def target_rows(blocks: list[dict], caches: dict[str, Path], student: str, projection: str,
                soften: dict[str, float] | None = None, split_by: str | None = None
                ) -> tuple[list[tuple[int, int, dict]], int, list[bool]]:
    """The rows where every target is defined and the next token has bytes: ``(gold, bytes, {label: {id: p}})``,
    each target built as training builds it (then ``soften[label]`` applied, as ``loss.support_temperature``);
    the student's vocabulary size; and per row whether its next token starts inside one of ``split_by``'s
    tokens (:func:`inside_rows`; all ``False`` without ``split_by``)."""
    from stillroom.models.loading import load_tokenizer
    from stillroom.teachers.cache import CachedTeacher
    from stillroom.tokenization.project import student_targets
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    soften = soften or {}
    s_tok = load_tokenizer(student)
    s_table = TokenTable.from_tokenizer(s_tok)
    texts, ids = [b["text"] for b in blocks], [b["id"] for b in blocks]
    sources, maps = {}, {}
    for label, cache in caches.items():
        teacher = json.loads((cache / "manifest.json").read_text())["teacher"]
        t_table = TokenTable.from_tokenizer(load_tokenizer(teacher))
        maps[label] = (t_table, None if t_table.hash == s_table.hash else VocabMap.cached(t_table, s_table))
        sources[label] = CachedTeacher(cache).signal(texts, ids)
    # the block's text as a same-tokenizer teacher's cache has it
    student_ids = [np.asarray(ids) for ids in s_tok(texts, add_special_tokens=True)["input_ids"]]
    labels, rows, inside = list(caches), [], []
    for sid, outs in zip(student_ids, zip(*(sources[k] for k in labels), strict=True), strict=True):
        split = (inside_rows(maps[split_by][0], outs[labels.index(split_by)].input_ids.numpy(), s_table, sid)
                 if split_by is not None else np.zeros(len(sid), dtype=bool))
        built = {}
        for k, out in zip(labels, outs, strict=True):
            t_table, vmap = maps[k]
            tgt, _ = student_targets(out, sid, s_table, t_table, vmap, fallback=projection, fill=False)
            tgt = tgt.soften_support(soften.get(k, 1.0))
            built[k] = (tgt.ids.numpy(), tgt.logprobs.double().exp().numpy(), tgt.valid.numpy())
        for r in range(len(sid) - 1):
            gold, nb = int(sid[r + 1]), len(s_table.token_bytes[int(sid[r + 1])])
            if nb == 0 or not all(built[k][2][r] for k in labels):
                continue
            rows.append((gold, nb, {k: {int(i): float(p) for i, p in zip(built[k][0][r], built[k][1][r], strict=True)
                                        if p > 0} for k in labels}))
            inside.append(bool(split[r]))
    return rows, len(s_table.token_bytes), inside


def summarise(rows: list[tuple[int, int, dict]], vocab_size: int) -> dict[str, dict]:
    """``{label: {stat: mean, "bits/byte": …, "TV to L": …}, "_rows": {"rows": n, "bytes": b}}``."""
    labels = list(rows[0][2]) if rows else []
    sums = {k: dict.fromkeys((*STATS, "bits", *(f"TV to {o}" for o in labels if o != k)), 0.0) for k in labels}
    n_bytes = 0
    for gold, nb, q in rows:
        n_bytes += nb
        for k in labels:
            st, bits = row_stats(q[k], gold, vocab_size)
            for name, v in st.items():
                sums[k][name] += v
            sums[k]["bits"] += bits
            for o in labels:
                if o != k:
                    sums[k][f"TV to {o}"] += total_variation(q[k], q[o])
    n_rows = max(1, len(rows))
    result = {k: {name: (v / max(1, n_bytes) if name == "bits" else v / n_rows) for name, v in s.items()}
              for k, s in sums.items()}
    for r in result.values():
        r["bits/byte"] = r.pop("bits")
    result["_rows"] = {"rows": len(rows), "bytes": n_bytes}
    return result


def mean_entropy(rows: list[tuple[int, int, dict]], label: str, temperature: float = 1.0) -> float:
    """Mean entropy (bits) of ``label``'s supports renormalised after p → p^(1/T)."""
    return sum(support_entropy(q[label].values(), temperature) for _, _, q in rows) / max(1, len(rows))


def match_entropy(rows: list[tuple[int, int, dict]], label: str, entropy: float, lo: float = 0.05,
                  hi: float = 20.0, tol: float = 1e-4) -> float:
    """The support temperature T at which ``label``'s mean entropy is ``entropy`` (bisection on log T)."""
    if not mean_entropy(rows, label, lo) <= entropy <= mean_entropy(rows, label, hi):
        raise ValueError(f"{label}: no support temperature in [{lo}, {hi}] gives a mean entropy of {entropy:.4f}")
    a, b = math.log(lo), math.log(hi)
    while b - a > tol:
        m = (a + b) / 2
        a, b = (m, b) if mean_entropy(rows, label, math.exp(m)) < entropy else (a, m)
    return math.exp((a + b) / 2)


def table(res: dict[str, dict], cols: list[str]) -> list[str]:
    """A markdown table: one row per target, one column per statistic."""
    md = ["| target | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    return md + [f"| {k} | " + " | ".join(f"{r[c]:.4f}" if c in r else "—" for c in cols) + " |"
                 for k, r in res.items()]


def main(argv: list[str] | None = None) -> None:
    from bench.real_fusion import SMOLLM2

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks-from", type=Path, required=True, help="a bench.real_fusion OUT (its train_blocks.jsonl)")
    ap.add_argument("--blocks", type=int, default=100, help="the first N training blocks")
    ap.add_argument("--target", action="append", required=True, metavar="LABEL=CACHE",
                    help="a teacher's top-k cache over those blocks (repeat)")
    ap.add_argument("--projection", default="next_bytes", help="for a cache of another tokenizer")
    ap.add_argument("--student", default=SMOLLM2, help="the student's tokenizer (a model folder)")
    ap.add_argument("--soften", action="append", default=[], metavar="LABEL=T",
                    help="also LABEL's target with loss.support_temperature T (labelled LABEL@T; repeat)")
    ap.add_argument("--match-entropy", metavar="LABEL", default=None,
                    help="the support temperature giving every other target LABEL's mean entropy")
    ap.add_argument("--split-by", metavar="LABEL", default=None,
                    help="also per class of rows: next token starting at / inside one of LABEL's tokens")
    ap.add_argument("--out", type=Path, default=Path("runs/target-shapes"))
    args = ap.parse_args(argv)
    from stillroom.errors import ConfigError

    caches, soften = {}, {}
    for spec in args.target:
        label, sep, cache = spec.partition("=")
        if not sep or not (Path(cache) / "manifest.json").exists():
            raise ConfigError(f"--target {spec}: expected LABEL=CACHE, a finished top-k cache folder")
        caches[label] = Path(cache)
    for spec in args.soften:
        label, sep, t = spec.partition("=")
        try:
            temperature = float(t)
        except ValueError:
            temperature = 0.0
        if not sep or label not in caches or not temperature > 0:
            raise ConfigError(f"--soften {spec}: expected LABEL=T with LABEL one of --target's "
                              f"({', '.join(caches)}) and T > 0")
        caches[f"{label}@{t}"], soften[f"{label}@{t}"] = caches[label], temperature
    for flag, label in (("--match-entropy", args.match_entropy), ("--split-by", args.split_by)):
        if label is not None and label not in caches:
            raise ConfigError(f"{flag} {label}: not a target label ({', '.join(caches)})")
    lines = (args.blocks_from / "train_blocks.jsonl").read_text().splitlines()[:args.blocks]
    rows, vocab_size, inside = target_rows([json.loads(x) for x in lines], caches, args.student, args.projection,
                                           soften, args.split_by)
    res = summarise(rows, vocab_size)
    n = res.pop("_rows")
    cols = [*STATS, "bits/byte", *(f"TV to {o}" for o in caches)]
    md = [f"# Target shapes\n\nmachine: {machine()}\n\n{len(lines)} blocks of {args.blocks_from}, {n['rows']:,} "
          f"student rows where every target is defined ({n['bytes']:,} bytes); projection `{args.projection}`\n"]
    md += table(res, cols)
    if args.split_by is not None:
        for name, want in (("starting where one of its tokens starts", False), ("starting inside one of its tokens", True)):
            part = [row for row, f in zip(rows, inside, strict=True) if f == want]
            sub = summarise(part, vocab_size)
            m = sub.pop("_rows")
            md += ["", f"rows whose next token is {name} ({args.split_by}): {m['rows']:,} rows "
                       f"({m['rows'] / max(1, n['rows']):.1%}), {m['bytes']:,} bytes", ""]
            md += table(sub, cols)
    matched = {}
    if args.match_entropy is not None:
        goal = res[args.match_entropy]["entropy"]
        matched = {k: match_entropy(rows, k, goal) for k in caches if k != args.match_entropy and k not in soften}
        md += ["", f"support temperature giving {args.match_entropy}'s mean entropy ({goal:.4f} bits):", ""]
        md += [f"- {k}: T = {t:.4f}" for k, t in matched.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    console.print("\n".join(md))
    summary("; ".join([f"{k}: entropy {r['entropy']:.3f} bits, q(gold) {r['q(gold)']:.3f}, {r['bits/byte']:.4f} "
                       f"bits/byte" for k, r in res.items()] + [f"{k} T = {t:.4f}" for k, t in matched.items()]))


if __name__ == "__main__":
    main()
