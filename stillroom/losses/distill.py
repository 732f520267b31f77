"""``distill_loss``: a divergence between student logits and a dense or sparse teacher target.

Usage outside stillroom::

    loss = distill_loss(student_logits, teacher_logits, kind="jsd", beta=0.5, temperature=2.0, mask=labels != -100)

Temperature T scales the student logits and dense teacher logits (``softmax(z / T)``); a ``SparseTarget``
already is a distribution (its producer chose the teacher temperature), so only the student side is scaled.
``t2_scale=True`` multiplies the loss by T² (Hinton et al.'s convention keeping gradient magnitudes
comparable across temperatures).

Reductions: ``"mean"`` divides by the number of counted positions in *this call*; ``"sum"`` returns the sum;
``"none"`` returns one value per position (0 where masked). For gradient accumulation, pass ``reduction="sum"``
and divide by the number of counted positions across all micro-batches (or pass that count as
``num_items``): the accumulated gradient then equals the full-batch mean exactly. When no position is counted
the loss is a defined 0 (still attached to the graph, with zero gradient).

Vocabulary padding: a teacher whose logits are wider than the student's (Qwen2.5 heads have 151,936 rows for
151,665 real tokens) has its extra columns dropped and is renormalised over the student's V columns. If the
student's logits are padded too, pass ``vocab_size`` (the real token count): columns ``>= vocab_size`` are
dropped on both sides. A teacher narrower than the student is an error.
"""

from __future__ import annotations

import torch

from stillroom.losses.divergences import check_kind, row_divergence
from stillroom.losses.sparse import buckets, check_sparse, target_rows
from stillroom.targets import SparseTarget

REDUCTIONS = ("mean", "sum", "none")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise on NaN/inf. Fast path: one sum (NaN and ±inf propagate into it) instead of an elementwise test."""
    if bool(torch.isfinite(x.sum())):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).reshape(-1, x.shape[-1]).any(-1).nonzero()[0].item()
        raise ValueError(f"{name} contain NaN or inf (first bad row {bad}); check the model's forward pass, "
                         f"its dtype (fp16 overflow) and the learning rate")


def reduce_rows(per_row: torch.Tensor, counted: torch.Tensor, reduction: str,
                num_items: int | float | torch.Tensor | None) -> torch.Tensor:
    """Masked rows are already 0 in ``per_row``."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    return total / counted.sum().clamp_min(1)


def student_rows(student_logits: torch.Tensor, mask: torch.Tensor | None, reduction: str, temperature: float
                 ) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    """Checks shared by the logit losses, then ``(leading shape, logits [N, V] in fp32 or fp64, counted [N])``:
    the reduction and temperature are valid, the logits floating point and finite, ``mask`` (True = counted)
    has the logits' leading shape."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    leading = tuple(student_logits.shape[:-1])
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    if not logits.dtype.is_floating_point:
        raise ValueError(f"student_logits must be floating point, got {logits.dtype}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    check_finite(logits, "student_logits")
    counted = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if mask is not None:
        if tuple(mask.shape) != leading:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the student's leading shape {leading}")
        counted = counted & mask.reshape(-1).bool()
    return leading, logits, counted


def distill_loss(student_logits: torch.Tensor, target: torch.Tensor | SparseTarget, *, kind: str = "forward_kl",
                 temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 mask: torch.Tensor | None = None, reduction: str = "mean", t2_scale: bool = False,
                 vocab_size: int | None = None,
                 num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Divergence D(p, q) between teacher target p and student ``softmax(student_logits / T)``.

    ``student_logits [..., V]``; ``target`` dense teacher logits ``[..., V']`` (V' >= V) or a
    ``SparseTarget`` with leading shape ``[...]`` in the student vocabulary; ``mask [...]`` bool (True =
    counted; combined with ``SparseTarget.valid``). Kinds: see ``stillroom.losses.divergences``.
    """
    check_kind(kind, beta, alpha)
    if vocab_size is not None:
        if vocab_size > student_logits.shape[-1]:
            raise ValueError(f"vocab_size={vocab_size} exceeds the student logits' width {student_logits.shape[-1]}")
        student_logits = student_logits[..., :vocab_size]
    leading, logits, counted = student_rows(student_logits, mask, reduction, temperature)
    V = logits.shape[-1]
    s = logits / temperature
    lse = torch.logsumexp(s, -1, keepdim=True)
    logq = s - lse
    if isinstance(target, SparseTarget):
        check_sparse(target, logits.shape[0], V, leading)
        ids, logprobs, tail, valid = target_rows(target)
        counted = counted & valid
        reverse = kind == "reverse_kl" or (kind == "jsd" and beta == 1.0)
        bq, bp, live, _ = buckets(s, lse, ids, logprobs, tail, reverse)
        per_row = row_divergence(bq, bp, kind, beta, alpha, live)
    else:
        if tuple(target.shape[:-1]) != leading:
            raise ValueError(f"teacher logits {tuple(target.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ in their leading (position) shape")
        if target.shape[-1] < V:
            raise ValueError(f"teacher logits have {target.shape[-1]} columns but the student has {V}; a teacher "
                             f"vocabulary must cover the student's (pass vocab_size= if the student is padded)")
        t = target.reshape(-1, target.shape[-1])[:, :V].to(logits.dtype)
        check_finite(t, "teacher logits")
        logp = torch.log_softmax(t / temperature, -1)
        per_row = row_divergence(logq, logp, kind, beta, alpha)
    per_row = torch.where(counted, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    if t2_scale:
        per_row = per_row * temperature**2
    out = reduce_rows(per_row, counted, reduction, num_items)
    return out.reshape(leading) if reduction == "none" else out
