"""Distillation losses: divergences on dense or sparse (top-k) targets, EMO, and chunked fused-linear forms.

Depends only on torch and ``stillroom.targets.SparseTarget``. Every loss is a plain function:

- ``distill_loss(student_logits, target, kind=...)`` — dense teacher logits or a ``SparseTarget``;
- ``fused_linear_distill_loss(hidden, weight, ...)`` — the same plus λ·CE, from hidden states, chunked;
- ``emo_loss`` / ``fused_linear_emo_loss`` / ``EMOLoss`` — earth mover distance optimisation;
- ``alm_loss`` — approximate likelihood matching over aligned chunks (cross-tokenizer, no vocabulary map);
- ``uld_loss`` — universal logit distillation: sorted distributions compared rank by rank (vocabulary-free);
- ``projected_student_kl`` — a divergence in the teacher's vocabulary, the student's distribution moved there
  by a sparse re-tokenization map (X-Token's direction).
"""

from stillroom.losses.alm import ALM_DIVERGENCES, alm_loss, token_logprobs
from stillroom.losses.distill import distill_loss
from stillroom.losses.divergences import KINDS, row_divergence
from stillroom.losses.emo import EMOLoss, emo_loss, fused_linear_emo_loss
from stillroom.losses.fused_linear import fused_linear_distill_loss
from stillroom.losses.reverse_kl import projected_student_kl
from stillroom.losses.sparse import TAIL_FLOOR
from stillroom.losses.uld import uld_loss

__all__ = ["ALM_DIVERGENCES", "KINDS", "TAIL_FLOOR", "EMOLoss", "alm_loss", "distill_loss", "emo_loss",
           "fused_linear_distill_loss", "fused_linear_emo_loss", "projected_student_kl", "row_divergence",
           "token_logprobs", "uld_loss"]
