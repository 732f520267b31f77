"""Multi-teacher knowledge fusion (FuseLLM, Wan et al. 2024): combine several teachers' sparse targets.

Every teacher gives a :class:`~stillroom.targets.SparseTarget` already projected onto the *student's*
positions and vocabulary (leading shape ``[B, T]`` or ``[T]``) and, per student position, its cross-entropy
on the gold next token (``ce``, same leading shape; ``nan`` where unknown). A teacher *votes* at a position
where its target is valid and it has a known CE somewhere in the sequence; elsewhere it is excluded — never
counted as CE 0 or as a zero distribution. A position whose CE is unknown (a served teacher's answer may not
hold the gold token) is scored, at token level, with the teacher's mean CE over the sequence.

Methods (``method``) and levels (``level``):

- ``"min_ce"`` — MinCE: take the distribution of the teacher with the lowest CE.
  ``level="sequence"`` (FuseLLM): CE_t = mean over the sequence positions where teacher t's CE is known
  (the whole text it read, whether or not its distribution reached every position); the chosen teacher is
  the argmin per sequence; at a position where it does not vote, the next-best voting teacher (by the same
  sequence CE) is used — so where the chosen teacher's tokenization gave no distribution, another teacher's
  fills in. ``level="token"``: argmin of the per-position CE.
- ``"avg_ce"`` — AvgCE: a weighted average of the voting teachers' distributions,

      w_t = exp(-CE_t / tau) / sum_{s votes} exp(-CE_s / tau)        (= softmax(-CE / tau) over voters)

  so a teacher whose CE is 1 nat lower gets e times the weight. (FuseLLM's reference code applies a softmax
  to exp(-CE), i.e. w_t ∝ exp(exp(-CE_t)), which squeezes all weights towards uniform; we implement
  softmax(-CE) as the paper's text describes, with ``tau`` = ``weight_temperature``.)
- ``"mean"`` — the uniform average of the voting teachers' distributions.

The fused target is a SparseTarget over the union of the teachers' ids: probabilities are mixed
``p(v) = sum_t w_t p_t(v)`` (duplicate ids summed), the tail mass is mixed the same way
``tail = sum_t w_t tail_t``, and a row is valid where at least one teacher votes. ``top_k`` optionally keeps
only the largest fused entries, moving the rest into the tail.
"""

from __future__ import annotations

from typing import Literal

import torch

from stillroom.targets import SparseTarget

Method = Literal["min_ce", "avg_ce", "mean"]
Level = Literal["sequence", "token"]
METHODS = ("min_ce", "avg_ce", "mean")
LEVELS = ("sequence", "token")


def votes(target: SparseTarget, ce: torch.Tensor) -> torch.Tensor:
    """Where a teacher votes: its target is valid and its CE is known somewhere in the sequence."""
    return target.valid & torch.isfinite(sequence_ce(ce)).unsqueeze(-1)


def sequence_ce(ce: torch.Tensor) -> torch.Tensor:
    """Mean CE over the positions of each sequence (last dim) where it is known (finite); ``inf`` for a
    sequence with none."""
    known = torch.isfinite(ce)
    ce0 = torch.where(known, ce, torch.zeros_like(ce))
    n = known.sum(-1)
    mean = ce0.sum(-1) / n.clamp_min(1)
    return torch.where(n > 0, mean, torch.full_like(mean, float("inf")))


def teacher_scores(ces: list[torch.Tensor], vote: torch.Tensor, level: Level) -> torch.Tensor:
    """Per-teacher, per-position CE used for the vote: ``[n, ...]``, ``inf`` where a teacher does not vote.

    At sequence level the score is the teacher's mean CE over every position of the sequence where its CE is
    known, voting or not: a position whose distribution could not be transferred still says how well the
    teacher predicted those bytes, and every teacher is then scored on the same text."""
    dt = torch.float64 if any(c.dtype == torch.float64 for c in ces) else torch.float32  # float64 stays float64
    ce = torch.stack([c.to(dt) for c in ces])
    seq = sequence_ce(ce).unsqueeze(-1).expand_as(ce)  # [n, ..., T]
    if level == "sequence":
        ce = seq
    elif level == "token":  # an unknown CE: the teacher's mean over the sequence
        ce = torch.where(torch.isfinite(ce), ce, seq)
    else:
        raise ValueError(f"fusion level {level!r} is not one of {LEVELS}")
    return torch.where(vote, ce, torch.full_like(ce, float("inf")))


def fusion_weights(ces: list[torch.Tensor], vote: torch.Tensor, method: Method, level: Level = "sequence",
                   weight_temperature: float = 1.0) -> torch.Tensor:
    """Weights ``[n, ...]`` of each teacher at each position; they sum to 1 where anyone votes, else 0."""
    if method not in METHODS:
        raise ValueError(f"fusion method {method!r} is not one of {METHODS}")
    score = teacher_scores(ces, vote, level)
    if method == "min_ce":
        w = torch.zeros_like(score)
        w.scatter_(0, score.argmin(0, keepdim=True), 1.0)
    elif method == "avg_ce":
        # softmax(-CE/tau) over the voting teachers only (non-voters have score inf -> weight 0).
        logits = torch.where(vote, -score / weight_temperature, torch.full_like(score, float("-inf")))
        w = torch.softmax(logits, dim=0)
    else:
        w = vote.float()
        w = w / w.sum(0, keepdim=True).clamp_min(1)
    return torch.where(vote.any(0, keepdim=True), torch.nan_to_num(w, nan=0.0), torch.zeros_like(w))


