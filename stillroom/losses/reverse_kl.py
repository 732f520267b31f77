"""A divergence in the *teacher's* vocabulary: the student's distribution moved there (X-Token's direction).

For a student row paired with a teacher row that predicts the token starting at the same byte, the student's
``p = softmax(z / T)`` over its vocabulary is moved into the teacher's by a sparse map W (each student token's
mass spread over the teacher pieces that spell it; :mod:`stillroom.tokenization.reverse`):

    q_t = Σ_s p_s · W[s, t]        for the teacher's top-k ids t,      q_tail = 1 − Σ_t q_t

and compared with the teacher's own top-k p_t and tail over the k + 1 buckets, ``D(p_teacher ‖ q)`` (any kind of
:mod:`stillroom.losses.divergences`; forward KL by default). A teacher id no student token reaches (W's column
empty) cannot be matched by any student: its teacher mass joins the tail bucket, so the divergence stays finite
and its gradient unchanged. Only the k columns of W a row needs are gathered (``columns``: W by teacher column,
CSC), never a ``[n, V_t]`` matrix.
"""

from __future__ import annotations

import torch

from stillroom.losses.distill import reduce_rows, student_rows
from stillroom.losses.divergences import check_kind, row_divergence
from stillroom.losses.sparse import TAIL_FLOOR
from stillroom.targets import SparseTarget


