"""Distillation losses: divergences on dense or sparse (top-k) targets, EMO, and chunked fused-linear forms.

Depends only on torch and ``stillroom.targets.SparseTarget``. Every loss is a plain function.
"""

from stillroom.losses.distill import distill_loss
from stillroom.losses.divergences import KINDS, row_divergence
from stillroom.losses.fused_linear import fused_linear_distill_loss
from stillroom.losses.sparse import TAIL_FLOOR

__all__ = ["KINDS", "TAIL_FLOOR", "distill_loss", "fused_linear_distill_loss", "row_divergence"]
