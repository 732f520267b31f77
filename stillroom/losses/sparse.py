"""Sparse (top-k) teacher targets as k + 1 buckets: the k support ids and one tail bucket.

A ``SparseTarget`` row says: the teacher puts ``exp(logprobs[j])`` on token ``ids[j]`` and ``tail`` on
everything else, without saying how the tail is spread. Every divergence is therefore computed between the
*coarse-grained* distributions over k + 1 buckets:

- teacher: ``p_j = exp(logprobs[j])`` for the live support entries (finite log-prob), ``p_tail = tail``;
- student: ``q_j = softmax(s)[ids[j]]`` and ``q_tail = Σ_{i ∉ support} softmax(s)_i`` (computed as a
  logsumexp over the complement, so it stays exact even when the support holds almost all the mass).

Padding entries (log-prob ``-inf``) are not buckets: their student mass stays in the student's tail bucket.
For f-divergences (KL, JSD, TVD) coarse-graining can only lower the value (data-processing inequality); with
k = V and ``tail = 0`` it equals the dense divergence exactly. Per divergence, mass outside the support:

- forward KL / soft CE: the tail contributes ``tail · (log tail − log q_tail)`` (soft CE: ``−tail·log q_tail``),
  so the student is pushed to keep exactly ``tail`` outside the support; with ``tail = 0`` the student's
  outside mass is only penalised through the support terms (standard top-k KD).
- reverse KL (and JSD with β = 1): ``q_tail · (log q_tail − log max(tail, TAIL_FLOOR))``; the floor (1e-6)
  keeps the value finite for top-k targets that claim ``tail = 0`` while strongly penalising student mass
  outside the support.
- JSD (0 < β < 1), skew KLs, TVD: the tail bucket is an ordinary bucket (mixtures keep everything finite).
- A tail bucket that is empty on the student side (the support covers the whole vocabulary) is dropped.
"""

from __future__ import annotations

import math

import torch

from stillroom.targets import SparseTarget

TAIL_FLOOR = 1e-6
# support_buckets: below this student tail mass, 1 − Σ support q_j loses too many digits (relative error about
# k·eps / q_tail: ≤ 1e-5 in float32, ≤ 1e-11 in float64) and the row's tail takes the exact complement logsumexp
CANCEL = {torch.float64: 1e-4, torch.float32: 1e-2}


def check_sparse(target: SparseTarget, n_rows: int, vocab: int, leading: tuple[int, ...]) -> None:
    """Shape, id range and value checks with messages that name the field."""
    if tuple(target.ids.shape[:-1]) != tuple(leading):
        raise ValueError(f"SparseTarget rows {tuple(target.ids.shape[:-1])} do not match the student's "
                         f"leading shape {tuple(leading)}; targets need one row per student position")
    if target.ids.numel() and (int(target.ids.min()) < 0 or int(target.ids.max()) >= vocab):
        raise ValueError(f"SparseTarget.ids must lie in [0, {vocab}) (the student vocabulary); got "
                         f"[{int(target.ids.min())}, {int(target.ids.max())}] — map teacher ids to student ids first")
    if torch.isnan(target.logprobs).any() or (target.logprobs == float("inf")).any():
        raise ValueError("SparseTarget.logprobs contain NaN or +inf; use -inf for entries without mass")
    if not torch.isfinite(target.tail).all() or (target.tail < 0).any():
        raise ValueError("SparseTarget.tail must be finite and >= 0 (the probability mass outside ids)")


