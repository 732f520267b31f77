"""Align two tokenizations of the same text, from token ids alone.

An :class:`Alignment` is a list of *groups* ``(src_start, src_end, tgt_start, tgt_end)`` that partition both
token sequences in order: group ``g`` says that source tokens ``src_start:src_end`` spell the same text as
target tokens ``tgt_start:tgt_end``. ``exact[g]`` says their bytes are identical.

Two modes:

- ``"exact"`` (default): build both byte streams from the :class:`~stillroom.tokenization.tokens.TokenTable` s and cut
  where both cumulative byte offsets coincide (``np.intersect1d``, O(n + m), no Python loop over tokens).
  Where the streams differ (normalisers that lowercase / strip accents / NFC, unknown-token replacement,
  dropped whitespace), a byte-level Levenshtein alignment (rapidfuzz opcodes, C speed) maps one stream onto
  the other; cuts are kept only where they map onto each other inside equal runs, and every group touched
  by a difference is marked inexact. Special tokens (BOS/EOS/CLS/SEP...) get their own groups, paired 1-to-1
  when both sides have one at the same place. Unknown tokens (``<unk>``/``[UNK]``) stand for missing bytes
  and join the group that follows them.
- ``"dtw"``: FuseLLM's dynamic-programming alignment over token *strings* (arXiv 2401.10491), reproduced
  exactly (same recurrence, cost and tie order) for users who want FuseLLM's behaviour, but computed with
  a C pairwise edit-distance matrix and a vectorised row recurrence instead of a Python double loop.

:func:`project` then moves a teacher's top-k distributions onto student positions (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from stillroom.tokenization.tokens import TokenTable

if TYPE_CHECKING:
    pass

_BIG = 1 << 30  # "infinity" for the int32 DTW matrix (exact integer arithmetic: ties stay ties)


@dataclass(eq=False)
class Alignment:
    """Groups ``[G, 4]`` int64 ``(src_start, src_end, tgt_start, tgt_end)`` partitioning both sequences in order."""

    groups: np.ndarray
    exact: np.ndarray  # bool [G]: the group's source and target bytes are identical
    src_ids: np.ndarray
    tgt_ids: np.ndarray
    src_table: TokenTable = field(repr=False)
    tgt_table: TokenTable = field(repr=False)
    mode: str = "exact"

    @property
    def src_len(self) -> int:
        return int(self.src_ids.shape[0])

    @property
    def tgt_len(self) -> int:
        return int(self.tgt_ids.shape[0])

    def __len__(self) -> int:
        return int(self.groups.shape[0])

    @property
    def one_to_one(self) -> np.ndarray:
        """bool [G]: groups with exactly one token on each side."""
        g = self.groups
        return ((g[:, 1] - g[:, 0]) == 1) & ((g[:, 3] - g[:, 2]) == 1)

    @property
    def exact_fraction(self) -> float:
        """Share of target tokens in exact groups (1.0 for two lossless tokenizations of the same text)."""
        if self.tgt_len == 0:
            return 1.0
        g = self.groups
        return float(((g[:, 3] - g[:, 2]) * self.exact).sum() / self.tgt_len)

    def to_dict(self) -> dict:
        """JSON-ready: groups with ids, token strings, text of each side and exactness."""
        out = []
        a, a_off = self.src_table.pieces(self.src_ids)
        b, b_off = self.tgt_table.pieces(self.tgt_ids)
        a, b = a.tobytes(), b.tobytes()
        for (s0, s1, t0, t1), ex in zip(self.groups.tolist(), self.exact.tolist(), strict=True):
            out.append({
                "src": [s0, s1], "tgt": [t0, t1], "exact": bool(ex),
                "src_ids": self.src_ids[s0:s1].tolist(), "tgt_ids": self.tgt_ids[t0:t1].tolist(),
                "src_tokens": [self.src_table.token_strings[i] for i in self.src_ids[s0:s1]],
                "tgt_tokens": [self.tgt_table.token_strings[i] for i in self.tgt_ids[t0:t1]],
                "src_text": a[a_off[s0]:a_off[s1]].decode("utf-8", errors="replace"),
                "tgt_text": b[b_off[t0]:b_off[t1]].decode("utf-8", errors="replace"),
            })
        return {"mode": self.mode, "src_len": self.src_len, "tgt_len": self.tgt_len,
                "exact_fraction": self.exact_fraction, "groups": out}


# ---------------------------------------------------------------------------------------------------------
# exact mode
# ---------------------------------------------------------------------------------------------------------
def _byte_cuts(a: np.ndarray, a_off: np.ndarray, b: np.ndarray, b_off: np.ndarray):
    """Common cut points ``(p, q)`` of two byte streams (strictly increasing, first (0,0), last the ends)
    and, per segment between cuts, whether its bytes are untouched by any difference."""
    la, lb = a.shape[0], b.shape[0]
    if la == lb and np.array_equal(a, b):  # the common case: same text, lossless tokenizers
        mark = np.zeros(la + 1, dtype=np.uint8)  # offsets are sorted: a bitmap beats np.intersect1d's hashing
        mark[a_off] = 1
        mark[b_off] |= 2
        common = np.flatnonzero(mark == 3)
        return common, common, np.ones(max(common.shape[0] - 1, 0), dtype=bool)
    if la == 0 or lb == 0:
        p = np.array([0, la] if la or lb else [0], dtype=np.int64)
        q = np.array([0, lb] if la or lb else [0], dtype=np.int64)
        return p, q, np.zeros(p.shape[0] - 1, dtype=bool)

    from rapidfuzz.distance import Levenshtein

    ops = np.array([(o[1], o[2], o[3], o[4]) for o in Levenshtein.opcodes(
        a.tobytes().decode("latin-1"), b.tobytes().decode("latin-1")).as_list() if o[0] == "equal"],
        dtype=np.int64).reshape(-1, 4)
    ea1, ea2, eb1, _ = ops.T
    diff_a = np.ones(la, dtype=np.int64)  # 1 where a byte is not inside an equal run
    diff_b = np.ones(lb, dtype=np.int64)
    for x1, x2, y1, y2 in ops.tolist():  # one entry per equal run (few), not per byte
        diff_a[x1:x2] = 0
        diff_b[y1:y2] = 0
    # candidate cuts: every source boundary that sits inside (or at an edge of) an equal run, mapped across;
    # at a junction of two runs both mappings are candidates
    pa = np.unique(a_off)
    cand_p, cand_q = [], []
    if ops.shape[0]:
        k = np.searchsorted(ea1, pa, side="right") - 1
        ok = (k >= 0) & (pa <= ea2[np.maximum(k, 0)])
        cand_p.append(pa[ok])
        cand_q.append(eb1[k[ok]] + pa[ok] - ea1[k[ok]])
        k = np.searchsorted(ea2, pa, side="left")
        ok = (k < ea2.shape[0]) & (ea1[np.minimum(k, ea1.shape[0] - 1)] <= pa)
        cand_p.append(pa[ok])
        cand_q.append(eb1[k[ok]] + pa[ok] - ea1[k[ok]])
    p = np.concatenate(cand_p) if cand_p else np.zeros(0, dtype=np.int64)
    q = np.concatenate(cand_q) if cand_q else np.zeros(0, dtype=np.int64)
    keep = np.isin(q, b_off) & (p > 0) & (q > 0) & (p < la) & (q < lb)
    p, q = p[keep], q[keep]
    order = np.lexsort((q, p))
    p = np.concatenate([[0], p[order], [la]]).astype(np.int64)
    q = np.concatenate([[0], q[order], [lb]]).astype(np.int64)
    while True:  # keep a strictly increasing chain (drops the rare duplicate at run junctions)
        bad = np.zeros(p.shape[0], dtype=bool)
        bad[1:-1] = (np.diff(p)[:-1] <= 0) | (np.diff(q)[:-1] <= 0)
        if not bad.any():
            break
        p, q = p[~bad], q[~bad]
    if p.shape[0] > 2 and (p[-1] <= p[-2] or q[-1] <= q[-2]):
        p, q = np.delete(p, -2), np.delete(q, -2)
    cs_a = np.concatenate([[0], np.cumsum(diff_a)])
    cs_b = np.concatenate([[0], np.cumsum(diff_b)])
    clean = ((cs_a[p[1:]] - cs_a[p[:-1]]) == 0) & ((cs_b[q[1:]] - cs_b[q[:-1]]) == 0) & (np.diff(p) == np.diff(q))
    return p, q, clean


def _side(ids: np.ndarray, table: TokenTable):
    """Byte stream over the non-special tokens, their offsets, and the index map back to ``ids``."""
    stream, offsets = table.pieces(ids, checked=True)
    special = table.is_special[ids]
    if table.unk_id is not None:
        special &= ids != table.unk_id  # unknown tokens are text (of unknown bytes), not markers
    ns = np.flatnonzero(~special)
    off = np.concatenate([offsets[ns], offsets[-1:]]) if ns.size else np.zeros(1, dtype=np.int64)
    return stream, off, ns


def _first_index(off: np.ndarray, p: np.ndarray) -> np.ndarray:
    """For each value in ``p`` (all present in the sorted ``off``), the first index where ``off`` holds it."""
    first = np.empty(off.shape[0], dtype=bool)
    first[0] = True
    np.not_equal(off[1:], off[:-1], out=first[1:])
    idx = np.flatnonzero(first)
    pos = np.empty(int(off[-1]) + 1, dtype=np.int64)
    pos[off[idx]] = idx
    return pos[p]


def _align_exact(src: np.ndarray, tgt: np.ndarray, st: TokenTable, tt: TokenTable):
    a, a_off, ns_a = _side(src, st)
    b, b_off, ns_b = _side(tgt, tt)
    p, q, clean = _byte_cuts(a, a_off, b, b_off)
    # byte cuts -> cuts in non-special token indices (zero-length tokens join the following group)
    ci = _first_index(a_off, p)
    cj = _first_index(b_off, q)
    na, nb = ns_a.shape[0], ns_b.shape[0]
    if ci[-1] != na or cj[-1] != nb:
        if ci.shape[0] == 1:
            ci, cj = np.append(ci, na), np.append(cj, nb)
            clean = np.append(clean, True)
        else:
            ci[-1], cj[-1] = na, nb
    # -> cuts in full indices; specials sitting exactly at a cut get their own groups there
    hi_a = np.append(ns_a, src.shape[0])[ci]  # first non-special token after the cut (or the end)
    lo_a = np.where(ci > 0, np.append(0, ns_a + 1)[ci], 0)  # just after the last non-special before it
    hi_b = np.append(ns_b, tgt.shape[0])[cj]
    lo_b = np.where(cj > 0, np.append(0, ns_b + 1)[cj], 0)
    dup_a = np.concatenate([[False], ci[1:] == ci[:-1]])  # a side with no text: its specials sit at cut 0
    dup_b = np.concatenate([[False], cj[1:] == cj[:-1]])
    lo_a = np.where(dup_a, hi_a, lo_a)
    lo_b = np.where(dup_b, hi_b, lo_b)
    regular = np.stack([hi_a[:-1], lo_a[1:], hi_b[:-1], lo_b[1:]], axis=1)
    has_special = np.flatnonzero((hi_a > lo_a) | (hi_b > lo_b))
    if has_special.size == 0:
        groups, exact = regular, clean
    else:
        parts, flags, prev = [], [], 0
        for k in has_special.tolist():
            parts.append(regular[prev:k])
            flags.append(clean[prev:k])
            prev = k
            sa, sb = range(lo_a[k], hi_a[k]), range(lo_b[k], hi_b[k])
            n_pair = min(len(sa), len(sb))
            rows = [(sa[x], sa[x] + 1, sb[x], sb[x] + 1) for x in range(n_pair)]  # paired specials
            rows += [(x, x + 1, hi_b[k], hi_b[k]) for x in sa[n_pair:]]  # source-only specials
            rows += [(hi_a[k], hi_a[k], x, x + 1) for x in sb[n_pair:]]  # target-only specials
            parts.append(np.array(rows, dtype=np.int64).reshape(-1, 4))
            flags.append(np.array([x < n_pair for x in range(len(rows))], dtype=bool))
        parts.append(regular[prev:])
        flags.append(clean[prev:])
        groups, exact = np.concatenate(parts).astype(np.int64), np.concatenate(flags)
    return groups, exact


# ---------------------------------------------------------------------------------------------------------
# dtw mode (FuseLLM)
# ---------------------------------------------------------------------------------------------------------
def fusellm_strings(table: TokenTable, ids: np.ndarray) -> list[str]:
    """FuseLLM's token strings: the raw vocabulary pieces with the ``Ġ`` / ``▁`` markers removed."""
    return [table.token_strings[i].replace("Ġ", "").replace("▁", "") for i in ids.tolist()]


