"""Unbiased chunks for ALM: outcome-chunk debiasing (Minixhofer, Vulić, Ponti 2025, arXiv 2503.20083).

A model's probability of a chunk's *tokens* is not the probability of the chunk's *text*: the tokens imply that
no token crosses the chunk's end, i.e. that the text does not go on with a continuation X after which the
tokenizer would have put one token over the boundary (a longer token starting inside the chunk). Teacher and
student are only comparable on a chunk when those excluded continuations carry (about) the same probability on
both sides. For a boundary where the teacher's last token has bytes ``a`` and the student's ``b``:

- the *crossing set* of a side, ``C(a) = {X ≠ "" : a token c = a[i:] + X exists (0 ≤ i < |a|) and the
  tokenizer spells the text a[:i] + c as (its tokens of a[:i]) + [c]}`` — continuations after which this
  tokenizer crosses the boundary (the tokenizer's own encoding decides; with no tokenizer given, every such
  token counts, a superset);
- the *bias* of each side, the unigram probability of the crossing tokens the other side does not share:
  ``bias_T = Σ_{X ∈ C_T(a) ∖ C_S(b)} π_T(c_X)`` and ``bias_S = Σ_{X ∈ C_S(b) ∖ C_T(a)} π_S(c_X)`` (c_X the
  longest crossing token spelling X);
- the boundary is *unbiased* when ``bias_T ≤ threshold`` and ``bias_S ≤ threshold``. A special token on either
  side always ends an unbiased boundary (nothing continues it).

Unbiased chunks are the spans between consecutive unbiased boundaries: aligned groups are merged up to the next
unbiased boundary (as in the paper's reference implementation), and a trailing run that no unbiased boundary
closes is left out. π are unigram frequencies of each tokenizer on a text sample (:func:`unigram_probs`; tokens
never seen have probability 0, so only seen tokens are candidates — the reference smooths them to ~1e-9 each).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

import numpy as np

from stillroom.tokenization.tokens import TokenTable


def unigram_probs(tokenizer, texts: Iterable[str], vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` relative frequencies of the tokenizer's ids over ``texts`` (no special tokens added)."""
    counts: Counter = Counter()
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        counts.update(ids)
    p = np.zeros(vocab_size, dtype=np.float64)
    for i, c in counts.items():
        if i < vocab_size:
            p[i] = c
    return p / max(p.sum(), 1.0)


class _Side:
    """One tokenizer's crossing sets, computed once per token id."""

    def __init__(self, table: TokenTable, probs: np.ndarray, tokenizer=None):
        self.table, self.probs, self.tokenizer = table, probs, tokenizer
        ids = [i for i in np.flatnonzero(probs > 0).tolist()
               if i < len(table.token_bytes) and not table.is_special[i] and table.token_bytes[i]]
        order = sorted(ids, key=lambda i: table.token_bytes[i])
        self.sorted_bytes = [table.token_bytes[i] for i in order]
        self.sorted_ids = order
        self.cache: dict[int, dict[bytes, int]] = {}

    def crossing(self, token_id: int) -> dict[bytes, int]:
        """``{X: c}``: the continuations X after which a token c crosses the end of token ``token_id``."""
        got = self.cache.get(token_id)
        if got is not None:
            return got
        a = self.table.token_bytes[token_id]
        cands = []  # (i, c, X)
        for i in range(len(a)):
            suf = a[i:]
            k = bisect.bisect_left(self.sorted_bytes, suf)
            while k < len(self.sorted_bytes) and self.sorted_bytes[k].startswith(suf):
                if len(self.sorted_bytes[k]) > len(suf):
                    cands.append((i, self.sorted_ids[k], self.sorted_bytes[k][len(suf):]))
                k += 1
        if self.tokenizer is not None and cands:
            cands = self._valid(a, cands)
        out: dict[bytes, int] = {}
        for _i, c, x in sorted(cands, key=lambda t: -t[0]):  # smaller i last: the longest token spelling X wins
            out[x] = c
        self.cache[token_id] = out
        return out

    def _valid(self, a: bytes, cands: list) -> list:
        """The candidates the tokenizer really produces: text a[:i] + c encodes as (encoding of a[:i]) + [c]."""
        texts, keep = [], []
        for i, c, x in cands:
            try:
                texts.append((a[:i].decode("utf-8"), (a[:i] + self.table.token_bytes[c]).decode("utf-8")))
                keep.append((i, c, x))
            except UnicodeDecodeError:  # a byte piece that splits a character: not a text the tokenizer sees
                continue
        if not keep:
            return []
        heads = sorted({h for h, _ in texts})
        enc_head = dict(zip(heads, self.tokenizer(heads, add_special_tokens=False)["input_ids"], strict=True))
        enc = self.tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
        return [k for k, (h, _), e in zip(keep, texts, enc, strict=True) if list(e) == list(enc_head[h]) + [k[1]]]


