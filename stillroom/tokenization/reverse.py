"""The student's vocabulary moved into a teacher's: X-Token's direction (arXiv 2605.21699).

Projections (:mod:`stillroom.tokenization.project`) move a teacher's top-k onto the student's vocabulary. This map
goes the other way: each student token s is re-tokenized by the teacher, giving pieces t_1 … t_m (at most
``pieces``), and gets weights decaying over them,

    W[s, t_i] = d_i / Σ_j d_j,    d_i = decay^(i − 1)

so a student distribution p over its vocabulary becomes one over the teacher's, ``q = p · W``: a student token the
teacher spells as one token (most of them, for two modern vocabularies) moves whole onto it (exact matches pinned,
weight 1); one the teacher splits gives most of its mass to its first piece — the token the teacher would
emit at the same byte boundary. The divergence is then taken in the teacher's vocabulary against its own top-k
(:func:`stillroom.losses.reverse_kl.projected_student_kl`), so the teacher's distribution is used as it is: nothing
of it is lost to a projection.

Re-tokenizing: the student token's text through the teacher's tokenizer, kept when the pieces spell exactly its
bytes; otherwise (partial UTF-8 of a byte-level token, normalisation, the virtual leading space a SentencePiece
tokenizer adds to a text but not to a word inside one) the longest teacher token that starts its remaining bytes,
greedily. A token neither reaches (special tokens, no teacher piece) keeps an empty row: its mass
counts as outside every teacher id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stillroom.tokenization.tokens import TokenTable


@dataclass
class ReverseMap:
    """W ``[V_s, V_t]`` stored by teacher column (CSC): teacher id t's entries are ``rows[ptr[t]:ptr[t + 1]]``
    (student ids) with ``weights[...]``. ``mapped`` counts the student ids with a non-empty row, ``split`` those
    the teacher spells with several pieces."""

    ptr: torch.Tensor  # int64 [V_t + 1]
    rows: torch.Tensor  # int64 [nnz]
    weights: torch.Tensor  # float32 [nnz]
    student_size: int
    mapped: int
    split: int

    @property
    def columns(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ptr, self.rows, self.weights

    def dense(self) -> torch.Tensor:
        """W as a dense ``[V_s, V_t]`` matrix (for tests and small vocabularies)."""
        w = torch.zeros(self.student_size, self.ptr.numel() - 1)
        cols = torch.repeat_interleave(torch.arange(self.ptr.numel() - 1), self.ptr.diff())
        w.index_put_((self.rows, cols), self.weights, accumulate=True)
        return w


def piece_weights(m: int, decay: float) -> np.ndarray:
    """``d_i / Σ d_j`` with ``d_i = decay^(i−1)`` for i = 1 … m (a single piece gets 1)."""
    d = decay ** np.arange(m, dtype=np.float64)
    return d / d.sum()


def greedy_pieces(data: bytes, index: dict[bytes, int], longest: int) -> list[int] | None:
    """The longest teacher token that starts the remaining bytes, repeatedly; None when some byte has none."""
    out, i = [], 0
    while i < len(data):
        for n in range(min(longest, len(data) - i), 0, -1):
            t = index.get(data[i:i + n])
            if t is not None:
                out.append(t)
                i += n
                break
        else:
            return None
    return out


def reverse_map(student: TokenTable, teacher: TokenTable, teacher_tokenizer, *, pieces: int = 4,
                decay: float = 0.1) -> ReverseMap:
    """W of the module docstring for ``student`` → ``teacher``; ``teacher_tokenizer`` re-tokenizes the student's
    tokens (a Hugging Face tokenizer, called on a list of texts without special tokens)."""
    if pieces < 1 or not 0.0 <= decay <= 1.0:
        raise ValueError(f"reverse_map: pieces must be >= 1 and decay in [0, 1]; got {pieces}, {decay}")
    texts: list[str | None] = []
    for s, b in enumerate(student.token_bytes):
        if student.is_special[s] or not b:
            texts.append(None)
            continue
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    todo = [i for i, x in enumerate(texts) if x is not None]
    encoded = teacher_tokenizer([texts[i] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
    by_id: dict[int, list[int]] = {}
    for i, ids in zip(todo, encoded, strict=True):
        if ids and b"".join(teacher.token_bytes[t] for t in ids) == student.token_bytes[i]:  # no virtual space
            by_id[i] = list(ids)
    index = {b: t for t, b in enumerate(teacher.token_bytes) if b and not teacher.is_special[t]}
    longest = max((len(b) for b in index), default=1)
    for s, b in enumerate(student.token_bytes):
        if s not in by_id and b and not student.is_special[s]:
            got = greedy_pieces(b, index, longest)
            if got:
                by_id[s] = got
    rows, cols, vals = [], [], []
    for s, ids in by_id.items():
        ids = ids[:pieces]
        for t, w in zip(ids, piece_weights(len(ids), decay), strict=True):
            rows.append(s)
            cols.append(t)
            vals.append(w)
    rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    vals_a = np.asarray(vals, dtype=np.float64)
    order = np.lexsort((rows_a, cols_a))
    rows_a, cols_a, vals_a = rows_a[order], cols_a[order], vals_a[order]
    v_t = len(teacher.token_bytes)
    ptr = np.zeros(v_t + 1, dtype=np.int64)
    np.add.at(ptr, cols_a + 1, 1)
    return ReverseMap(torch.from_numpy(np.cumsum(ptr)), torch.from_numpy(rows_a),
                      torch.from_numpy(vals_a.astype(np.float32)), len(student.token_bytes), len(by_id),
                      sum(len(v) > 1 for v in by_id.values()))


def exact_map(student: TokenTable, teacher: TokenTable) -> ReverseMap:
    """W with one entry per student token whose exact bytes are one teacher token (its twin, the smallest such
    teacher id), weight 1: GOLD's matched vocabulary, compared by bytes so ``Ġthe`` and ``▁the`` are twins."""
    index: dict[bytes, int] = {}
    for t, b in enumerate(teacher.token_bytes):
        if b and not teacher.is_special[t]:
            index.setdefault(b, t)
    pairs = sorted((index[b], s) for s, b in enumerate(student.token_bytes)
                   if b and not student.is_special[s] and b in index)
    cols = np.asarray([t for t, _ in pairs], dtype=np.int64)
    ptr = np.zeros(len(teacher.token_bytes) + 1, dtype=np.int64)
    np.add.at(ptr, cols + 1, 1)
    return ReverseMap(torch.from_numpy(np.cumsum(ptr)), torch.as_tensor([s for _, s in pairs], dtype=torch.long),
                      torch.ones(len(pairs)), len(student.token_bytes), len(pairs), 0)


def without_twin(student: TokenTable, twins: ReverseMap) -> torch.Tensor:
    """bool ``[V_s]``: the student's text tokens (not special, some bytes) that ``twins`` (:func:`exact_map`) gives
    no teacher twin — the part GOLD's hybrid compares by sorted probabilities."""
    out = torch.as_tensor([bool(b) for b in student.token_bytes]) & ~torch.as_tensor(student.is_special)
    out[twins.rows] = False
    return out
