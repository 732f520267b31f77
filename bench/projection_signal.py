"""Where does a cross-tokenizer teacher's signal go? Each projection scored as a predictor, before any training.

A projected teacher target is what the student is trained towards; the first thing it must do is predict the
student's next token. This benchmark scores, on held-out text, every projection of Gemma-3-270M's top-k onto
SmolLM2-135M's vocabulary as a predictor of the student's true next token, beside the same-tokenizer teacher
(SmolLM2-135M-Instruct's own top-k) and both teachers' exact cross-entropy — so it shows, in bits per byte,
how much of Gemma's advantage as a model each projection keeps. Minutes, not training runs.

Protocol (fixed before running): the validation works of ``bench.real_fusion`` (never the test works), packed
into ``--blocks`` blocks of ``--seq-len`` SmolLM2 tokens exactly as training packs them; both teachers cached
top-``--top-k`` over the blocks with ``write_cache`` (resumable). Per projection the target is built as
training builds it (``student_targets(..., fill=False)``: rows the projection cannot fill stay undefined), and
for every student row that predicts a real next token:

- *defined*: the projection gives the row a teacher distribution (coverage: share of rows and of bytes);
- *projected bits*: ``−log2 q(gold)`` with ``q`` the target (ids outside its support share the tail uniformly);
- beside it, over the same rows: SmolLM2's own top-k target scored the same way, SmolLM2's exact CE, and
  Gemma's exact CE spread over the student rows of each aligned group (``student_targets``' CE);
- *gold in support*: the gold next token is among the target's ids; *kept mass*: 1 − tail.

Bits are divided by the UTF-8 bytes of the gold tokens of the counted rows. Rows the fill would make one-hot
(FuseLLM / DSKD's MinED) are reported separately: scored as one-hot they cost 0 bits — extra CE, not teacher
signal. Writes ``OUT/results.json`` and ``OUT/report.md``; ends with a ``SUMMARY:`` line.

    python -m bench.projection_signal --blocks 80 --out runs/bench-projection-signal
    python -m bench.projection_signal --blocks 2 --seq-len 64 --out runs/ps-smoke   # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import console, machine, summary  # noqa: E402

PROJECTIONS = ("onehot", "bytes", "prefix", "next_bytes")


def blocks_file(args, out: Path):
    """The validation works packed into blocks of SmolLM2 tokens (as training packs them), written once."""
    from bench.real_fusion import VALIDATION_WORKS
    from stillroom.inputs.blocks import export_blocks, make_blocks
    from stillroom.inputs.text import load_texts
    from stillroom.models.loading import load_tokenizer

    tok = load_tokenizer(args.smollm2)
    rows = [r for w in VALIDATION_WORKS for r in load_texts(args.corpus / w)]
    blocks = make_blocks(rows, tok, args.seq_len)[: args.blocks]
    path = out / "blocks.jsonl"
    if not path.exists():
        export_blocks(blocks, path)
    return blocks, tok


def row_bits(target, gold, vocab: int):
    """``−log2 q(gold)`` per row of a SparseTarget (tail spread uniformly over the ids outside the support), and
    whether the gold id is in the support."""
    import torch

    p = target.logprobs.exp()
    hit = (target.ids == gold[:, None]) & (p > 0)
    q_gold = (p * hit).sum(1)
    outside = vocab - (p > 0).sum(1)
    q = torch.where(hit.any(1), q_gold, target.tail.clamp_min(0) / outside.clamp_min(1))
    return -torch.log2(q.double().clamp_min(1e-300)), hit.any(1)


def score(args, out: Path) -> dict:
    import numpy as np
    import torch

    from stillroom.teachers.cache import CachedTeacher, write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.tokenization.project import student_targets
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    blocks, s_tok = blocks_file(args, out)
    caches = {}
    for name, path in (("smollm2", args.smollm2), ("gemma3", args.gemma3)):
        t = time.perf_counter()
        write_cache(OnlineTeacher(path, top_k=args.top_k), out / "blocks.jsonl", out / "cache" / name,
                    console=console)
        caches[name] = CachedTeacher(out / "cache" / name)
        console.print(f"{name}: cached in {time.perf_counter() - t:.0f} s")
    from stillroom.models.loading import load_tokenizer

    S = TokenTable.from_tokenizer(s_tok)
    G = TokenTable.from_tokenizer(load_tokenizer(args.gemma3))
    v_ss, v_gs = VocabMap.cached(S, S), VocabMap.cached(G, S)
    texts, ids = [b.text for b in blocks], [b.example_id for b in blocks]
    smol, gemma = caches["smollm2"].signal(texts, ids), caches["gemma3"].signal(texts, ids)
    sums: dict[str, dict[str, float]] = {p: {} for p in ("all", *PROJECTIONS)}
    t0 = time.perf_counter()
    for b, so, go in zip(blocks, smol, gemma, strict=True):
        sid = np.asarray(b.input_ids)
        gold = torch.as_tensor(sid[1:], dtype=torch.long)
        nbytes = torch.tensor([len(S.token_bytes[i]) for i in sid[1:]], dtype=torch.float64)
        real = nbytes > 0  # rows whose next token spells bytes (special tokens carry none)
        s_tgt, s_ce = student_targets(so, sid, S, S, v_ss, fallback="onehot", fill=False)
        s_bits, s_hit = row_bits(_rows(s_tgt, len(sid) - 1), gold, S.vocab_size)
        s_exact = s_ce[:-1].double() / math.log(2)
        for proj in PROJECTIONS:
            g_tgt, g_ce = student_targets(go, sid, S, G, v_gs, fallback=proj, fill=False)
            g_tgt = _rows(g_tgt, len(sid) - 1)
            g_bits, g_hit = row_bits(g_tgt, gold, S.vocab_size)
            g_exact = g_ce[:-1].double() / math.log(2)
            defined = g_tgt.valid & real & s_tgt.valid[:-1] & torch.isfinite(g_exact) & torch.isfinite(s_exact)
            if proj == PROJECTIONS[0]:  # every row, whatever the projection: the teachers as models
                every = real & torch.isfinite(g_exact) & torch.isfinite(s_exact) & s_tgt.valid[:-1]
                _add(sums["all"], rows=float(real.sum()), counted=float(every.sum()),
                     bytes=float(nbytes[every].sum()), all_bytes=float(nbytes[real].sum()),
                     smol_exact=float(s_exact[every].sum()), gemma_exact=float(g_exact[every].sum()),
                     smol_topk=float(s_bits[every].sum()), smol_hit=float(s_hit[every].sum()))
            mass = (g_tgt.logprobs.exp().sum(1)).double()
            _add(sums[proj], rows=float(real.sum()), defined=float(defined.sum()),
                 bytes=float(nbytes[defined].sum()), all_bytes=float(nbytes[real].sum()),
                 projected=float(g_bits[defined].sum()), smol_topk=float(s_bits[defined].sum()),
                 smol_exact=float(s_exact[defined].sum()), gemma_exact=float(g_exact[defined].sum()),
                 hit=float(g_hit[defined].sum()), smol_hit=float(s_hit[defined].sum()),
                 kept=float(mass[defined].sum()),
                 onehot_rows=float((real & ~g_tgt.valid).sum()),
                 onehot_bytes=float(nbytes[real & ~g_tgt.valid].sum()))
    console.print(f"scored {len(blocks)} blocks in {time.perf_counter() - t0:.0f} s")
    return sums


def _rows(target, n: int):
    from stillroom.targets import SparseTarget

    return SparseTarget(target.ids[:n], target.logprobs[:n], target.tail[:n], target.valid[:n])


def _add(acc: dict[str, float], **values: float) -> None:
    for k, v in values.items():
        acc[k] = acc.get(k, 0.0) + v


def table(sums: dict) -> tuple[list[str], list[list[str]], dict]:
    a = sums["all"]
    head = {"rows": int(a["rows"]), "bytes": int(a["all_bytes"]),
            "smol_exact": a["smol_exact"] / a["bytes"], "gemma_exact": a["gemma_exact"] / a["bytes"],
            "smol_topk": a["smol_topk"] / a["bytes"], "smol_gold_in_support": a["smol_hit"] / a["counted"]}
    cols = ["projection", "rows defined", "bytes covered", "projected bits/byte", "SmolLM2 top-k, same rows",
            "SmolLM2 exact, same rows", "Gemma exact, same rows", "Gemma advantage as a model",
            "advantage kept by the target", "gold in support (Gemma / SmolLM2)", "mass kept", "one-hot-fill rows"]
    rows, out = [], {}
    for proj in PROJECTIONS:
        s = sums[proj]
        by = s["bytes"]
        r = {"defined": s["defined"] / s["rows"], "bytes_covered": by / s["all_bytes"],
             "projected": s["projected"] / by, "smol_topk": s["smol_topk"] / by, "smol_exact": s["smol_exact"] / by,
             "gemma_exact": s["gemma_exact"] / by, "hit": s["hit"] / s["defined"],
             "smol_hit": s["smol_hit"] / s["defined"], "kept": s["kept"] / s["defined"],
             "onehot_rows": s["onehot_rows"] / s["rows"]}
        r["advantage"] = r["smol_exact"] - r["gemma_exact"]
        r["kept_advantage"] = r["smol_topk"] - r["projected"]
        out[proj] = r
        rows.append([proj, f"{r['defined']:.1%}", f"{r['bytes_covered']:.1%}", f"{r['projected']:.4f}",
                     f"{r['smol_topk']:.4f}", f"{r['smol_exact']:.4f}", f"{r['gemma_exact']:.4f}",
                     f"{r['advantage']:+.4f}", f"{r['kept_advantage']:+.4f}",
                     f"{r['hit']:.1%} / {r['smol_hit']:.1%}", f"{r['kept']:.3f}", f"{r['onehot_rows']:.1%}"])
    return cols, rows, {"all": head, "projections": out}


def main(argv: list[str] | None = None) -> dict:
    from bench.real_fusion import CORPUS, GEMMA3, SMOLLM2

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=80)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smollm2", default=SMOLLM2)
    ap.add_argument("--gemma3", default=GEMMA3)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-projection-signal"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sums = score(args, args.out)
    cols, rows, result = table(sums)
    a = result["all"]
    result.update(machine=machine(), blocks=args.blocks, seq_len=args.seq_len, top_k=args.top_k)
    lines = [f"# Projection signal ({args.blocks} blocks × {args.seq_len} SmolLM2 tokens, top-{args.top_k})", "",
             f"Machine: {result['machine']}", "",
             f"All {a['rows']} rows ({a['bytes']} bytes): SmolLM2 exact {a['smol_exact']:.4f}, Gemma-3 exact "
             f"{a['gemma_exact']:.4f}, SmolLM2 top-{args.top_k} target {a['smol_topk']:.4f} bits/byte "
             f"(gold in support {a['smol_gold_in_support']:.1%}).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    (args.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    console.print("\n".join(lines))
    best = max(result["projections"], key=lambda p: result["projections"][p]["kept_advantage"])
    b = result["projections"][best]
    summary(f"Gemma-3 as a model {a['smol_exact'] - a['gemma_exact']:+.4f} bits/byte vs SmolLM2; best projection "
            f"{best}: target {b['projected']:.4f} vs SmolLM2 top-{args.top_k} {b['smol_topk']:.4f} bits/byte on its "
            f"{b['defined']:.1%} defined rows (kept {b['kept_advantage']:+.4f} of {b['advantage']:+.4f})")
    return result


if __name__ == "__main__":
    main()
