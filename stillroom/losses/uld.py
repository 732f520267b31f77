"""ULD — universal logit distillation (Boizard et al. 2024, arXiv 2402.12030): a vocabulary-free distance.

Both distributions are sorted in decreasing order and compared rank by rank, ``Σ_r |q_(r) − p_(r)|`` — the
closed form the paper uses for its Wasserstein-1 bound, with the shorter vocabulary padded with zero
probabilities. Teacher and student may have any vocabularies; nothing maps tokens between them. Rows must
already be paired (row n of the student and of the teacher predict the same text, e.g. the last tokens of
aligned chunks).

Teacher forms:

- dense logits ``[..., V_t]`` (``softmax(t / T)``): the full sorted comparison (one ``[N, V]`` sort per side);
- a ``SparseTarget`` (ids ignored, any vocabulary): its k entries are the teacher's top ranks and ``tail`` the
  mass of all others, whose spread is unknown. Ranks 1..m (m = live entries of the row) are compared exactly;
  everything below rank m is one bucket, ``|Σ_{r>m} q_(r) − tail|`` — by the triangle inequality a lower bound on
  the dense value, equal to it when the tail is 0 or the student puts no mass below rank m that the teacher
  does not. Only the student's top-k is needed (``torch.topk``), not a full sort.

Conventions against TRL's GOLD ``ULDLoss`` (``trl.experimental.gold``), tested in tests/test_losses_uld.py:
the same rank-wise L1 (no ½) and zero padding; TRL divides each sequence's sum by its length and averages
sequences, here ``reduction="mean"`` divides by the number of counted rows of the whole batch (equal when the
sequences have the same length); TRL pairs positions by index (or its own byte groups) — here the caller pairs
rows; one temperature here for student and dense teacher (TRL has one per side).
"""

from __future__ import annotations

import torch

from stillroom.losses.distill import check_finite, reduce_rows, student_rows
from stillroom.targets import SparseTarget


def uld_loss(student_logits: torch.Tensor, target: torch.Tensor | SparseTarget, *, temperature: float = 1.0,
             mask: torch.Tensor | None = None, reduction: str = "mean",
             num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Rank-wise L1 between sorted student ``softmax(student_logits / T)`` ``[..., V_s]`` and a teacher given as
    dense logits ``[..., V_t]`` or a ``SparseTarget`` with the same leading shape. ``mask [...]`` True = counted
    (combined with ``SparseTarget.valid``); reductions as in ``distill_loss``."""
    leading, z, counted = student_rows(student_logits, mask, reduction, temperature)
    q = torch.softmax(z / temperature, -1)
    if isinstance(target, SparseTarget):
        if tuple(target.ids.shape[:-1]) != leading:
            raise ValueError(f"SparseTarget rows {tuple(target.ids.shape[:-1])} do not match the student's leading "
                             f"shape {leading}")
        k = target.k
        lp = target.logprobs.reshape(-1, k).to(z.dtype)
        if torch.isnan(lp).any() or (lp == float("inf")).any():
            raise ValueError("SparseTarget.logprobs contain NaN or +inf; use -inf for entries without mass")
        counted = counted & target.valid.reshape(-1).bool()
        p = lp.exp().sort(-1, descending=True).values  # padding (−inf) sorts last as 0
        m = torch.isfinite(lp).sum(-1, keepdim=True)  # live entries per row
        qk = q.topk(min(k, q.shape[-1]), -1).values
        if qk.shape[-1] < k:
            qk = torch.nn.functional.pad(qk, (0, k - qk.shape[-1]))
        ranks = torch.arange(k, device=z.device).unsqueeze(0)
        head = torch.where(ranks < m, (qk - p).abs(), torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1)
        q_rest = 1.0 - torch.where(ranks < m, qk, torch.zeros((), dtype=z.dtype, device=z.device)).sum(-1)
        per_row = head + (q_rest - target.tail.reshape(-1).to(z.dtype)).abs()
    else:
        if tuple(target.shape[:-1]) != leading:
            raise ValueError(f"teacher logits {tuple(target.shape)} and student logits {tuple(student_logits.shape)} "
                             f"differ in their leading (position) shape")
        t = target.reshape(-1, target.shape[-1]).to(z.dtype)
        check_finite(t, "teacher logits")
        p = torch.softmax(t / temperature, -1).sort(-1, descending=True).values
        qs = q.sort(-1, descending=True).values
        width = max(p.shape[-1], qs.shape[-1])
        p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
        qs = torch.nn.functional.pad(qs, (0, width - qs.shape[-1]))
        per_row = (qs - p).abs().sum(-1)
    per_row = torch.where(counted, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    out = reduce_rows(per_row, counted, reduction, num_items)
    return out.reshape(leading) if reduction == "none" else out
