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
signal.

The other direction (``objective: xtoken``, X-Token) projects nothing of the teacher: its target is Gemma's own
top-k at every aligned boundary (the student row before an alignment group), against the student moved into
Gemma's vocabulary by the re-tokenization map (``stillroom.tokenization.reverse``). Its row scores, on those
rows, Gemma's top-k probability of the *first Gemma piece* of the student's gold token (the gold token itself
where Gemma spells it as one token: most rows) the same way — its tail spread over the Gemma ids some student
token reaches (46,444 of 262,144: spread over all of them, every miss would cost log2(262144/49152) = 2.4 bits
more than a student-vocabulary target's, an artefact of the scoring, not of the signal) — and reports the share of the top-k mass on Gemma ids
some student token reaches (the rest joins the tail: the student cannot express it). Writes ``OUT/results.json`` and ``OUT/report.md``; ends with a ``SUMMARY:`` line.

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
    sums["xtoken"] = xtoken_sums(blocks, smol, gemma, S, G, load_tokenizer(args.gemma3), v_ss)
    console.print(f"scored {len(blocks)} blocks in {time.perf_counter() - t0:.0f} s")
    return sums


def xtoken_sums(blocks, smol, gemma, S, G, g_tok, v_ss) -> dict[str, float]:
    """The X-Token row (module docstring): boundary rows, Gemma's own top-k scored on the first Gemma piece of
    the student's gold token, SmolLM2's top-k and both exact CEs on the same rows, and the reachable mass."""
    import numpy as np
    import torch

    from stillroom.tokenization.align import align
    from stillroom.tokenization.project import student_targets
    from stillroom.tokenization.reverse import reverse_map

    w = reverse_map(S, G, g_tok)
    reach = w.ptr.diff() > 0
    first = torch.full((len(S.token_bytes),), -1, dtype=torch.long)  # each student token's first Gemma piece
    cols = torch.repeat_interleave(torch.arange(w.ptr.numel() - 1), w.ptr.diff())
    best = torch.zeros(len(S.token_bytes))
    for s, t, v in zip(w.rows.tolist(), cols.tolist(), w.weights.tolist(), strict=True):
        if v > best[s]:
            best[s], first[s] = v, t
    acc: dict[str, float] = {}
    for b, so, go in zip(blocks, smol, gemma, strict=True):
        sid = np.asarray(b.input_ids)
        al = align(go.input_ids.numpy(), sid, G, S)
        g = np.asarray(al.groups).reshape(-1, 4)
        g = g[(g[:, 0] >= 1) & (g[:, 2] >= 1)]
        s_rows, t_rows = torch.as_tensor(g[:, 2] - 1), torch.as_tensor(g[:, 0] - 1)
        gold = torch.as_tensor(sid[g[:, 2]], dtype=torch.long)
        nbytes = torch.tensor([len(S.token_bytes[i]) for i in gold.tolist()], dtype=torch.float64)
        s_tgt, s_ce = student_targets(so, sid, S, S, v_ss, fallback="onehot", fill=False)
        s_bits, _ = row_bits(_rows(s_tgt, len(sid) - 1), torch.as_tensor(sid[1:]), S.vocab_size)
        lp, ids, tail = go.topk_logprobs[t_rows].double(), go.topk_ids[t_rows].long(), go.tail[t_rows].double()
        p = lp.exp()
        piece = first[gold]
        hit = (ids == piece[:, None]) & (p > 0)
        outside = int(reach.sum()) - ((p > 0) & reach[ids]).sum(1)  # the tail over the ids a student token reaches
        q = torch.where(hit.any(1), (p * hit).sum(1), tail.clamp_min(0) / outside.clamp_min(1))
        bits = -torch.log2(q.clamp_min(1e-300))
        g_exact = go.gold_ce[t_rows].double() / math.log(2)  # Gemma's CE of its own next token at the boundary
        s_exact = s_ce[s_rows].double() / math.log(2)
        ok = (nbytes > 0) & (piece >= 0) & torch.isfinite(s_exact) & s_tgt.valid[s_rows] & torch.isfinite(g_exact)
        one = ok & (torch.tensor([len(G.token_bytes[t]) for t in piece.clamp_min(0).tolist()]) == nbytes)
        _add(acc, rows=float(len(sid) - 1), defined=float(ok.sum()), bytes=float(nbytes[ok].sum()),
             projected=float(bits[ok].sum()), smol_topk=float(s_bits[s_rows][ok].sum()),
             smol_exact=float(s_exact[ok].sum()), hit=float(hit.any(1)[ok].sum()),
             kept=float((p * reach[ids]).sum(1)[ok].sum()), topk_mass=float(p.sum(1)[ok].sum()),
             whole=float(one.sum()))
    return acc


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
    x = sums.get("xtoken")
    if x:
        by = x["bytes"]
        out["xtoken"] = {"defined": x["defined"] / x["rows"], "projected": x["projected"] / by,
                         "smol_topk": x["smol_topk"] / by, "smol_exact": x["smol_exact"] / by,
                         "hit": x["hit"] / x["defined"], "reached_mass": x["kept"] / x["defined"],
                         "topk_mass": x["topk_mass"] / x["defined"], "whole_gold": x["whole"] / x["defined"]}
        out["xtoken"]["kept_advantage"] = out["xtoken"]["smol_topk"] - out["xtoken"]["projected"]
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
    x = result["projections"].get("xtoken")
    if x:
        lines += ["", "X-Token's direction (Gemma's own top-k at the aligned boundaries, scored on the first Gemma piece "
                  "of the student's gold token):", "",
                  "| rows defined | Gemma top-k bits/byte | SmolLM2 top-k, same rows | SmolLM2 exact, same rows | "
                  "target better by | gold piece in support | top-k mass | of it on ids a student token reaches | "
                  "gold one Gemma token |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {x['defined']:.1%} | {x['projected']:.4f} | {x['smol_topk']:.4f} | {x['smol_exact']:.4f} | "
                  f"{x['kept_advantage']:+.4f} | {x['hit']:.1%} | {x['topk_mass']:.3f} | "
                  f"{x['reached_mass'] / x['topk_mass']:.1%} | {x['whole_gold']:.1%} |"]
    (args.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    console.print("\n".join(lines))
    best = max(PROJECTIONS, key=lambda p: result["projections"][p]["kept_advantage"])
    b = result["projections"][best]
    summary(f"Gemma-3 as a model {a['smol_exact'] - a['gemma_exact']:+.4f} bits/byte vs SmolLM2; best projection "
            f"{best}: target {b['projected']:.4f} vs SmolLM2 top-{args.top_k} {b['smol_topk']:.4f} bits/byte on its "
            f"{b['defined']:.1%} defined rows (kept {b['kept_advantage']:+.4f} of {b['advantage']:+.4f})")
    return result


if __name__ == "__main__":
    main()
