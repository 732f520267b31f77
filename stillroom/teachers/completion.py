"""Cross-tokenizer teachers on completion batches (prompt/completion and chat data).

Each teacher renders the prompt with its own template, so only the *completion regions* are aligned: the
teacher's rows over its completion are moved onto the student's completion rows and placed back at the
student's offsets (:func:`aligned_targets` for KD teachers, :func:`aligned_regions` for ALM / ULD teachers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stillroom.errors import ConfigError
from stillroom.inputs.chat import completion_ids, marker_id, prompt_ids
from stillroom.targets import SparseTarget, TeacherOutput, stack_rows
from stillroom.tokenization.align import align
from stillroom.tokenization.project import student_targets


def region_ids(ids, prompt_len: int, marker: int) -> np.ndarray:
    """``[marker] + ids[prompt_len:]``: a sequence's completion region, whose row 0 predicts the first
    completion token (as row ``prompt_len - 1`` of the whole sequence does)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return np.concatenate([[marker], ids[prompt_len:]]).astype(np.int64)


def region_output(out, prompt_len: int, marker: int):
    """A teacher output over ``prompt + completion`` cut to its completion region (rows ``prompt_len - 1`` on,
    input ids as :func:`region_ids`)."""

    a = prompt_len - 1
    return TeacherOutput(out.example_id, torch.as_tensor(region_ids(out.input_ids.numpy(), prompt_len, marker)),
                         out.topk_ids[a:], out.topk_logprobs[a:], out.tail[a:], out.gold_ce[a:])


def place(target, ce: torch.Tensor, start: int):
    """A region's target and CE put back at student rows ``start, start + 1, ...``; rows before are invalid."""
    k = target.ids.shape[-1]
    ids = torch.cat([torch.zeros(start, k, dtype=torch.long), torch.as_tensor(target.ids)])
    lp = torch.cat([torch.full((start, k), float("-inf")), torch.as_tensor(target.logprobs).float()])
    tail = torch.cat([torch.zeros(start), torch.as_tensor(target.tail).float()])
    valid = torch.cat([torch.zeros(start, dtype=torch.bool), torch.as_tensor(target.valid)])
    return SparseTarget(ids, lp, tail, valid), torch.cat([torch.full((start,), float("nan")), ce.float()])


def teacher_rows(tokenizer, batch: dict[str, Any]) -> tuple[list[list[int]], list[int]]:
    """A teacher's own ids for every row of a completion batch (its prompt rendering + its tokenization of the
    completion text, ending with its end token where the student's did) and its prompt lengths."""
    rows, plens = [], []
    for ex, text, ended in zip(batch["example"], batch["completion"], batch["ended"], strict=True):
        p = prompt_ids(tokenizer, ex)
        rows.append(p + completion_ids(tokenizer, text, end=ended))
        plens.append(len(p))
    return rows, plens


def _regions(teacher, batch: dict[str, Any]):
    """Run ``teacher``'s online source on its own rendering of each completion row; yield per row
    ``(teacher region output, student region ids, student prompt length)`` (:func:`region_output`,
    :func:`region_ids`: token 0 of both regions is a special marker)."""
    src = teacher.source
    if not hasattr(src, "run_ids") or getattr(src, "tokenizer", None) is None:
        raise ConfigError(f"teacher {teacher.name}: prompt/completion and chat data need an online teacher (its "
                          "own chat template renders each prompt); remove teachers.N.cache")
    rows, t_plens = teacher_rows(src.tokenizer, batch)
    outs = src.run_ids(rows, [str(i) for i in batch["example_id"]], starts=[p - 1 for p in t_plens])
    ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    s_mark, t_mark = marker_id(teacher.student_table), marker_id(teacher.teacher_table)
    for r, out in enumerate(outs):
        sp = int(batch["prompt_len"][r])
        yield region_output(out, t_plens[r], t_mark), region_ids(ids[r][mask[r]].numpy(), sp, s_mark), sp


@torch.no_grad()
def aligned_targets(teacher, batch: dict[str, Any]):
    """:class:`stillroom.teachers.kd.AlignedTeacher` on a completion batch: run its online source on its own
    rendering of each row, align the completion regions at byte level and project (``student_targets``);
    rows outside the completion are invalid (``nan`` CE). Returns ``(SparseTarget [B, T, k], CE [B, T])``."""

    targets, ces = [], []
    for out, sid, sp in _regions(teacher, batch):
        t, ce = student_targets(out, sid, teacher.student_table, teacher.teacher_table, teacher.vocab_map,
                                fallback=teacher.fallback, fill=False)
        t, ce = place(t, torch.as_tensor(ce), sp - 1)
        targets.append(t)
        ces.append(ce)
    return stack_rows(targets, ces, batch["input_ids"].shape[1])


@torch.no_grad()
def aligned_regions(teacher, batch: dict[str, Any]) -> list[tuple[Any, Any]]:
    """An ALM / ULD teacher (:class:`stillroom.teachers.objectives.ObjectiveTeacher`) on a completion batch: per row,
    (its output over its own rendering cut to the completion region, the byte alignment of that region with
    the student's, teacher as source). Region token i of the student is row token ``prompt_len - 1 + i``."""

    return [(out, align(out.input_ids.numpy(), sid, teacher.teacher_table, teacher.student_table))
            for out, sid, _ in _regions(teacher, batch)]