def projected_mass(p: torch.Tensor, ids: torch.Tensor,
                   columns: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, k]`` with ``q[r, j] = Σ_s p[r, s] · W[s, ids[r, j]]`` and ``reach [n, k]`` (W's column non-empty),
    from W by teacher column: ``columns = (ptr [V_t + 1], rows [nnz], weights [nnz])``."""
    ptr, rows, weights = (c.to(p.device) for c in columns)
    n, k = ids.shape
    flat = ids.reshape(-1)
    start, count = ptr[flat], ptr[flat + 1] - ptr[flat]
    slot = torch.repeat_interleave(torch.arange(flat.numel(), device=p.device), count)
    first = torch.cumsum(count, 0) - count  # where each slot's entries begin in the expanded list
    pos = start[slot] + torch.arange(slot.numel(), device=p.device) - first[slot]
    contrib = p[slot // k, rows[pos]] * weights[pos].to(p.dtype)
    q = torch.zeros(n * k, dtype=p.dtype, device=p.device).index_add(0, slot, contrib)
    return q.view(n, k), (count > 0).view(n, k)


def _teacher_rows(student_logits: torch.Tensor, target: SparseTarget, columns, mask, reduction: str,
                  temperature: float):
    """Checks shared by the two losses, then ``(leading, counted [n], p [n, V_s], ids, logprobs [n, k], tail [n])``:
    the student's probabilities once, the teacher's rows on their device."""
    leading, logits, counted = student_rows(student_logits, mask, reduction, temperature)
    k = target.ids.shape[-1]
    if tuple(target.ids.shape[:-1]) != leading:
        raise ValueError(f"target rows {tuple(target.ids.shape[:-1])} do not match the student's leading shape "
                         f"{leading}")
    ids = target.ids.reshape(-1, k).long().to(logits.device)
    if ids.numel() and int(ids.max()) >= columns[0].numel() - 1:
        raise ValueError(f"teacher id {int(ids.max())} is outside the map's {columns[0].numel() - 1} columns; the "
                         "map was built for another teacher tokenizer")
    lp = target.logprobs.reshape(-1, k).to(logits.device, logits.dtype)
    tail = target.tail.reshape(-1).to(logits.device, logits.dtype)
    counted = counted & target.valid.reshape(-1).bool().to(logits.device)
    return leading, counted, torch.softmax(logits / temperature, -1), ids.clamp_min(0), lp, tail


def _divergence_rows(p: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, tail: torch.Tensor, columns,
                     kind: str, beta: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row D(teacher ‖ p moved by W) over k + 1 buckets, and ``reach [n, k]`` (the teacher id's column of W
    is non-empty)."""
    q, reach = projected_mass(p, ids, columns)
    live_t = torch.isfinite(lp)
    live = live_t & reach
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    pt = torch.where(live_t, lp.exp(), zero)
    tail_t = tail + torch.where(live_t & ~reach, pt, zero).sum(-1)  # unreachable teacher ids: tail mass
    q_tail = (1.0 - torch.where(live, q, zero).sum(-1)).clamp_min(1e-12)
    tiny = torch.finfo(p.dtype).tiny
    logq = torch.cat([torch.where(live, q.clamp_min(tiny).log(), zero), q_tail.log().unsqueeze(-1)], -1)
    reverse = kind == "reverse_kl" or (kind == "jsd" and beta == 1.0)
    floor = TAIL_FLOOR if reverse else tiny  # as the student-vocabulary sparse loss (stillroom.losses.sparse)
    logp = torch.cat([torch.where(live, lp, zero), tail_t.clamp_min(floor).log().unsqueeze(-1)], -1)
    buckets = torch.cat([live, torch.ones_like(live[:, :1])], -1)  # the tail bucket always counts
    return row_divergence(logq, logp, kind, beta, alpha, buckets), reach


def _reduce(per_row: torch.Tensor, counted: torch.Tensor, leading, reduction: str, num_items) -> torch.Tensor:
    per_row = torch.where(counted, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    out = reduce_rows(per_row, counted, reduction, num_items)
    return out.reshape(leading) if reduction == "none" else out


def projected_student_kl(student_logits: torch.Tensor, target: SparseTarget,
                         columns: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, kind: str = "forward_kl",
                         temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                         mask: torch.Tensor | None = None, reduction: str = "mean",
                         num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """D(teacher ‖ student moved by W) over the teacher's top-k + tail (module docstring).

    ``student_logits [..., V_s]``; ``target`` the teacher's own ``SparseTarget`` (ids in *its* vocabulary) with
    the same leading shape; ``columns`` W by teacher column (:attr:`stillroom.tokenization.reverse.ReverseMap.columns`);
    ``mask`` True = counted (with ``target.valid``); reductions as ``distill_loss``."""
    check_kind(kind, beta, alpha)
    leading, counted, p, ids, lp, tail = _teacher_rows(student_logits, target, columns, mask, reduction, temperature)
    per_row, _ = _divergence_rows(p, ids, lp, tail, columns, kind, beta, alpha)
    return _reduce(per_row, counted, leading, reduction, num_items)


def hybrid_loss(student_logits: torch.Tensor, target: SparseTarget,
                twins: tuple[torch.Tensor, torch.Tensor, torch.Tensor], unmatched: torch.Tensor, *,
                temperature: float = 1.0, mask: torch.Tensor | None = None, reduction: str = "mean",
                num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """GOLD's hybrid (TRL ``uld_use_hybrid_loss``), per row, in two parts that weigh what they cover:

        D = KL(p ‖ q) over the teacher's top-k ids with a student twin + one bucket for the rest
            + u · Σ_r |q↓_r − p↓_r|,   r < m

    The first part is :func:`projected_student_kl` with ``twins`` (the exact-bytes map,
    :func:`stillroom.tokenization.reverse.exact_map`): each matched teacher id against its twin's probability.
    The second is ULD's sorted comparison on what has no twin: the teacher's m top-k entries without one (p↓,
    sorted) against the student's largest probabilities among its ``unmatched`` ids (bool ``[V_s]``, q↓),
    weighted by u, the teacher's top-k mass without a twin. GOLD weighs the matched part by the matched share of the
    teacher's *vocabulary*, whatever the row says (Gemma-3 against SmolLM2: 14,837 of 262,144 raw strings match,
    0.057, so the matched part nearly vanishes; by bytes 46,145, 0.18); here each row weighs by where the teacher's
    probability is."""
    leading, counted, p, ids, lp, tail = _teacher_rows(student_logits, target, twins, mask, reduction, temperature)
    matched, twin = _divergence_rows(p, ids, lp, tail, twins, "forward_kl", 0.5, 0.1)
    k = ids.shape[-1]
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    p_un = torch.where(torch.isfinite(lp) & ~twin, lp.exp(), zero).sort(-1, descending=True).values
    m = (p_un > 0).sum(-1, keepdim=True)
    q = p[:, unmatched.to(p.device)]
    q_un = q.topk(min(k, q.shape[-1]), -1).values if q.shape[-1] else q.new_zeros(q.shape[0], 0)
    q_un = torch.nn.functional.pad(q_un, (0, k - q_un.shape[-1]))
    ranks = torch.arange(k, device=p.device)[None]
    uld = torch.where(ranks < m, (q_un - p_un).abs(), zero).sum(-1)
    return _reduce(matched + p_un.sum(-1) * uld, counted, leading, reduction, num_items)
