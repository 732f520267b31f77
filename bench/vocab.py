"""MinED vocabulary map: stillroom's bounded exact search vs brute force (issue 3 benchmark).

For qwen2.5 -> llama3 and llama3 -> mistral-spm (tokenizers from ../shared):
- stillroom: ``VocabMap.build`` (exact bytes, dict look-ups for distance 1, class-count lower bound + rapidfuzz
  ``cdist`` by groups), median of ``--repeats`` runs;
- brute force: exact byte dict, then rapidfuzz ``process.cdist`` of every unmatched source token against the
  *whole* candidate target vocabulary (multi-threaded C++), first minimum in id order — same rule, so the
  mappings must be identical (checked);
- plain Python loop (FuseLLM style: one edit-distance call per pair in a Python loop), timed on a sample of
  unmatched source tokens and extrapolated.

Run: ``python -m bench.vocab`` (``--repeats 3 --loop-sample 20``). Needs ../shared.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import console, machine, median_seconds, print_table, summary

PAIRS = (("qwen2.5", "llama3"), ("llama3", "mistral-spm"))


def load_table(name: str):
    from transformers import AutoTokenizer

    from stillroom.testing import shared_dir
    from stillroom.tokenization.tokens import TokenTable

    root = shared_dir()
    if root is None:
        raise SystemExit("bench.vocab needs ../shared/tokenizers (set STILLROOM_SHARED)")
    return TokenTable.from_tokenizer(AutoTokenizer.from_pretrained(root / "tokenizers" / name))


def ordinary_ids(table) -> np.ndarray:
    return np.flatnonzero(~table.is_special & np.array([len(b) > 0 for b in table.token_bytes]))


def brute_force(src_t, tgt_t, rows: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact dict, then cdist over the whole candidate vocabulary; returns (mapping, distance) over ordinary ids."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    cand = ordinary_ids(tgt_t)
    exact: dict[bytes, int] = {}
    for i in cand.tolist():
        exact.setdefault(tgt_t.token_bytes[i], i)
    src_ids = ordinary_ids(src_t)
    mapping = np.full(len(src_ids), -1, np.int64)
    dist = np.zeros(len(src_ids), np.int64)
    todo = []
    for k, i in enumerate(src_ids.tolist()):
        hit = exact.get(src_t.token_bytes[i])
        if hit is None:
            todo.append(k)
        else:
            mapping[k] = hit
    choices = [tgt_t.token_bytes[i].decode("latin-1") for i in cand]
    for c0 in range(0, len(todo), rows):
        ks = todo[c0:c0 + rows]
        D = process.cdist([src_t.token_bytes[src_ids[k]].decode("latin-1") for k in ks], choices,
                          scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        arg = D.argmin(axis=1)
        mapping[ks] = cand[arg]
        dist[ks] = D[np.arange(len(ks)), arg]
    return mapping, dist, len(todo)


def python_loop_seconds(src_t, tgt_t, unmatched: list[int], sample: int) -> float:
    """Seconds per unmatched source token for a Python loop with one C edit-distance call per target."""
    from rapidfuzz.distance import Levenshtein

    cand = ordinary_ids(tgt_t).tolist()
    targets = [tgt_t.token_bytes[i] for i in cand]
    picks = np.random.default_rng(0).choice(unmatched, min(sample, len(unmatched)), replace=False)
    start = time.perf_counter()
    for i in picks.tolist():
        s = src_t.token_bytes[i]
        best = (1 << 30, -1)
        for j, t in zip(cand, targets, strict=True):
            d = Levenshtein.distance(s, t)
            if d < best[0]:
                best = (d, j)
    return (time.perf_counter() - start) / len(picks)


def _python_lev(a: bytes, b: bytes) -> int:
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


def pure_python_seconds(src_t, tgt_t, unmatched: list[int], sample: int) -> float:
    """Seconds per unmatched source token for a pure-Python Levenshtein DP loop over every target."""
    targets = [tgt_t.token_bytes[i] for i in ordinary_ids(tgt_t).tolist()]
    picks = np.random.default_rng(1).choice(unmatched, min(sample, len(unmatched)), replace=False)
    start = time.perf_counter()
    for i in picks.tolist():
        s = src_t.token_bytes[i]
        min(_python_lev(s, t) for t in targets)
    return (time.perf_counter() - start) / len(picks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-sample", type=int, default=20)
    ap.add_argument("--dp-sample", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stillroom.tokenization.vocab import VocabMap

    console.print(f"machine: {machine()}")
    rows, parts = [], []
    for src_name, tgt_name in PAIRS:
        src_t, tgt_t = load_table(src_name), load_table(tgt_name)
        ours = median_seconds(lambda s=src_t, t=tgt_t: VocabMap.build(s, t, progress=False),
                              repeats=args.repeats, warmup=0)
        vmap = VocabMap.build(src_t, tgt_t, progress=False)
        start = time.perf_counter()
        ref_map, ref_dist, n_unmatched = brute_force(src_t, tgt_t)
        brute = time.perf_counter() - start
        ids = ordinary_ids(src_t)
        identical = bool(np.array_equal(vmap.mapping[ids], ref_map) and np.array_equal(vmap.distance[ids], ref_dist))
        unmatched = ids[ref_dist > 0].tolist()
        loop = python_loop_seconds(src_t, tgt_t, unmatched, args.loop_sample) * n_unmatched
        dp = pure_python_seconds(src_t, tgt_t, unmatched, args.dp_sample) * n_unmatched
        pair = f"{src_name}->{tgt_name}"
        rows.append([pair, n_unmatched, ours, brute, brute / ours, loop / 60, dp / 60, identical])
        parts.append(f"{pair} {ours:.1f}s vs brute {brute:.1f}s ({brute / ours:.1f}x), C-call loop~{loop / 60:.0f}min "
                     f"({loop / ours:.0f}x), pure-Python loop~{dp / 60:.0f}min ({dp / ours:.0f}x), identical={identical}")
    console.width = max(console.width, 140)
    print_table("MinED vocabulary map: stillroom vs brute force (s) and Python loops (min, extrapolated)",
                ["pair", "unmatched", "stillroom s", "brute cdist s", "brute/ours", "loop+C call min",
                 "pure-Python loop min", "identical"], rows)
    summary("; ".join(parts))


if __name__ == "__main__":
    main()
