"""ALM — approximate likelihood matching over aligned chunks (Minixhofer, Vulić, Ponti, arXiv 2503.20083).

No vocabulary map: the teacher and the student each score the *same text* with their own tokens. A chunk is an
alignment group — teacher tokens ``t0:t1`` and student tokens ``s0:s1`` that spell the same bytes
(``stillroom.tokenization.align.align(...).groups``; ``.exact`` marks groups whose bytes coincide). Its likelihood on each side
is the product of its tokens' probabilities, ``log p_c = Σ_{j ∈ c} log p(x_j | x_<j)``. Each chunk is treated as
a Bernoulli {p_c, 1 − p_c} and the two Bernoullis are compared by a binarised divergence, after a binarisation
temperature τ (``log p̂ = log p / τ − ε``, i.e. ``p̂ = p^{1/τ}·e^{−ε}``; ε = 1e-6 keeps ``1 − p̂ > 0`` for a chunk
of probability 1):

- ``"bce"``         ``−[p̂ log q̂ + (1 − p̂) log(1 − q̂)]``  (the paper's default; same gradient as ``"kl"``)
- ``"kl"``          ``p̂ log(p̂/q̂) + (1 − p̂) log((1 − p̂)/(1 − q̂))``  (0 when the chunks match)
- ``"reverse_kl"``  ``q̂ log(q̂/p̂) + (1 − q̂) log((1 − q̂)/(1 − p̂))``

with p the teacher's and q the student's chunk likelihood (``log(1 − x)`` from ``log x`` stably, via expm1).

Inputs are per *token*: ``logprobs[j] = log p(token j | tokens < j)``, the log-probability of a side's own token.
A model's row i predicts token i + 1, so a cache's ``gold_ce[i] = −log p(x_{i+1} | x_≤i)`` becomes
``token_logprobs(-gold_ce)`` (shifted right by one; token 0 has no prediction and is ``nan``). A chunk that holds
a token without a finite log-probability (token 0, masked tokens) or that is empty on either side is not scored.
The student side needs only the gathered log-probs of its own tokens (one value per token, e.g. from chunked
logits), never a [tokens × V] tensor.

Variants: ``chunk_mask`` keeps a subset of the groups (``alignment.exact``, or the paper's unbiased chunks: those
ending where both tokenizers must end a token, e.g. before a word boundary — outcome-chunk debiasing);
``chunk_sizes=(1, 2, 4)`` also matches runs of 2 and 4 consecutive scored chunks of a sequence (their
likelihoods multiply; a last shorter run is kept) and averages the sizes' losses. Weighting: ``"tokens"``
weighs each (merged) chunk by its number of student tokens, ``"chunks"`` by 1; ``reduction="mean"`` divides the
weighted sum by the total weight (or by ``num_items``), ``"sum"`` returns the weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from stillroom.losses.sparse import log1mexp

ALM_DIVERGENCES = ("bce", "kl", "reverse_kl")


def token_logprobs(next_token_logprobs: torch.Tensor) -> torch.Tensor:
    """Row-indexed log-probs (row i = log p of token i + 1, e.g. ``-gold_ce``) → token-indexed ones ``[..., T]``:
    entry j is the log-probability of token j; entry 0 is ``nan`` (no prediction) and the last row is dropped."""
    x = next_token_logprobs
    pad = torch.full_like(x[..., :1], math.nan)
    return torch.cat([pad, x[..., :-1]], -1)


def binary_divergence(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = "bce") -> torch.Tensor:
    """Elementwise divergence between Bernoullis {p, 1 − p} (teacher) and {q, 1 − q} (student) from log p, log q < 0."""
    p, q = log_p.exp(), log_q.exp()
    l1p, l1q = log1mexp(log_p), log1mexp(log_q)
    if divergence == "bce":
        return -(p * log_q + (1 - p) * l1q)
    if divergence == "kl":
        return p * (log_p - log_q) + (1 - p) * (l1p - l1q)
    if divergence == "reverse_kl":
        return q * (log_q - log_p) + (1 - q) * (l1q - l1p)
    raise ValueError(f"divergence={divergence!r}; choose one of {', '.join(ALM_DIVERGENCES)}")


def _as_groups(chunks) -> np.ndarray:
    g = np.asarray(chunks.groups if hasattr(chunks, "groups") else chunks, dtype=np.int64)
    if g.ndim != 2 or g.shape[1] != 4:
        raise ValueError(f"chunks must be alignment groups [G, 4] (src_start, src_end, tgt_start, tgt_end); got "
                         f"shape {g.shape}")
    return g


def _chunk_sums(lp: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk: Σ lp[start:end] ``[G]`` and whether every token there has a finite log-prob."""
    n = ends - starts
    chunk_of = torch.repeat_interleave(torch.arange(starts.shape[0], device=lp.device), n)
    pos = torch.repeat_interleave(starts - torch.cumsum(n, 0) + n, n) + torch.arange(int(n.sum()), device=lp.device)
    vals = lp[pos]
    ok = torch.isfinite(vals)
    sums = torch.zeros(starts.shape[0], dtype=lp.dtype, device=lp.device).index_add_(
        0, chunk_of, torch.where(ok, vals, torch.zeros((), dtype=lp.dtype, device=lp.device)))
    bad = torch.zeros(starts.shape[0], dtype=torch.int64, device=lp.device).index_add_(0, chunk_of, (~ok).long())
    return sums, bad == 0