def outside_support(s: torch.Tensor, ids: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """A copy of ``s [n, V]`` with each row's live support ids set to −inf; every other column keeps its value.

    One scatter of the constant −inf: padding entries (not live) are pointed at a live id of their row, so
    however often a padding id repeats, and whichever live id it repeats, every write is the same −inf and no
    column is counted twice. Rows without a live entry are copied back from ``s`` whole. The gradient reaches
    each kept column exactly once and no support column. (A scatter that wrote ``s``'s own values back for
    padding routed a padding-only row's gradient at id 0 once per padding entry: −2·softmax(z)₀ too much for
    k = 3.)
    """
    first_live = ids.gather(-1, live.to(torch.uint8).argmax(-1, keepdim=True))
    out = s.clone().scatter_(-1, torch.where(live, ids, first_live), float("-inf"))
    none = ~live.any(-1)
    if bool(none.any()):
        out[none] = s[none]
    return out


def buckets(s: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor,
            reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over k + 1 buckets.

    ``s [n, V]`` scaled student logits, ``lse [n, 1]`` their logsumexp. Returns ``logq, logp, live`` (each
    ``[n, k+1]``, non-live entries set to 0 so no NaN can leak through autograd) and ``s_tail`` (``s`` with
    the support set to −inf, for the tail bucket's gradient).
    """
    live_s = torch.isfinite(logprobs)
    s_tail = outside_support(s, ids, live_s)
    lse_tail = torch.logsumexp(s_tail, -1, keepdim=True)
    logq = torch.cat([s.gather(-1, ids) - lse, lse_tail - lse], -1)
    t = tail.to(logprobs.dtype).unsqueeze(-1)
    log_tail = t.clamp_min(TAIL_FLOOR).log() if reverse else t.log()
    logp = torch.cat([logprobs, log_tail], -1).to(s.dtype)
    live = torch.cat([live_s, torch.isfinite(lse_tail)], -1)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    return torch.where(live, logq, zero), torch.where(live, logp, zero), live, s_tail


def target_rows(target: SparseTarget) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten a SparseTarget to ``[n, k]`` ids/logprobs and ``[n]`` tail/valid."""
    k = target.ids.shape[-1]
    return (target.ids.reshape(-1, k).long(), target.logprobs.reshape(-1, k), target.tail.reshape(-1),
            target.valid.reshape(-1).bool())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x ≤ 0, stable at both ends (log1p near −inf, expm1 near 0)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def support_buckets(s: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor,
                    tail: torch.Tensor, reverse: bool):
    """:func:`buckets` without a masked copy of ``s`` for every row (no autograd; the fused loss's path).

    The student's tail bucket comes from the support alone, ``log q_tail = log(1 − Σ_live q_j)``: one
    ``[n, k]`` gather instead of a ``[n, V]`` masked copy and a second logsumexp over V. Rows whose tail mass is
    below ``CANCEL[dtype]`` (the difference would cancel) take the exact complement logsumexp, as
    :func:`buckets`. Returns ``logq, logp, live`` (as :func:`buckets`), ``log_qt [n, 1]`` (log q_tail, −inf when
    the support holds everything) and ``(rows, s_tail)``: the exact rows (indices, or ``slice(None)`` for all) and
    their masked copies.
    """
    live_s = torch.isfinite(logprobs)
    lq = s.gather(-1, ids) - lse
    inside = torch.logsumexp(torch.where(live_s, lq, float("-inf")), -1, keepdim=True).clamp_max(0.0)
    log_qt = log1mexp(inside)
    low = (log_qt < math.log(CANCEL.get(s.dtype, 1e-2))).squeeze(-1)
    rows, s_tail = None, None
    if bool(low.any()):  # all rows: a slice, so s[rows] is a view and no row is copied
        rows = slice(None) if bool(low.all()) else low.nonzero().squeeze(-1)
        s_tail = outside_support(s[rows], ids[rows], live_s[rows])
        log_qt[rows] = torch.logsumexp(s_tail, -1, keepdim=True) - lse[rows]
    t = tail.to(logprobs.dtype).unsqueeze(-1)
    log_tail = t.clamp_min(TAIL_FLOOR).log() if reverse else t.log()
    logp = torch.cat([logprobs, log_tail], -1).to(s.dtype)
    live = torch.cat([live_s, torch.isfinite(log_qt)], -1)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    return (torch.where(live, torch.cat([lq, log_qt], -1), zero), torch.where(live, logp, zero), live, log_qt,
            (rows, s_tail))
