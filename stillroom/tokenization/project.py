"""Teacher distributions moved onto the student's positions and vocabulary.

:func:`project` takes a teacher's top-k rows over its own tokenization, an :class:`~stillroom.tokenization.align.Alignment`
and a vocabulary map, and gives a :class:`~stillroom.targets.SparseTarget` whose row j predicts student token
j + 1; :func:`student_targets` does it for one :class:`~stillroom.targets.TeacherOutput` (alignment, projection
and the teacher's CE per student position, for fusion).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stillroom.targets import SparseTarget, TeacherOutput
from stillroom.tokenization.align import Alignment, align
from stillroom.tokenization.vocab import first_token, prefix_map

FALLBACKS = ("onehot", "bytes", "none", "prefix", "next_bytes", "next_bytes_pruned")
NEXT_BYTES = ("next_bytes", "next_bytes_pruned")


def project(teacher_topk_ids, teacher_topk_logprobs, alignment: Alignment, vocab_map, student_ids, *,
            fallback: str = "onehot", teacher_tail=None, fill: bool = True,
            teacher_gold_logprobs=None) -> SparseTarget:
    """Move a teacher's top-k next-token distributions onto the student's positions and vocabulary.

    ``alignment`` is ``align(teacher_ids, student_ids, teacher_table, student_table)`` (teacher = source).
    Causal shift: teacher row ``i`` predicts teacher token ``i+1``; output row ``j`` is the target of the
    student logits that predict student token ``j+1``. So for a group starting at teacher token ``i0`` and
    student token ``j0`` (same text before both), student row ``j0-1`` gets teacher row ``i0-1``:
    - 1-to-1 group: ``p_s(v) = sum_{c: map(c) = v} p_t(c)`` over the teacher's top-k ``c`` (duplicates summed,
      ``map`` = ``vocab_map.masked_mapping`` (a :class:`~stillroom.tokenization.vocab.VocabMap`, source -> target) or
      ``vocab_map.mapping`` / an int array; ids mapped to ``-1`` move their mass to the tail);
    - otherwise ``fallback`` decides, as it does for student rows inside a multi-token student group (no
      teacher position has that context) and rows whose group has no teacher row (``i0 == 0``):
      ``"onehot"``  — FuseLLM: probability 1 on the *next* gold student token ``student_ids[j+1]``;
      ``"bytes"``   — at a group start, the teacher row ``i0-1`` is still used: a candidate whose bytes agree
      with the gold student token (one is a prefix of the other) gives its mass to that token, others go
      through ``vocab_map``; inside a group, one-hot as above;
      ``"none"``    — the row is marked ``valid=False``;
      ``"prefix"``  — every group start (1-to-1 or not) uses teacher row ``i0-1``, and every candidate gives
      its mass to :func:`stillroom.tokenization.vocab.prefix_map` of it (the longest student token that its bytes start
      with) instead of ``vocab_map``: both sides predict the bytes that start at the same offset, so this moves
      the teacher's belief about the next bytes onto the student token that begins them. Inside a multi-token
      student group, one-hot as above.
      ``"next_bytes"`` — every student row gets the teacher's belief about the bytes that start at its next
      token, read along the actual text. For the student token ``s*`` spelling bytes ``g`` at offset ``o``,
      take the teacher row whose context ends at the start of the teacher token holding byte ``o`` (``pre``:
      the bytes of that token before ``o``, already seen by the student); each candidate ``c`` with
      ``p_t(c)``: a candidate that contradicts ``pre`` is not a possible continuation (left out of ``Z``); one
      that agrees with the text over all of ``g`` gives ``p_t(c)`` to ``s*``; the teacher's own token ending
      inside ``g`` gives ``p_t(c) · Π p_t(next teacher tokens along the text)`` to ``s*`` (the chain rule over
      the teacher's rows inside ``g``, ``teacher_gold_logprobs``), the rest of its mass to the tail; a candidate
      that departs from the text gives its mass to the longest student token its remaining bytes start with
      (:func:`~stillroom.tokenization.vocab.first_token`); candidates ending inside ``pre`` and the tail stay in
      the tail. Normalised by the mass of the candidates consistent with ``pre`` (``Z``), so inside a
      multi-token group the row is the teacher's conditional given the bytes the student has seen. Rows it
      cannot fill (inexact groups, no consistent candidate) keep ``prefix``'s target at a group start and fall
      back to one-hot inside a group.
      ``"next_bytes_pruned"`` — ``next_bytes`` with the tail counted in ``Z`` only for the share of it that could
      agree with ``pre``, estimated as the share of the top-k's mass that does: ``Z = kept + unknown_k +
      tail · Σ_{c agrees with pre} p_t(c) / Σ_c p_t(c)`` (``next_bytes`` counts the whole tail, which inside a
      teacher token leaves about half of the row in the tail). Rows at a shared cut (``pre`` empty) are unchanged.

    ``fill=False`` marks the rows that would get the one-hot gold ``valid=False`` instead: they carry no teacher
    knowledge, so a fusion of several teachers should take them from a teacher that has a distribution there
    and only fill what no teacher covers (:meth:`~stillroom.targets.SparseTarget.fill_onehot`; the trainer does).

    The tail is the teacher's (``teacher_tail``, or ``1 - sum p_t`` over its top-k) plus any unmappable mass,
    so ``sum(kept) + tail == 1``. The last row (nothing to predict) is always ``valid=False``.
    Returns a :class:`~stillroom.targets.SparseTarget` with leading dim ``len(student_ids)`` and the
    teacher's ``k`` (one-hot rows are padded: id 0, log-prob ``-inf``).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"project: fallback must be one of {', '.join(map(repr, FALLBACKS))}, got {fallback!r}")
    t_ids = _numpy(teacher_topk_ids).astype(np.int64)
    t_lp = _numpy(teacher_topk_logprobs, np.float64)
    if t_ids.ndim != 2 or t_ids.shape != t_lp.shape:
        raise ValueError(f"project: teacher_topk_ids {t_ids.shape} and teacher_topk_logprobs {t_lp.shape} must be "
                         "the same [T_teacher, k] shape")
    s_ids = alignment.tgt_table.check_ids(student_ids, "student_ids")
    T_t, k = t_ids.shape
    T_s = s_ids.shape[0]
    if T_t != alignment.src_len:
        raise ValueError(f"project: teacher_topk_ids has {T_t} rows but the alignment's source (teacher) has "
                         f"{alignment.src_len} tokens; align(teacher_ids, student_ids, ...) with the same ids")
    if T_s != alignment.tgt_len or not np.array_equal(s_ids, alignment.tgt_ids):
        raise ValueError("project: student_ids differ from the alignment's target ids; align the same sequence")
    for side, table in (("src_hash", alignment.src_table), ("tgt_hash", alignment.tgt_table)):
        h = getattr(vocab_map, side, None)
        if h is not None and h != table.hash:
            raise ValueError(f"project: vocab_map was built for other tokenizers ({side} {h} != {table.hash}); "
                             "build it with VocabMap.build(teacher_table, student_table)")
    if fallback in ("prefix", *NEXT_BYTES):
        mapping = prefix_map(alignment.src_table, alignment.tgt_table)
        if hasattr(vocab_map, "masked_mapping"):  # special tokens: as the vocabulary map says
            special = np.asarray(alignment.src_table.is_special, bool)
            mapping = np.where(special, _numpy(vocab_map.masked_mapping).astype(np.int64), mapping)
    elif hasattr(vocab_map, "masked_mapping"):  # a VocabMap: -1 where no sensible target (mass -> tail)
        mapping = _numpy(vocab_map.masked_mapping).astype(np.int64)
    else:
        mapping = _numpy(getattr(vocab_map, "mapping", vocab_map)).astype(np.int64)
    V_s = alignment.tgt_table.vocab_size
    if mapping.ndim != 1 or mapping.shape[0] < alignment.src_table.vocab_size:
        raise ValueError(f"project: vocab_map.mapping must be int [V_teacher={alignment.src_table.vocab_size}], "
                         f"got shape {mapping.shape}; build it with VocabMap.build(teacher_table, student_table)")
    if mapping.size and mapping.max() >= V_s:
        raise ValueError(f"project: vocab_map maps to id {int(mapping.max())} >= student vocabulary size {V_s}; "
                         "was it built for this student tokenizer?")
    if T_t and (t_ids.min() < 0 or t_ids.max() >= mapping.shape[0]):
        raise ValueError("project: teacher_topk_ids has ids outside the teacher vocabulary")
    probs_t = np.exp(t_lp)
    tail_t = (_numpy(teacher_tail, np.float64).reshape(T_t) if teacher_tail is not None
              else np.clip(1.0 - probs_t.sum(1), 0.0, None))

    # which teacher row (or none) feeds each student row
    src_row = np.full(T_s, -1, dtype=np.int64)  # teacher row for a distribution transfer
    use_bytes = np.zeros(T_s, dtype=bool)
    g = alignment.groups
    starts = g[(g[:, 3] > g[:, 2]) & (g[:, 2] >= 1)]  # groups with student tokens, not at position 0
    one = ((starts[:, 1] - starts[:, 0]) == 1) & ((starts[:, 3] - starts[:, 2]) == 1) & (starts[:, 0] >= 1)
    src_row[starts[one, 2] - 1] = starts[one, 0] - 1
    if fallback in ("bytes", "prefix", *NEXT_BYTES):
        multi = ~one & (starts[:, 1] > starts[:, 0]) & (starts[:, 0] >= 1)
        src_row[starts[multi, 2] - 1] = starts[multi, 0] - 1
        use_bytes[starts[multi, 2] - 1] = fallback == "bytes"
    valid = np.ones(T_s, dtype=bool)
    if T_s:
        valid[-1] = False
        src_row[-1] = -1
    transfer = src_row >= 0

    out_ids = np.zeros((T_s, k), dtype=np.int64)
    out_p = np.zeros((T_s, k), dtype=np.float64)
    out_tail = np.ones(T_s, dtype=np.float64)
    rows = np.flatnonzero(transfer)
    if rows.size and k:
        cand = t_ids[src_row[rows]]  # [R, k] teacher ids
        p = probs_t[src_row[rows]]
        sid = mapping[cand]
        if use_bytes[rows].any():
            st, tt = alignment.src_table, alignment.tgt_table
            s_stream, s_off = tt.pieces(s_ids)
            s_bytes = s_stream.tobytes()
            for r in np.flatnonzero(use_bytes[rows]).tolist():
                j = rows[r] + 1  # the gold student token this row predicts
                gold = s_bytes[s_off[j]:s_off[j + 1]]
                if not gold:
                    continue
                for c in range(k):
                    cb = st.token_bytes[cand[r, c]]
                    if cb and (cb.startswith(gold) or gold.startswith(cb)):
                        sid[r, c] = s_ids[j]
        lost = np.where(sid < 0, p, 0.0).sum(1)
        ok = sid >= 0
        # sum duplicates per row: unique (row, id) keys
        r_idx = np.broadcast_to(np.arange(rows.size)[:, None], sid.shape)[ok]
        key = r_idx * V_s + sid[ok]
        uniq, inv = np.unique(key, return_inverse=True)
        mass = np.bincount(inv.ravel(), weights=p[ok], minlength=uniq.size)
        u_row = uniq // V_s
        first = np.searchsorted(u_row, u_row, side="left")
        slot = np.arange(uniq.size) - first
        out_ids[rows[u_row], slot] = uniq % V_s
        out_p[rows[u_row], slot] = mass
        out_tail[rows] = tail_t[src_row[rows]] + lost
    if fallback in NEXT_BYTES:
        if teacher_gold_logprobs is None:  # the teacher's own next token, where its top-k holds it
            gold_p = np.zeros(T_t)
            nxt = np.append(np.asarray(alignment.src_ids, np.int64)[1:], -1)
            hit = t_ids == nxt[:, None]
            gold_p[hit.any(1)] = probs_t[hit].astype(np.float64)
        else:
            gold_p = np.nan_to_num(np.exp(_numpy(teacher_gold_logprobs, np.float64).reshape(T_t)), nan=0.0)
        _next_bytes(out_ids, out_p, out_tail, transfer, alignment, t_ids, probs_t, tail_t, gold_p, s_ids,
                    prune_tail=fallback == "next_bytes_pruned")
    onehot = valid & ~transfer
    if fallback == "none" or not fill:
        valid &= ~onehot
        onehot[:] = False
    oh = np.flatnonzero(onehot)
    if oh.size and k:
        out_ids[oh, 0] = s_ids[oh + 1]
        out_p[oh, 0] = 1.0
        out_tail[oh] = 0.0
    out_tail = np.clip(out_tail, 0.0, None)
    with np.errstate(divide="ignore"):
        logp = np.where(out_p > 0, np.log(np.where(out_p > 0, out_p, 1.0)), -np.inf)
    return SparseTarget(ids=torch.from_numpy(out_ids), logprobs=torch.from_numpy(logp.astype(np.float32)),
                        tail=torch.from_numpy(out_tail.astype(np.float32)), valid=torch.from_numpy(valid))


def _next_bytes(out_ids, out_p, out_tail, transfer, alignment, t_ids, probs_t, tail_t, gold_p, s_ids,
                prune_tail: bool = False) -> None:
    """The ``next_bytes`` projection on every student row it can fill (see :func:`project`), in place;
    ``prune_tail``: ``next_bytes_pruned``'s share of the tail in ``Z``."""
    st, tt = alignment.src_table, alignment.tgt_table
    first = first_token(tt)
    s_stream, s_off = tt.pieces(s_ids)
    text = s_stream.tobytes()
    t_off = st.pieces(alignment.src_ids)[1]
    k, last = t_ids.shape[1], len(out_tail) - 1
    for (i0, i1, j0, j1), exact in zip(alignment.groups.tolist(), alignment.exact.tolist(), strict=True):
        if not exact or i1 <= i0:
            continue  # the two byte streams differ here (normaliser, unknown token): no byte-level belief
        m = i0
        for j in range(max(j0, 1), j1):
            r = j - 1  # the row predicting student token j
            if r >= last:
                continue
            o, end = int(s_off[j]), int(s_off[j + 1])
            while m + 1 < i1 and t_off[m + 1] <= o:
                m += 1  # teacher token m holds the byte student token j starts at
            if m < 1 or end <= o:
                continue
            row, pre = m - 1, text[t_off[m]:o]
            ahead = text[o:o + 64]
            gold, span = int(s_ids[j]), end - o
            mass: dict[int, float] = {}
            unknown = float(tail_t[row])
            spelled = agree = 0.0  # top-k mass with bytes / of it, agreeing with pre (next_bytes_pruned)
            for c, p in zip(t_ids[row].tolist(), probs_t[row].tolist(), strict=True):
                b = st.token_bytes[c]
                if not b:
                    continue
                spelled += p
                if len(b) <= len(pre):  # ends inside what the student has seen: consistent or not, no belief
                    agree += p if pre.startswith(b) else 0.0
                    unknown += p if pre.startswith(b) else 0.0
                    continue
                if not b.startswith(pre):
                    continue  # contradicts the bytes the student has seen: not a possible continuation
                agree += p
                rest = b[len(pre):]
                if ahead.startswith(rest) and len(rest) >= span:
                    mass[gold] = mass.get(gold, 0.0) + p  # agrees with the text over the whole student token
                elif ahead.startswith(rest):  # ends inside it: the teacher's own path says how it goes on
                    q = 1.0
                    if c == int(alignment.src_ids[m]):
                        n = m
                        while n + 1 < i1 and t_off[n + 1] < end:
                            q *= gold_p[n]
                            n += 1
                    else:
                        q = 0.0  # another token that ends inside: what the teacher would say next is unknown
                    mass[gold] = mass.get(gold, 0.0) + p * q
                    unknown += p * (1.0 - q)
                else:  # another text: the student token that begins those bytes
                    v = first(rest)
                    if v >= 0:
                        mass[v] = mass.get(v, 0.0) + p
                    else:
                        unknown += p
            if prune_tail and pre and spelled > 0:  # the tail agrees with pre as often as the top-k does
                unknown -= float(tail_t[row]) * (1.0 - agree / spelled)
            kept = sum(mass.values())
            if kept <= 0:
                continue
            z = kept + unknown
            ids = sorted(mass, key=mass.get, reverse=True)[:k]
            out_ids[r, :] = 0
            out_p[r, :] = 0.0
            out_ids[r, :len(ids)] = ids
            out_p[r, :len(ids)] = [mass[v] / z for v in ids]
            out_tail[r] = max(0.0, 1.0 - sum(mass[v] for v in ids) / z)
            transfer[r] = True


def _numpy(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def student_targets(out: TeacherOutput, student_ids, student_table=None, teacher_table=None, vocab_map=None,
                    *, fallback: str = "onehot", fill: bool = True) -> tuple[SparseTarget, torch.Tensor]:
    """Teacher output -> (SparseTarget over the student's positions and vocabulary, teacher CE per position).

    Same tokenizer (``vocab_map`` is None, or both tables have one hash and the ids agree): the teacher's rows
    are the student's rows. Otherwise the texts are aligned at byte level (``stillroom.tokenization.align.align``) and the
    top-k projected (``stillroom.tokenization.project.project`` through ``vocab_map``; ``fallback`` and ``fill`` as there).
    The teacher CE of an aligned group (the teacher tokens covering the same bytes as some student tokens) is
    spread evenly over the student rows that predict that group's tokens, so a sequence's summed CE is the
    teacher's over the same bytes; rows with no covering group, and the last row, get ``nan``.
    """
    sid = torch.as_tensor(np.asarray(student_ids), dtype=torch.long).reshape(-1)
    same = vocab_map is None or (student_table is not None and teacher_table is not None
                                 and student_table.hash == teacher_table.hash
                                 and torch.equal(sid, out.input_ids))
    if same:
        if not torch.equal(sid, out.input_ids):
            raise ValueError("student ids differ from the teacher's tokenization of the same text; for a "
                             "teacher with another tokenizer pass student_table, teacher_table and vocab_map")
        ce = out.gold_ce.clone()
        if len(ce):
            ce[-1] = float("nan")
        return out.target(), ce

    alignment = align(out.input_ids.numpy(), sid.numpy(), teacher_table, student_table)
    target = project(out.topk_ids, out.topk_logprobs, alignment, vocab_map, sid, fallback=fallback,
                     teacher_tail=out.tail, fill=fill,
                     teacher_gold_logprobs=-out.gold_ce if fallback in NEXT_BYTES else None)
    return target, _group_ce(out.gold_ce, np.asarray(alignment.groups), len(sid))


def _group_ce(gold_ce: torch.Tensor, groups: np.ndarray, n_student: int) -> torch.Tensor:
    """Spread each aligned group's teacher CE over the student rows predicting the group's tokens."""
    ce = torch.full((n_student,), float("nan"))
    g = gold_ce.double()
    for ts, te, ss, se in groups.tolist():
        rows = range(max(ss - 1, 0), se - 1)  # row j predicts student token j+1
        terms = g[max(ts - 1, 0):te - 1]  # teacher row i predicts teacher token i+1
        if len(rows) == 0 or len(terms) == 0:
            continue
        total = float(terms.sum())
        if math.isfinite(total):
            ce[list(rows)] = total / len(rows)
    return ce.float()