def _runs(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of ``k`` consecutive entries (the last run may be shorter)."""
    run = torch.arange(x.shape[0], device=x.device) // k
    return torch.zeros((x.shape[0] + k - 1) // k, dtype=x.dtype, device=x.device).index_add_(0, run, x)


def alm_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, chunks, *,
             chunk_mask=None, teacher_is_source: bool = True, temperature: float = 1.0,
             divergence: str = "bce", chunk_sizes: Sequence[int] = (1,), weighting: str = "tokens",
             reduction: str = "mean", num_items: int | float | torch.Tensor | None = None,
             epsilon: float = 1e-6) -> torch.Tensor:
    """ALM between the student's and the teacher's likelihoods of aligned chunks.

    ``student_logprobs [S]`` / ``teacher_logprobs [T]`` (or ``[B, S]`` / ``[B, T]``): token-indexed log-probs of
    each side's own tokens (see ``token_logprobs``; non-finite = not scored); the teacher side is detached.
    ``chunks``: one ``Alignment`` or groups array ``[G, 4]`` per sequence (a list for a batch); by default the
    alignment's source is the teacher (``align(teacher_ids, student_ids, ...)``, as ``stillroom.tokenization.project.project``
    expects); ``teacher_is_source=False`` for the other order. ``chunk_mask``: bool ``[G]`` per sequence
    (e.g. ``alignment.exact``). Returns the scalar loss (see the module docstring for the options).
    """
    if divergence not in ALM_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; choose one of {', '.join(ALM_DIVERGENCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if weighting not in ("tokens", "chunks"):
        raise ValueError(f"weighting={weighting!r}; choose 'tokens' (student tokens per chunk) or 'chunks'")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; choose 'mean' or 'sum'")
    sizes = tuple(int(k) for k in chunk_sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"chunk_sizes={tuple(chunk_sizes)} must be one or more integers >= 1")
    batched = student_logprobs.dim() == 2
    if student_logprobs.dim() != teacher_logprobs.dim() or student_logprobs.dim() not in (1, 2):
        raise ValueError(f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
                         f"{tuple(teacher_logprobs.shape)} must both be [tokens] or both [batch, tokens]")
    s_rows = student_logprobs if batched else student_logprobs.unsqueeze(0)
    t_rows = (teacher_logprobs if batched else teacher_logprobs.unsqueeze(0)).detach()
    chunk_list = list(chunks) if batched else [chunks]
    masks = [None] * len(chunk_list) if chunk_mask is None else (list(chunk_mask) if batched else [chunk_mask])
    if len(chunk_list) != s_rows.shape[0] or len(masks) != s_rows.shape[0] or t_rows.shape[0] != s_rows.shape[0]:
        raise ValueError(f"a batch of {s_rows.shape[0]} student rows needs as many teacher rows "
                         f"({t_rows.shape[0]}), chunk arrays ({len(chunk_list)}) and chunk masks ({len(masks)})")
    dtype = s_rows.dtype if s_rows.dtype in (torch.float32, torch.float64) else torch.float32
    dev = s_rows.device
    totals = {k: [] for k in sizes}  # per size: (log q, log p, weight) tensors per sequence
    for b, (c, m) in enumerate(zip(chunk_list, masks, strict=True)):
        g = torch.as_tensor(_as_groups(c), device=dev)
        t0, t1, s0, s1 = (g[:, 0], g[:, 1], g[:, 2], g[:, 3]) if teacher_is_source else (g[:, 2], g[:, 3], g[:, 0], g[:, 1])
        if g.shape[0] and (int(s1.max()) > s_rows.shape[1] or int(t1.max()) > t_rows.shape[1]):
            raise ValueError(f"sequence {b}: chunks reach student token {int(s1.max())} / teacher token "
                             f"{int(t1.max())} but there are {s_rows.shape[1]} / {t_rows.shape[1]} log-probs; check "
                             f"teacher_is_source and that the groups belong to these sequences")
        keep = (s1 > s0) & (t1 > t0)
        if m is not None:
            m = torch.as_tensor(np.asarray(m), device=dev).bool()
            if m.shape != keep.shape:
                raise ValueError(f"sequence {b}: chunk_mask has shape {tuple(m.shape)}, the groups {tuple(keep.shape)}")
            keep = keep & m
        lq, ok_s = _chunk_sums(s_rows[b].to(dtype), s0[keep], s1[keep])
        lp, ok_t = _chunk_sums(t_rows[b].to(dtype), t0[keep], t1[keep])
        ok = ok_s & ok_t
        lq, lp = lq[ok], lp[ok]
        w = (s1[keep] - s0[keep])[ok].to(dtype) if weighting == "tokens" else torch.ones_like(lq)
        for k in sizes:  # runs of k consecutive scored chunks: likelihoods multiply, weights add
            totals[k].append((_runs(lq, k), _runs(lp, k), _runs(w, k)))
    loss = torch.zeros((), dtype=dtype, device=dev)
    for k in sizes:
        lq = torch.cat([t[0] for t in totals[k]])
        lp = torch.cat([t[1] for t in totals[k]])
        w = torch.cat([t[2] for t in totals[k]])
        lq = lq.clamp_max(0.0) / temperature - epsilon
        lp = lp.clamp_max(0.0) / temperature - epsilon
        total = (binary_divergence(lp, lq, divergence) * w).sum()
        if num_items is not None:
            total = total / num_items
        elif reduction == "mean":
            total = total / w.sum().clamp_min(1e-30)
        loss = loss + total / len(sizes)
    return loss