def dtw_path(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """FuseLLM's DTW path over two string sequences, identical to its Python double loop.

    ``D[i][j] = cost(a_i, b_j) + min(D[i-1][j-1], D[i-1][j], D[i][j-1])`` with cost = Levenshtein distance,
    backtracking from the last cell and preferring, on ties, the diagonal, then a step in ``a``, then in ``b``.

    Speed: the cost matrix comes from one C call (``rapidfuzz.process.cdist``); each row of the recurrence is
    vectorised exactly: with ``m[j] = min(D[i-1][j-1], D[i-1][j])`` and ``C`` the prefix sums of the row's
    costs, ``D[i][j] = C[j] + min_{k<=j}(m[k] - C[k-1])`` — a cumulative minimum (integers, so no ties move).
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return []
    # pairwise costs over the distinct strings only (a text repeats its tokens), then gathered
    ua, ia = np.unique(np.array(a, dtype=object), return_inverse=True)
    ub, ib = np.unique(np.array(b, dtype=object), return_inverse=True)
    cost_u = process.cdist(list(ua), list(ub), scorer=Levenshtein.distance, dtype=np.int32, workers=1)[:, ib]
    if int(cost_u.max(initial=0)) * (n + m) >= _BIG:
        raise ValueError("dtw_path: sequences too long for the int32 DP matrix; split the text")
    # rows of equal source strings are equal: prefix sums once per distinct string
    C_u = np.cumsum(cost_u, axis=1, dtype=np.int32)  # C[j] = cost[0] + ... + cost[j]
    S_u = C_u - cost_u  # C[j-1]
    D = np.empty((n + 1, m + 1), dtype=np.int32)
    D[0, :] = _BIG
    D[:, 0] = _BIG
    D[0, 0] = 0
    mk = np.empty(m, dtype=np.int32)
    for i in range(1, n + 1):
        u = ia[i - 1]
        prev = D[i - 1]
        np.minimum(prev[:-1], prev[1:], out=mk)  # min(D[i-1][j-1], D[i-1][j]) for j = 1..m
        mk -= S_u[u]  # m[k] - C[k-1]
        np.minimum.accumulate(mk, out=mk)
        np.add(mk, C_u[u], out=D[i, 1:])
    # backtrack on D[1:, 1:] exactly as FuseLLM does (argmin over [diag, up, left], first wins)
    M = D[1:, 1:]
    i, j = n - 1, m - 1
    path = []
    while i > 0 or j > 0:
        path.append((i, j))
        diag = M[i - 1, j - 1] if i > 0 and j > 0 else _BIG
        up = M[i - 1, j] if i > 0 else _BIG
        left = M[i, j - 1] if j > 0 else _BIG
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    path.append((0, 0))
    path.reverse()
    return path


def path_to_groups(path: list[tuple[int, int]], n: int, m: int) -> np.ndarray:
    """A monotone DTW path -> groups: each diagonal step starts a new group; vertical/horizontal steps
    extend the current one (so one token matched to several lands in one many-to-one group)."""
    if n == 0 or m == 0:
        return np.array([[0, n, 0, m]], dtype=np.int64) if n or m else np.zeros((0, 4), dtype=np.int64)
    pts = np.array(path, dtype=np.int64)
    step = np.diff(pts, axis=0)
    new = np.flatnonzero((step[:, 0] == 1) & (step[:, 1] == 1)) + 1  # path indices that start a group
    starts = np.concatenate([[0], new])
    ends = np.concatenate([new, [pts.shape[0]]]) - 1
    return np.stack([pts[starts, 0], pts[ends, 0] + 1, pts[starts, 1], pts[ends, 1] + 1], axis=1)


def _bytes_equal(groups: np.ndarray, src, tgt, st: TokenTable, tt: TokenTable) -> np.ndarray:
    a, a_off = st.pieces(src)
    b, b_off = tt.pieces(tgt)
    ab, bb = a.tobytes(), b.tobytes()
    return np.array([ab[a_off[s0]:a_off[s1]] == bb[b_off[t0]:b_off[t1]] for s0, s1, t0, t1 in groups.tolist()],
                    dtype=bool)


# ---------------------------------------------------------------------------------------------------------
def align(src_ids, tgt_ids, src_table: TokenTable, tgt_table: TokenTable, *, mode: str = "exact",
          text: str | None = None) -> Alignment:
    """Align two tokenizations of one text; see the module docstring.

    ``text`` (optional) is checked against both decoded byte streams: ids that cannot be a tokenization of
    it (less than half of the bytes in common) raise a ValueError rather than giving a silently wrong answer.
    Without it, different texts still align (never a crash) and show up as inexact groups and a low
    :attr:`Alignment.exact_fraction`.
    """
    if mode not in ("exact", "dtw"):
        raise ValueError(f"align: mode must be 'exact' or 'dtw', got {mode!r}")
    src = src_table.check_ids(src_ids, "src_ids")
    tgt = tgt_table.check_ids(tgt_ids, "tgt_ids")
    if text is not None:
        _check_text(text, src, src_table, "src_ids")
        _check_text(text, tgt, tgt_table, "tgt_ids")
    if src_table.hash == tgt_table.hash and np.array_equal(src, tgt):  # a tokenization with itself: identity
        idx = np.arange(src.shape[0], dtype=np.int64)
        groups = np.stack([idx, idx + 1, idx, idx + 1], axis=1)
        exact = np.ones(src.shape[0], dtype=bool)
    elif mode == "exact":
        groups, exact = _align_exact(src, tgt, src_table, tgt_table)
        groups = np.asarray(groups, dtype=np.int64).reshape(-1, 4)
        if src_table.unk_id is not None or tgt_table.unk_id is not None:  # unknown bytes are never exact
            unk_a = np.concatenate([[0], np.cumsum(src == (src_table.unk_id if src_table.unk_id is not None else -1))])
            unk_b = np.concatenate([[0], np.cumsum(tgt == (tgt_table.unk_id if tgt_table.unk_id is not None else -1))])
            exact = exact & (unk_a[groups[:, 1]] == unk_a[groups[:, 0]]) & (unk_b[groups[:, 3]] == unk_b[groups[:, 2]])
    elif mode == "dtw":
        path = dtw_path(fusellm_strings(src_table, src), fusellm_strings(tgt_table, tgt))
        groups = path_to_groups(path, src.shape[0], tgt.shape[0])
        exact = _bytes_equal(groups, src, tgt, src_table, tgt_table)
    return Alignment(groups=groups, exact=np.asarray(exact, dtype=bool), src_ids=src, tgt_ids=tgt,
                     src_table=src_table, tgt_table=tgt_table, mode=mode)


def _check_text(text: str, ids: np.ndarray, table: TokenTable, what: str) -> None:
    from rapidfuzz.distance import Indel

    got = table.decode_bytes(ids)
    want = text.encode("utf-8")
    if got == want:
        return
    sim = Indel.normalized_similarity(got.decode("latin-1"), want.decode("latin-1"))
    if sim < 0.5:
        raise ValueError(
            f"align: {what} decode to {got[:60]!r}... which does not match the given text {want[:60]!r}... "
            f"(byte similarity {sim:.2f}); tokenize this exact text with the {table.name or 'matching'} tokenizer"
        )


# ---------------------------------------------------------------------------------------------------------
# projection of teacher distributions onto student positions
# ---------------------------------------------------------------------------------------------------------


