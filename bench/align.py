"""Alignment speed: stillroom's exact and dtw modes vs FuseLLM's plain-Python DTW at 2,048 tokens.

Peers: FuseLLM's alignment (arXiv 2401.10491) as a Python double loop with one C edit-distance call
(rapidfuzz) per cell, then a Python backtrack — twice: as FuseLLM's released code writes it (a numpy matrix
indexed per cell, ``np.argmin`` per step) and as a leaner loop over Python lists (same path, ~3x faster, the
stricter baseline). Both stillroom modes are timed on token ids (tokenization excluded); ``dtw`` output is
checked identical to both peers'. One core: stillroom uses no threads here.

    python -m bench.align            # under `flock /tmp/stillroom-heavy.lock` on shared machines
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.common import machine, median_seconds, print_table, summary

PAIRS = [("llama3", "mistral-spm"), ("qwen2.5", "gpt2")]


def fusellm_dtw_reference(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """FuseLLM's DTW, written plainly: D[i][j] = cost + min(diag, up, left); ties: diag, then up, then left."""
    from rapidfuzz.distance import Levenshtein

    inf = float("inf")
    n, m = len(a), len(b)
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0
    for i in range(n):
        for j in range(m):
            cost = Levenshtein.distance(a[i], b[j])
            D[i + 1][j + 1] = cost + min(D[i][j + 1], D[i + 1][j], D[i][j])
    i, j = n - 1, m - 1
    path = []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = D[i][j] if i > 0 and j > 0 else inf
        up = D[i][j + 1] if i > 0 else inf
        left = D[i + 1][j] if j > 0 else inf
        best = min(diag, up, left)
        if diag == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path


def fusellm_dtw_numpy(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """The same DTW as FuseLLM's released code writes it: a numpy matrix indexed per cell, ``np.argmin`` per
    backtrack step. Slower than :func:`fusellm_dtw_reference` (numpy scalar indexing); same path."""
    from rapidfuzz.distance import Levenshtein

    matrix = np.zeros((len(a) + 1, len(b) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            cost = Levenshtein.distance(x, y)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    path = []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([diag, up, left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--peer-repeats", type=int, default=1)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from stillroom.testing import shared_dir
    from stillroom.tokenization.align import align, dtw_path, fusellm_strings
    from stillroom.tokenization.tokens import TokenTable

    shared = shared_dir()
    if shared is None:
        raise SystemExit("bench.align needs ../shared (real tokenizers and corpus)")
    text = (shared / "corpus" / "botchan.txt").read_text(encoding="utf-8")[20000:60000]
    rows = []
    summaries = []
    for src_name, tgt_name in PAIRS:
        toks = [AutoTokenizer.from_pretrained(shared / "tokenizers" / n) for n in (src_name, tgt_name)]
        tabs = [TokenTable.from_tokenizer(t) for t in toks]
        # the first `tokens` source tokens' text, tokenized by both (tokenization is not timed)
        first = np.array(toks[0](text).input_ids[: args.tokens])
        sub = tabs[0].decode_bytes(first).decode("utf-8", errors="ignore")
        ids = [np.array(t(sub).input_ids) for t in toks]
        n_tok = len(ids[0]) + len(ids[1])

        t_exact = median_seconds(lambda ids=ids, tabs=tabs: align(ids[0], ids[1], tabs[0], tabs[1]), repeats=21, warmup=3)
        t_dtw = median_seconds(lambda ids=ids, tabs=tabs: align(ids[0], ids[1], tabs[0], tabs[1], mode="dtw"), repeats=3, warmup=1)
        sa, sb = fusellm_strings(tabs[0], ids[0]), fusellm_strings(tabs[1], ids[1])
        times = []
        for _ in range(args.peer_repeats):
            t0 = time.perf_counter()
            ref = fusellm_dtw_reference(sa, sb)
            times.append(time.perf_counter() - t0)
        t_lean = float(np.median(times))
        t0 = time.perf_counter()
        ref_np = fusellm_dtw_numpy(sa, sb)
        t_np = time.perf_counter() - t0
        same = dtw_path(sa, sb) == ref == ref_np
        al = align(ids[0], ids[1], tabs[0], tabs[1])
        pair = f"{src_name}/{tgt_name}"
        rows.append([pair, f"{len(ids[0])}/{len(ids[1])}", t_np, t_lean, t_dtw * 1e3, t_exact * 1e3,
                     t_np / t_dtw, t_lean / t_dtw, t_np / t_exact, t_lean / t_exact, n_tok / t_exact / 1e6,
                     al.exact_fraction, same])
        summaries.append(f"{pair}: exact {t_lean / t_exact:,.0f}x vs lean loop / {t_np / t_exact:,.0f}x vs FuseLLM "
                         f"code ({n_tok / t_exact / 1e6:.1f}M tok/s/core); dtw {t_lean / t_dtw:.0f}x / "
                         f"{t_np / t_dtw:.0f}x, identical={same}")
    from bench.common import console

    console.width = max(console.width, 160)
    print_table(f"alignment at {args.tokens} tokens ({machine()})",
                ["pair", "tokens", "FuseLLM code s", "lean loop s", "dtw ms", "exact ms", "dtw x (code)",
                 "dtw x (lean)", "exact x (code)", "exact x (lean)", "exact Mtok/s", "exact frac", "identical"],
                rows)
    summary("; ".join(summaries))


if __name__ == "__main__":
    main()