class BoundaryBias:
    """Whether a chunk boundary between a teacher's and a student's tokenization is unbiased (module docstring).

    ``teacher_probs`` / ``student_probs``: unigram probabilities (:func:`unigram_probs`); ``teacher_tokenizer`` /
    ``student_tokenizer``: Hugging Face tokenizers whose encoding decides which crossing tokens are real (None:
    every vocabulary token that would cross counts). Results are cached per token and per pair."""

    def __init__(self, teacher_table: TokenTable, student_table: TokenTable, teacher_probs: np.ndarray,
                 student_probs: np.ndarray, teacher_tokenizer=None, student_tokenizer=None, threshold: float = 1e-4):
        self.teacher = _Side(teacher_table, np.asarray(teacher_probs, dtype=np.float64), teacher_tokenizer)
        self.student = _Side(student_table, np.asarray(student_probs, dtype=np.float64), student_tokenizer)
        self.threshold = threshold
        self._pairs: dict[tuple[int, int], tuple[float, float]] = {}

    def bias(self, teacher_id: int, student_id: int) -> tuple[float, float]:
        """(bias_T, bias_S) of a boundary after teacher token ``teacher_id`` and student token ``student_id``."""
        key = (int(teacher_id), int(student_id))
        got = self._pairs.get(key)
        if got is None:
            ct, cs = self.teacher.crossing(key[0]), self.student.crossing(key[1])
            got = (float(sum(self.teacher.probs[c] for x, c in ct.items() if x not in cs)),
                   float(sum(self.student.probs[c] for x, c in cs.items() if x not in ct)))
            self._pairs[key] = got
        return got

    def unbiased(self, teacher_id: int, student_id: int) -> bool:
        """Both biases within the threshold, or a special token on either side."""
        if self.teacher.table.is_special[teacher_id] or self.student.table.is_special[student_id]:
            return True
        bt, bs = self.bias(teacher_id, student_id)
        return bt <= self.threshold and bs <= self.threshold


def unbiased_boundaries(groups: np.ndarray, teacher_ids, student_ids, rule: BoundaryBias) -> np.ndarray:
    """bool ``[G]``: the boundary at the end of each group (teacher as source) is unbiased. A group empty on one
    side (a special token only one tokenization has, e.g. a BOS) ends a boundary when its token is special."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1, 4)
    t, s = np.asarray(teacher_ids), np.asarray(student_ids)
    t_special, s_special = rule.teacher.table.is_special, rule.student.table.is_special

    def ok(t0: int, t1: int, s0: int, s1: int) -> bool:
        if t1 > t0 and s1 > s0:
            return rule.unbiased(int(t[t1 - 1]), int(s[s1 - 1]))
        if s1 > s0:
            return bool(s_special[int(s[s1 - 1])])
        return t1 > t0 and bool(t_special[int(t[t1 - 1])])

    return np.array([ok(*row) for row in g.tolist()], dtype=bool)


def merge_chunks(groups: np.ndarray, exact: np.ndarray, boundary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge consecutive groups up to each ``boundary`` group (inclusive): ``(groups [G', 4], exact [G'])``, a merged
    chunk exact when all its groups are; a trailing run with no boundary at its end is dropped."""
    g = np.asarray(groups, dtype=np.int64).reshape(-1, 4)
    out, ex, start, ok = [], [], 0, True
    for k in range(len(g)):
        ok = ok and bool(exact[k])
        if boundary[k]:
            out.append((g[start, 0], g[k, 1], g[start, 2], g[k, 3]))
            ex.append(ok)
            start, ok = k + 1, True
    return np.asarray(out, dtype=np.int64).reshape(-1, 4), np.asarray(ex, dtype=bool)


def unbiased_chunks(alignment, rule: BoundaryBias) -> tuple[np.ndarray, np.ndarray]:
    """An alignment's (teacher as source) unbiased chunks: ``(groups [G', 4], exact [G'])``."""
    ok = unbiased_boundaries(alignment.groups, alignment.src_ids, alignment.tgt_ids, rule)
    return merge_chunks(alignment.groups, alignment.exact, ok)
