"""``objective: xtoken`` / ``hybrid`` — teachers whose divergence is taken in their own vocabulary.

At every alignment group past the first token, the student row before the group and the teacher row before it
predict the token that starts at the same byte. There the student's distribution is moved into the teacher's
vocabulary by the re-tokenization map W (:mod:`stillroom.tokenization.reverse`) and compared with the teacher's
own top-k and tail (:func:`stillroom.losses.reverse_kl.projected_student_kl`): the teacher's distribution is used
as it is, nothing of it projected away. Rows inside a group (the student's second and later tokens of a word the
teacher spells differently) get no term. The term is summed over the pairs, on the per-token scale of ΣCE.

``objective: hybrid`` (GOLD's hybrid ULD) uses the same pairs: the teacher ids with an exact-bytes student twin
compared id by id, the rest by ULD's sorted comparison, weighted by the teacher mass each part holds
(:func:`stillroom.losses.reverse_kl.hybrid_loss`).
"""

from __future__ import annotations

import torch

from stillroom.losses.reverse_kl import hybrid_loss, projected_student_kl
from stillroom.targets import SparseTarget
from stillroom.teachers.objectives import ObjectiveTeacher, group_pairs, pair_term


class XTokenTeacher(ObjectiveTeacher):
    """The teacher's top-k against the student's distribution moved into its vocabulary, at every group start
    (module docstring); ``reverse`` is the student → teacher map (a
    :class:`~stillroom.tokenization.reverse.ReverseMap`)."""

    objective = "xtoken"

    def __init__(self, source, student_table, teacher_table, config, name: str = "teacher", reverse=None):
        super().__init__(source, student_table, teacher_table, config, name)
        if reverse is None:
            raise ValueError(f"teacher {name}: objective xtoken needs the student → teacher map "
                             "(stillroom.tokenization.reverse.reverse_map)")
        self.reverse = reverse

    def term(self, hidden, weight, labels, pairs, offsets):
        cols = tuple(c.to(hidden.device) for c in self.reverse.columns)
        return pair_term(hidden, weight, group_pairs(pairs, labels, offsets, one_to_one=False),
                         lambda z, t: self.divergence(z, t, cols), self.config.chunk_size)

    def divergence(self, logits: torch.Tensor, target: SparseTarget, cols) -> torch.Tensor:
        """Σ over the rows of KL(teacher ‖ student moved into its vocabulary)."""
        return projected_student_kl(logits, target, cols, temperature=self.config.temperature, reduction="sum")


class HybridTeacher(XTokenTeacher):
    """GOLD's hybrid at every group start: ``reverse`` is the exact-bytes twin map
    (:func:`stillroom.tokenization.reverse.exact_map`), ``unmatched`` (bool ``[V_s]``) the student's text tokens
    without a twin."""

    objective = "hybrid"

    def __init__(self, source, student_table, teacher_table, config, name: str = "teacher", reverse=None,
                 unmatched: torch.Tensor | None = None):
        super().__init__(source, student_table, teacher_table, config, name, reverse)
        if unmatched is None:
            raise ValueError(f"teacher {name}: objective hybrid needs the student's unmatched ids")
        self.unmatched = unmatched

    def divergence(self, logits: torch.Tensor, target: SparseTarget, cols) -> torch.Tensor:
        return hybrid_loss(logits, target, cols, self.unmatched, temperature=self.config.temperature,
                           reduction="sum")
