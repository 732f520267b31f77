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

import numpy as np
import torch

from stillroom.losses.fused_linear import auto_chunk_size
from stillroom.losses.reverse_kl import hybrid_loss, projected_student_kl
from stillroom.targets import SparseTarget
from stillroom.teachers.objectives import ObjectiveTeacher


def boundary_pairs(pairs, labels: torch.Tensor, offsets: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, SparseTarget]:
    """(batch row, student row, the teacher's own target) for every alignment group starting past token 0 on both
    sides: student row s0 − 1 and teacher row t0 − 1 predict the tokens that start at the group's first byte."""
    b_idx, s_rows, ids, lps, tails = [], [], [], [], []
    for b, (out, al) in enumerate(pairs):
        g = np.asarray(al.groups).reshape(-1, 4)
        g = g[(g[:, 0] >= 1) & (g[:, 2] >= 1)]
        if offsets is not None and len(g):
            g = g + np.array([0, 0, offsets[b], offsets[b]])
        g = g[labels[b, g[:, 2]].cpu().numpy() != -100] if len(g) else g
        t_rows = torch.as_tensor(g[:, 0] - 1, dtype=torch.long)
        b_idx.append(torch.full((len(g),), b, dtype=torch.long))
        s_rows.append(torch.as_tensor(g[:, 2] - 1, dtype=torch.long))
        ids.append(out.topk_ids[t_rows].long())
        lps.append(out.topk_logprobs[t_rows].float())
        tails.append(out.tail[t_rows].float())
    lp = torch.cat(lps)
    target = SparseTarget(torch.cat(ids), lp, torch.cat(tails), torch.ones(lp.shape[0], dtype=torch.bool))
    return torch.cat(b_idx), torch.cat(s_rows), target


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
        from torch.utils.checkpoint import checkpoint

        b, s, tgt = boundary_pairs(pairs, labels, offsets)
        dev = hidden.device
        h = hidden[b.to(dev), s.to(dev)]
        tgt = SparseTarget(tgt.ids.to(dev), tgt.logprobs.to(dev), tgt.tail.to(dev), tgt.valid.to(dev))
        cols = tuple(c.to(dev) for c in self.reverse.columns)
        chunk = int(self.config.chunk_size or auto_chunk_size(weight.shape[0]))
        total = hidden.sum() * 0.0

        def piece(hc, w, ids, lp, tail, valid):
            return self.divergence(hc @ w.T, SparseTarget(ids, lp, tail, valid), cols)

        for a in range(0, h.shape[0], chunk):
            sl = slice(a, a + chunk)
            total = total + checkpoint(piece, h[sl], weight, tgt.ids[sl], tgt.logprobs[sl], tgt.tail[sl],
                                       tgt.valid[sl], use_reentrant=False)
        return total

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
