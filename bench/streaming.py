"""Streaming data: peak RSS of packing + export, and of a short training run, streamed vs in memory.

    python -m bench.streaming [--sizes-mb 10 1000] [--max-seconds 300]

Data: the Shakespeare corpus of ``../shared`` repeated into one ``.txt`` of each size (in /tmp, deleted after),
read with ``documents="paragraph"``; the demo's student tokenizer; blocks of 128 tokens. Each configuration
runs in a fresh child process that reports its peak RSS (``getrusage``) and, for the export, the peak RSS
after every hundredth of the text read, so flatness shows even when a run is cut at ``--max-seconds``.

- ``export``: ``iter_texts`` → ``iter_blocks`` → ``export_blocks`` (streamed) vs ``load_texts`` →
  ``make_blocks`` → ``export_blocks`` (in memory);
- ``train``: ``stillroom.training.run.train`` for 3 steps (batch 4, a 2-layer GPT-2 from scratch, plain CE) with
  ``data.streaming: true`` vs the in-memory blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, peak_rss_gb, print_table, run_child, summary


def make_corpus(path: Path, size_mb: float) -> int:
    """Shakespeare repeated until ``size_mb`` MB; returns the bytes written."""
    from stillroom.testing import shared_dir

    works = [p.read_bytes() for p in sorted((shared_dir() / "corpus" / "shakespeare").glob("*.txt"))]
    target, n = int(size_mb * 1e6), 0
    with path.open("wb") as f:
        while n < target:
            for w in works:
                w = w[: target - n]
                f.write(w + b"\n\n")
                n += len(w) + 2
                if n >= target:
                    break
    return n


def child_export(path: str, mode: str, max_seconds: float) -> dict:
    from transformers import AutoTokenizer

    from stillroom.demo import DEFAULT
    from stillroom.inputs.blocks import export_blocks, iter_blocks, make_blocks
    from stillroom.inputs.text import iter_texts, load_texts

    tok = AutoTokenizer.from_pretrained(DEFAULT / "student-tokenizer")
    base = peak_rss_gb()
    total = os.path.getsize(path)
    marks: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    chars = 0
    cut = False

    def rows():
        nonlocal chars, cut
        src = iter_texts(path, documents="paragraph") if mode == "stream" else load_texts(path, documents="paragraph")
        for r in src:
            chars += len(r[1]) + 2
            if len(marks) < 100 and chars >= total * (len(marks) + 1) / 100:
                marks.append((chars / 1e6, peak_rss_gb()))
            if time.perf_counter() - t0 > max_seconds:
                cut = True
                return
            yield r

    with tempfile.TemporaryDirectory() as d:
        blocks = iter_blocks(rows(), tok, 128, warn_padding=False) if mode == "stream" else \
            make_blocks(list(rows()), tok, 128, warn_padding=False)
        n = export_blocks(blocks, Path(d) / "blocks.jsonl")
    return {"rss_gb": peak_rss_gb(), "base_gb": base, "blocks": n, "mb_read": chars / 1e6, "cut": cut,
            "seconds": time.perf_counter() - t0, "marks": marks}


def child_train(path: str, mode: str) -> dict:
    from stillroom.demo import DEFAULT
    from stillroom.training.run import train

    tmp = tempfile.TemporaryDirectory()
    out = tmp.name
    raw = {"student": {"tokenizer": str(DEFAULT / "student-tokenizer"),
                       "config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256}},
           "data": {"train": path, "documents": "paragraph", "seq_len": 128, "streaming": mode == "stream"},
           "loss": {"ce_weight": 1.0},
           "train": {"output_dir": out, "max_steps": 3, "batch_size": 4, "progress": False, "plot": False,
                     "threads": 1, "logging_steps": 1}}
    t0 = time.perf_counter()
    train(raw)
    res = {"rss_gb": peak_rss_gb(), "seconds": time.perf_counter() - t0}
    tmp.cleanup()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 1000])
    ap.add_argument("--in-memory-up-to-mb", type=float, default=10, help="in-memory runs only up to this size")
    ap.add_argument("--max-seconds", type=float, default=300, help="cut each export after this long")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        what, path, mode, limit = a.child
        res = child_export(path, mode, float(limit)) if what == "export" else child_train(path, mode)
        print(json.dumps(res))
        return
    rows, results = [], {}
    for size in a.sizes_mb:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"corpus-{size:g}mb.txt"
            n = make_corpus(path, size)
            for mode in ("stream", "memory"):
                if mode == "memory" and size > a.in_memory_up_to_mb:
                    continue
                for what in ("export", "train"):
                    r = run_child("bench.streaming", ["--child", what, str(path), mode, str(a.max_seconds)])
                    results[size, mode, what] = r
                    if "error" in r:
                        rows.append([f"{n / 1e6:,.0f} MB", mode, what, "error", r["error"], "", ""])
                        continue
                    read = f"{r['mb_read']:,.0f} MB" + (" (cut)" if r.get("cut") else "") if what == "export" else ""
                    ms = r.get("marks", [])
                    marks = " ".join(f"{m:,.1f}:{g:.2f}" for m, g in ms[max(1, len(ms) // 5) - 1::max(1, len(ms) // 5)])
                    rows.append([f"{n / 1e6:,.0f} MB", mode, what, f"{r['rss_gb']:.2f}", read, f"{r['seconds']:.0f} s",
                                 marks])
    print(machine())
    print_table("peak RSS (GB); export marks = MB read:peak RSS GB so far", ["data", "mode", "run", "peak RSS",
                                                                             "read", "time", "marks"], rows)
    print(json.dumps({f"{k[0]:g}/{k[1]}/{k[2]}": v for k, v in results.items()}), file=sys.stderr)
    s = [f"{k[0]:g} MB {k[1]} {k[2]} {v['rss_gb']:.2f} GB" for k, v in results.items() if "rss_gb" in v]
    summary("peak RSS: " + "; ".join(s))


if __name__ == "__main__":
    main()
