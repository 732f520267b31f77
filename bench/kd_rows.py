"""Distil on one class of the student's rows only, the class set by another tokenizer's cuts (a diagnostic).

``bench.real_fusion --kd-rows starts|inside`` asks *where* a teacher's signal reaches the student: the KD term is
kept on the rows whose next student token starts where one of Gemma-3's tokens of the same text starts (``starts``:
both tokenizers cut there, a projected target gets the teacher's whole top-k) or strictly inside one (``inside``:
the projected target is the teacher's belief conditioned on bytes of its token the student has already seen); on
the other rows the student gets cross-entropy alone. The classes come from Gemma-3's tokenization of each block
(its cache), so a same-tokenizer teacher can be restricted to exactly the rows a cross-tokenizer one is: a paired
comparison of the two teachers on each class.

The trainer's fused target is masked after it is built and filled (``DistillTrainer.fused_target``), so nothing
else about the arm changes: a benchmark's instrument, not a training option.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

CLASSES = ("all", "starts", "inside")


def inside_rows(teacher_table, teacher_ids, student_table, student_ids) -> np.ndarray:
    """``bool [len(student_ids)]``: row ``r``'s next student token (``r + 1``) starts strictly inside one of the
    teacher's tokens of the same text (not at an offset where a teacher token starts); the last row is ``False``."""
    t_starts = teacher_table.pieces(np.asarray(teacher_ids))[1][:-1]
    s_starts = student_table.pieces(np.asarray(student_ids))[1][:-1]
    out = np.zeros(len(s_starts), dtype=bool)
    out[:-1] = ~np.isin(s_starts[1:], t_starts)
    return out


def keep_mask(which: str, inputs: dict, source, teacher_table, student_table):
    """``bool [B, T]``: the rows of a batch whose KD term is kept for class ``which`` (``starts`` / ``inside``),
    the classes from ``source``'s tokenization (a ``CachedTeacher``) of the batch's blocks; padding is dropped."""
    import torch

    ids, attn = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    for r, out in enumerate(source.signal(inputs["text"], inputs["example_id"])):
        sid = ids[r][attn[r]].numpy()
        inside = inside_rows(teacher_table, out.input_ids.numpy(), student_table, sid)
        cls = inside if which == "inside" else ~inside
        cls[-1] = False  # the last row predicts nothing
        keep[r, torch.nonzero(attn[r]).flatten()] = torch.from_numpy(cls)
    return keep


@contextmanager
def kd_rows(which: str, cache: str | Path, teacher: str, student: str):
    """While open, every ``DistillTrainer`` keeps its KD term on class ``which`` of the rows only (``all``: no
    change), the classes from the top-k cache ``cache`` of ``teacher`` (a model folder) over the training blocks."""
    if which not in CLASSES:
        raise ValueError(f"kd_rows: {which!r} is not one of {CLASSES}")
    if which == "all":
        yield
        return
    from stillroom.models.loading import load_tokenizer
    from stillroom.teachers.cache import CachedTeacher
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.training.trainer import DistillTrainer

    source = CachedTeacher(Path(cache))
    t_table = TokenTable.from_tokenizer(load_tokenizer(teacher))
    s_table = TokenTable.from_tokenizer(load_tokenizer(student))
    built = DistillTrainer.fused_target

    def masked(self, inputs):
        target = built(self, inputs)
        keep = keep_mask(which, inputs, source, t_table, s_table).to(target.valid.device)
        return replace(target, valid=target.valid & keep)

    DistillTrainer.fused_target = masked
    try:
        yield
    finally:
        DistillTrainer.fused_target = built