def _pad_k(t: SparseTarget, k: int) -> SparseTarget:
    pad = k - t.k
    if pad == 0:
        return t
    shape = (*t.ids.shape[:-1], pad)
    ids = torch.cat([t.ids, torch.zeros(shape, dtype=t.ids.dtype, device=t.ids.device)], -1)
    lp = torch.cat([t.logprobs, torch.full(shape, float("-inf"), dtype=t.logprobs.dtype, device=t.ids.device)], -1)
    return SparseTarget(ids, lp, t.tail, t.valid)


def merge_duplicates(ids: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the probabilities of equal ids within each row; returns (ids, probs) with unique ids first,
    sorted by descending probability; leftover slots are id 0 with probability 0."""
    sorted_ids, order = ids.sort(-1)
    p = probs.gather(-1, order)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    group = new.long().cumsum(-1) - 1
    out_p = torch.zeros_like(p).scatter_add_(-1, group, p)
    out_ids = torch.zeros_like(sorted_ids).scatter_(-1, group, sorted_ids)
    n_groups = group[..., -1:] + 1
    slot = torch.arange(ids.shape[-1], device=ids.device)
    out_ids = torch.where(slot < n_groups, out_ids, torch.zeros_like(out_ids))
    out_p, order = out_p.sort(-1, descending=True)
    return out_ids.gather(-1, order), out_p


def mix(targets: list[SparseTarget], weights: torch.Tensor, top_k: int | None = None) -> SparseTarget:
    """``p(v) = sum_t w_t p_t(v)`` over the union of ids; ``tail = sum_t w_t tail_t``."""
    ids = torch.cat([t.ids for t in targets], -1)
    probs = torch.cat([t.logprobs.float().exp() * w.unsqueeze(-1) for t, w in zip(targets, weights, strict=True)], -1)
    tail = sum(t.tail.float() * w for t, w in zip(targets, weights, strict=True))
    ids, probs = merge_duplicates(ids, probs)
    if top_k is not None and top_k < ids.shape[-1]:
        tail = tail + probs[..., top_k:].sum(-1)
        ids, probs = ids[..., :top_k], probs[..., :top_k]
    valid = weights.sum(0) > 0
    lp = torch.where(probs > 0, probs.clamp_min(1e-45).log(), torch.full_like(probs, float("-inf")))
    return SparseTarget(ids, lp, tail.clamp_min(0), valid)


def select(targets: list[SparseTarget], weights: torch.Tensor) -> SparseTarget:
    """Row-wise pick of the teacher whose weight is 1 (MinCE): exact copies of its rows, no mixing."""
    k = max(t.k for t in targets)
    padded = [_pad_k(t, k) for t in targets]
    choice = weights.argmax(0)  # [...]
    ids = torch.stack([t.ids for t in padded]).gather(0, choice[None, ..., None].expand(1, *choice.shape, k))[0]
    lp = torch.stack([t.logprobs for t in padded]).gather(0, choice[None, ..., None].expand(1, *choice.shape, k))[0]
    tail = torch.stack([t.tail for t in padded]).gather(0, choice[None])[0]
    valid = weights.sum(0) > 0
    return SparseTarget(ids, lp, tail, valid)


def fuse(targets: list[SparseTarget], ces: list[torch.Tensor], method: Method = "min_ce",
         level: Level = "sequence", *, weight_temperature: float = 1.0, top_k: int | None = None) -> SparseTarget:
    """Fuse the teachers' targets (each over the student's positions and vocabulary) into one SparseTarget.

    ``targets[t]`` has leading shape ``[B, T]`` (or ``[T]``) and any k; ``ces[t]`` is ``[B, T]`` (``nan`` where
    teacher t has no CE). See the module docstring for the exact rules.
    """
    if not targets:
        raise ValueError("fuse: need at least one teacher target")
    if len(ces) != len(targets):
        raise ValueError(f"fuse: {len(targets)} targets but {len(ces)} CE tensors")
    lead = targets[0].ids.shape[:-1]
    for i, (t, c) in enumerate(zip(targets, ces, strict=True)):
        if t.ids.shape[:-1] != lead or c.shape != lead:
            raise ValueError(f"fuse: teacher {i} has target {tuple(t.ids.shape[:-1])} / ce {tuple(c.shape)}, "
                             f"expected leading shape {tuple(lead)} for every teacher")
    vote = torch.stack([votes(t, c) for t, c in zip(targets, ces, strict=True)])
    w = fusion_weights(ces, vote, method, level, weight_temperature)
    if method == "min_ce":
        fused = select(targets, w)
        if top_k is not None and top_k < fused.k:
            fused = mix([fused], fused.valid[None].float(), top_k)
        return fused
    return mix(targets, w, top_k)
