"""Teachers as the trainer sees them: for a collated batch, a top-k target over the student's positions and
vocabulary and the teacher's CE per position — whatever the teacher's tokenizer, online or from a cache.

- :class:`SameTokenizerTeacher`: the teacher runs on the student's own ids;
- :class:`AlignedTeacher`: a teacher with its own tokenizer (``cache.OnlineTeacher``) or its offline cache
  (``cache.CachedTeacher``), aligned at byte level and projected onto the student's vocabulary
  (completion batches: :func:`stillroom.teachers.completion.aligned_targets`);
- :func:`build_teachers`: one per ``recipe.teachers`` entry (ALM / ULD objectives: :mod:`stillroom.teachers.objectives`).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from stillroom.inputs.blocks import model_inputs
from stillroom.models import runtime
from stillroom.targets import SparseTarget, stack_rows
from stillroom.teachers import completion
from stillroom.tokenization.project import student_targets


class Teacher(Protocol):
    """Anything that gives, for a collated batch, a target over the student's positions and vocabulary
    ``[B, T, k]`` (row j predicts student token j+1) and the teacher's gold CE per student position ``[B, T]``
    (``nan`` where unknown)."""

    name: str

    def targets(self, batch: dict[str, Any]) -> tuple[SparseTarget, torch.Tensor]: ...


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: at row j the gold token that row j predicts (``labels[:, j+1]``), ``-100`` where there is none."""
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    return nxt


def topk_target(logits: torch.Tensor, labels: torch.Tensor, top_k: int | None, temperature: float = 1.0
                ) -> tuple[SparseTarget, torch.Tensor]:
    """Top-k target (``None``: all V) and gold CE from dense logits ``[B, T, V]`` on the student's own tokens."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    top = logp.topk(min(top_k or logp.shape[-1], logp.shape[-1]), -1)
    tail = (1 - top.values.exp().sum(-1)).clamp_min(0)
    nxt = next_labels(labels)
    has = nxt != -100
    logp1 = logp if temperature == 1.0 else torch.log_softmax(logits.float(), -1)  # gold CE is at tau = 1
    gold = logp1.gather(-1, nxt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = torch.where(has, -gold, torch.full_like(gold, float("nan")))
    return SparseTarget(top.indices, top.values, tail, has), ce


class SameTokenizerTeacher:
    """A teacher that shares the student's tokenizer: run it on the student's ids directly (no alignment).

    ``top_k=None`` with a single teacher: the full (dense) teacher distribution, computed chunk by chunk from
    the teacher's hidden states inside the fused-linear loss (teacher logits are never materialised either).
    """

    def __init__(self, model, top_k: int | None = 10, temperature: float = 1.0, name: str = "teacher"):
        self.model = runtime.freeze_teacher(model)
        self.top_k, self.temperature, self.name = top_k, temperature, name

    @runtime.frozen()  # no gradient, and the teacher's own dtype even under the student's autocast
    def targets(self, batch: dict[str, Any]) -> tuple[SparseTarget, torch.Tensor]:
        logits = self.model(**model_inputs(batch)).logits
        return topk_target(logits, batch["labels"], self.top_k, self.temperature)


class AlignedTeacher:
    """A teacher with its own tokenizer (online, ``stillroom.teachers.online.OnlineTeacher``) or read from the offline
    cache (``CachedTeacher``): its top-k signal is aligned and projected onto the student's positions and
    vocabulary by ``stillroom.tokenization.project.student_targets``. Rows the projection cannot transfer (the fallback's
    one-hot rows) come back ``valid=False``: the trainer fills them after fusion, so that another teacher's
    distribution is used there when it has one."""

    def __init__(self, source, student_table, teacher_table, vocab_map, fallback: str = "onehot",
                 name: str = "teacher"):
        self.source, self.student_table, self.teacher_table = source, student_table, teacher_table
        self.vocab_map, self.fallback, self.name = vocab_map, fallback, name

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> tuple[SparseTarget, torch.Tensor]:
        if "prompt_len" in batch:  # completion data: its own rendering, completion regions aligned
            return completion.aligned_targets(self, batch)
        outs = self.source.signal(batch["text"], batch["example_id"])
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        rows, ces = [], []
        for r, out in enumerate(outs):
            sid = ids[r][mask[r]].numpy()
            t, ce = student_targets(out, sid, self.student_table, self.teacher_table, self.vocab_map,
                                    fallback=self.fallback, fill=False)
            rows.append(t)
            ces.append(torch.as_tensor(ce, dtype=torch.float32))
        return stack_rows(rows, ces, ids.shape[1])


