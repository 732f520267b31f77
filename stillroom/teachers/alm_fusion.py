"""Several ALM teachers fused by MinCE / AvgCE (FuseLLM's rules applied to ALM's chunk likelihoods).

Each ALM teacher has its own alignment with the student (``stillroom.tokenization.align``), so its chunks differ from the
other teachers'. To compare teachers on the same text, the fused term works on *joint chunks*: spans of student
tokens ``[s0, s1)`` whose two ends are chunk boundaries of every teacher, and whose groups are all kept by every
teacher's mask (``exact`` groups, or the unbiased boundaries of ``stillroom.tokenization.unbiased``). On a joint chunk c,
teacher t covers its tokens ``[t0, t1)`` and the chunk's log-likelihoods are

    log p_t(c) = Σ_{j ∈ [t0, t1)} log p_t(x_j | x_<j),      log q(c) = Σ_{j ∈ [s0, s1)} log q(x_j | x_<j).

A teacher's CE on the chunk, on the per-student-token scale of FuseLLM's CE, is ``CE_t(c) = −log p_t(c) / n(c)``
with n(c) = s1 − s0; on a sequence, ``CE_t = Σ_c −log p_t(c) / Σ_c n(c)`` (its NLL of the same bytes per student
token). The weights are ``stillroom.teachers.fusion.fusion_weights`` of these CEs — ``min_ce``: 1 for the teacher with
the lowest CE (the first on ties), ``avg_ce``: ``softmax(−CE / τ_w)`` over teachers, ``mean``: 1/n — per
sequence (``level="sequence"``: one weight per teacher for all of the sequence's chunks) or per chunk
(``level="token"``). The fused ALM term of a sequence is

    Σ_c n(c) · Σ_t π_t(c) · D(p̂_t(c) ‖ q̂(c))

with D the binarised divergence of ``stillroom.losses.alm`` after the binarisation temperature τ
(``log p̂ = log p / τ − ε``). For ``bce`` this equals D of the mixed teacher Bernoulli ``Σ_t π_t p̂_t``
(bce is linear in p); for ``kl`` it is the mixture of the teachers' terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stillroom.losses.alm import ALM_DIVERGENCES, binary_divergence
from stillroom.teachers.fusion import fusion_weights


def joint_chunks(groups: Sequence[np.ndarray], keeps: Sequence[np.ndarray | None], n_student: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Joint chunks of several teachers' alignments with one student sequence.

    ``groups[t]``: ``[G_t, 4]`` (teacher start, teacher end, student start, student end), teacher as source, in
    order (an alignment's groups, or chunks merged from them: student tokens no group covers, like the trailing
    run of ``stillroom.tokenization.unbiased.merge_chunks``, are in no joint chunk); ``keeps[t]``: bool ``[G_t]`` (None: all
    kept). Returns
    ``student [C, 2]`` (s0, s1) and ``teacher [n, C, 2]`` (t0, t1 per teacher): the spans between consecutive
    boundaries shared by every teacher whose groups are all kept by every teacher. A teacher group without student
    tokens (a BOS) at a chunk's edge is left out of it, as ``alm_loss`` leaves such groups out."""
    bounds, owners, bad_cums, gap_cums = [], [], [], []
    for g, k in zip(groups, keeps, strict=True):
        g = np.asarray(g, dtype=np.int64).reshape(-1, 4)
        k = np.ones(len(g), dtype=bool) if k is None else np.asarray(k, dtype=bool)
        owner = np.full(n_student, -1, dtype=np.int64)
        for i, (s0, s1) in enumerate(g[:, 2:].tolist()):
            owner[s0:s1] = i
        if len(g) and g[:, 3].max() > n_student:
            raise ValueError(f"groups reach student token {int(g[:, 3].max())} of a sequence of {n_student}; pass "
                             f"alignments of this student sequence with the teacher as source")
        nonempty = g[:, 3] > g[:, 2]
        bounds.append(set(g[nonempty, 2].tolist()) | set(g[nonempty, 3].tolist()))
        owners.append((g, owner))
        bad_cums.append(np.concatenate([[0], np.cumsum(~k)]))
        gap_cums.append(np.concatenate([[0], np.cumsum(owner < 0)]))
    cuts = sorted(set.intersection(*bounds)) if bounds else []
    student, teacher = [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        ranges = []
        for (g, owner), bad, gap in zip(owners, bad_cums, gap_cums, strict=True):
            lo, hi = owner[a], owner[b - 1]
            if gap[b] - gap[a] or bad[hi + 1] - bad[lo]:
                break
            ranges.append((g[lo, 0], g[hi, 1]))
        else:
            student.append((a, b))
            teacher.append(ranges)
    n = len(groups)
    return (np.asarray(student, dtype=np.int64).reshape(-1, 2),
            np.asarray(teacher, dtype=np.int64).reshape(-1, n, 2).transpose(1, 0, 2))


def _span_sums(lp: torch.Tensor, spans: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ lp[a:b] per span ``[C]`` and whether every entry there is finite."""
    c = torch.as_tensor(np.cumsum(spans[:, 1] - spans[:, 0]), device=lp.device)
    n = torch.as_tensor(spans[:, 1] - spans[:, 0], device=lp.device)
    chunk = torch.repeat_interleave(torch.arange(len(spans), device=lp.device), n)
    pos = torch.repeat_interleave(torch.as_tensor(spans[:, 0], device=lp.device) - c + n, n) + torch.arange(
        int(n.sum()), device=lp.device)
    vals = lp[pos]
    ok = torch.isfinite(vals)
    sums = torch.zeros(len(spans), dtype=lp.dtype, device=lp.device).index_add_(0, chunk, torch.where(ok, vals, 0.0))
    bad = torch.zeros(len(spans), dtype=torch.int64, device=lp.device).index_add_(0, chunk, (~ok).long())
    return sums, bad == 0


def fused_alm(student_logprobs: torch.Tensor, teacher_logprobs: Sequence[torch.Tensor],
              groups: Sequence[np.ndarray], keeps: Sequence[np.ndarray | None] | None = None, *,
              method: str = "min_ce", level: str = "sequence", weight_temperature: float = 1.0,
              temperature: float = 1.0, divergence: str = "bce", epsilon: float = 1e-6
              ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The fused ALM term of one sequence (see the module docstring): ``(Σ_c n(c) Σ_t π_t(c) D_t(c), π [n, C],
    student chunks [C, 2])``.

    ``student_logprobs [S]`` and ``teacher_logprobs[t] [T_t]`` are token-indexed log-probs of each side's own
    tokens (``stillroom.losses.token_logprobs``; non-finite: not scored; teachers detached); ``groups[t]`` the
    teacher-as-source alignment groups, ``keeps[t]`` their masks. A joint chunk any side cannot score is left out.
    """
    if divergence not in ALM_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; choose one of {', '.join(ALM_DIVERGENCES)}")
    n = len(teacher_logprobs)
    if n == 0 or len(groups) != n or (keeps is not None and len(keeps) != n):
        raise ValueError(f"fused_alm: {n} teachers' log-probs, {len(groups)} group arrays and "
                         f"{'no' if keeps is None else len(keeps)} masks; give one of each per teacher (at least one)")
    dtype = student_logprobs.dtype if student_logprobs.dtype == torch.float64 else torch.float32
    s_lp = student_logprobs.to(dtype)
    spans, t_spans = joint_chunks(groups, keeps if keeps is not None else [None] * n, int(s_lp.shape[0]))
    zero = s_lp.sum() * 0.0
    if len(spans) == 0:
        return zero, torch.zeros(n, 0, dtype=dtype), spans
    lq, ok = _span_sums(s_lp, spans)
    lps = []
    for t in range(n):
        lp, ok_t = _span_sums(teacher_logprobs[t].detach().to(dtype).to(s_lp.device), t_spans[t])
        lps.append(lp)
        ok = ok & ok_t
    lp = torch.stack(lps)[:, ok]  # [n, C]
    lq, spans = lq[ok], spans[ok.cpu().numpy()]
    if len(spans) == 0:
        return zero, torch.zeros(n, 0, dtype=dtype), spans
    size = torch.as_tensor(spans[:, 1] - spans[:, 0], dtype=dtype, device=s_lp.device)
    if level == "sequence":
        ce = (-lp.sum(1) / size.sum())[:, None].expand_as(lp)
    elif level == "token":
        ce = -lp / size
    else:
        raise ValueError(f"fusion level {level!r}: choose 'sequence' or 'token' (per chunk)")
    w = fusion_weights(list(ce), torch.ones_like(lp, dtype=torch.bool), method, "token", weight_temperature)
    lq_hat = lq.clamp_max(0.0) / temperature - epsilon
    lp_hat = lp.clamp_max(0.0) / temperature - epsilon
    d = binary_divergence(lp_hat, lq_hat.expand_as(lp_hat), divergence)  # [n, C]
    return (size * (w.to(dtype) * d).sum(0)).sum(), w.detach(), spans
