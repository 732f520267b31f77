"""Distillation losses: divergences on dense or sparse (top-k) targets, EMO, and chunked fused-linear forms.

Depends only on torch and ``stillroom.targets.SparseTarget``. Every loss is a plain function:

- ``distill_loss(student_logits, target, kind=...)`` — dense teacher logits or a ``SparseTarget``;
- ``fused_linear_distill_loss(hidden, weight, ...)`` — the same plus λ·CE, from hidden states, chunked;
- ``emo_loss`` / ``fused_linear_emo_loss`` / ``EMOLoss`` — earth mover distance optimisation.
"""

from stillroom.losses.distill import distill_loss
from stillroom.losses.divergences import KINDS, row_divergence
from stillroom.losses.emo import EMOLoss, emo_loss, fused_linear_emo_loss
from stillroom.losses.fused_linear import fused_linear_distill_loss
from stillroom.losses.sparse import TAIL_FLOOR

__all__ = ["KINDS", "TAIL_FLOOR", "EMOLoss", "distill_loss", "emo_loss", "fused_linear_distill_loss",
           "fused_linear_emo_loss", "row_divergence"]
