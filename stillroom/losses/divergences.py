"""Divergences between a student q and a teacher p, row by row, over "buckets".

A bucket is one entry of a distribution: a vocabulary entry for dense targets (B = V), or one of the k
support ids plus one tail bucket for sparse targets (B = k + 1, see ``stillroom.losses.sparse``). Every
function here takes log-probabilities ``logq, logp`` of shape ``[n, B]`` and an optional ``live`` mask
(``False`` = this bucket does not exist for that row, e.g. a padding entry of a top-k target) and returns one
value per row. Terms with ``p = 0`` follow ``0 · log 0 = 0``.

Two forms of each divergence:

- ``row_divergence`` — plain tensor formulas; autograd differentiates them (used by ``distill_loss``).
- ``row_divergence_grad`` — the same values plus ``g = ∂ℓ/∂log q`` in closed form (no autograd, few
  temporaries), used by the chunked fused-linear loss. With ``log q = s − logsumexp(s)`` the gradient w.r.t.
  the (temperature-scaled) logits is ``∂ℓ/∂s = g − q · Σ_b g_b`` for dense rows.

Conventions (β, α as in GKD, arXiv 2306.13649, and DistiLLM, arXiv 2402.03898):

- ``forward_kl``      KL(p‖q) = Σ p (log p − log q)
- ``reverse_kl``      KL(q‖p) = Σ q (log q − log p)
- ``jsd``             β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; β=0 is forward KL, β=1 reverse KL
                      (the end points are defined as those KLs, as in TRL's ``generalized_jsd_loss``)
- ``skew_forward_kl`` KL(p‖α·p + (1−α)·q)
- ``skew_reverse_kl`` KL(q‖α·q + (1−α)·p)   (α always weighs the KL's first argument; α=0 is the plain KL)
- ``tvd``             ½ Σ |p − q|
- ``soft_ce``         −Σ p log q  (= forward KL + teacher entropy: same gradient, different value)
"""

from __future__ import annotations

import math

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "soft_ce")


def check_kind(kind: str, beta: float, alpha: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a divergence; choose one of {', '.join(KINDS)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must lie in [0, 1] (0 = forward KL, 1 = reverse KL)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (the skew mixture weight)")


def _canonical(kind: str, beta: float) -> str:
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def _mix(log_a: torch.Tensor, w_a: float, log_b: torch.Tensor) -> torch.Tensor:
    """log(w_a·a + (1−w_a)·b), stable in log space."""
    la = log_a + math.log(w_a) if w_a > 0 else torch.full_like(log_a, -math.inf)
    lb = log_b + math.log1p(-w_a) if w_a < 1 else torch.full_like(log_b, -math.inf)
    return torch.logaddexp(la, lb)


def _xlog(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """p·d with 0·anything = 0 (also where d is ±inf/nan because p's log is −inf)."""
    return torch.where(p > 0, p * d, torch.zeros((), dtype=p.dtype, device=p.device))


def row_divergence(logq: torch.Tensor, logp: torch.Tensor, kind: str, beta: float = 0.5, alpha: float = 0.1,
                   live: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row divergence ``[n]`` between buckets ``logq, logp [n, B]`` (differentiable by autograd)."""
    kind = _canonical(kind, beta)
    q, p = logq.exp(), logp.exp()
    if kind == "forward_kl":
        terms = _xlog(p, logp - logq)
    elif kind == "soft_ce":
        terms = _xlog(p, -logq)
    elif kind == "reverse_kl":
        terms = q * (logq - logp)
    elif kind == "jsd":
        logm = _mix(logp, beta, logq)
        terms = beta * _xlog(p, logp - logm) + (1 - beta) * q * (logq - logm)
    elif kind == "skew_forward_kl":
        terms = _xlog(p, logp - _mix(logp, alpha, logq))
    elif kind == "skew_reverse_kl":
        terms = q * (logq - _mix(logq, alpha, logp))
    else:  # tvd
        terms = 0.5 * (p - q).abs()
    if live is not None:
        terms = torch.where(live, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    return terms.sum(-1)


def _psum(p: torch.Tensor, d: torch.Tensor, safe: bool) -> torch.Tensor:
    """Row sums of ``p·d`` computed in place in ``d`` (0·(±inf) = 0 when ``safe``)."""
    d.mul_(p)
    if safe:
        d = torch.where(p > 0, d, torch.zeros((), dtype=d.dtype, device=d.device))
    return d.sum(-1)


@torch.no_grad()
def row_divergence_grad(logq: torch.Tensor, logp: torch.Tensor, kind: str, beta: float = 0.5,
                        alpha: float = 0.1, live: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                             torch.Tensor]:
    """Per-row divergence ``[n]``, ``g = ∂ℓ/∂log q`` ``[n, B]`` and ``q = exp(log q)``, in closed form.

    Memory-lean for the chunked loss: ``logq`` and ``logp`` are CONSUMED (overwritten); at most three extra
    ``[n, B]`` buffers live at once. For a loss ℓ(q) of the bucket probabilities ``∂ℓ/∂log q_b = q_b·∂ℓ/∂q_b``:
    forward KL / soft CE: ``g = −p``;  reverse KL: ``g = q (log q − log p + 1)``;
    JSD: ``g = (1−β) q (log q − log m)``;  skew forward KL: ``g = −(1−α) p q / m``;
    skew reverse KL: ``g = q (log q − log m + 1 − α q / m)``;  TVD: ``g = ½ q sign(q − p)``.
    ``live`` (sparse buckets) marks real buckets; non-live ones must hold ``logq = logp = 0`` (as
    ``stillroom.losses.sparse.buckets`` sets them), which makes every loss term 0, and get ``g = 0`` here.
    Dense rows (``live=None``) have finite ``logp``; sparse ones may hold ``logp = −inf`` (no teacher mass).
    """
    kind = _canonical(kind, beta)
    safe = live is not None
    if kind in ("forward_kl", "soft_ce"):
        p = logp.exp()
        d = logp.sub_(logq) if kind == "forward_kl" else logq.neg()
        loss = _psum(p, d, safe)
        del d
        g = p.neg_()
        q = logq.exp_()
    elif kind == "reverse_kl":
        q = logq.exp()
        d = logq.sub_(logp)  # log q − log p  (logq consumed)
        del logp
        g = d.add_(1.0).mul_(q)
        loss = g.sum(-1).sub_(q.sum(-1))  # Σ q·(log q − log p) = Σ g − Σ q, without a temporary
    elif kind == "jsd":
        p, q = logp.exp(), logq.exp()
        # m = β·p + (1−β)·q in probability space (an axpy and a log; logaddexp costs several passes).
        # Clamped at the smallest normal float so a bin where p and q both underflow gives 0·finite = 0.
        logm = p.mul(beta).add_(q, alpha=1 - beta).clamp_min_(torch.finfo(p.dtype).tiny).log_()
        loss = _psum(p, logp.sub_(logm), safe).mul_(beta)
        del p, logp
        g = logq.sub_(logm).mul_(q).mul_(1 - beta)  # (1−β)·q·(log q − log m): the second term and g
        del logm
        loss.add_(g.sum(-1))
    elif kind == "skew_forward_kl":
        logm = _mix(logp, alpha, logq)
        p = logp.exp()
        loss = _psum(p, logp.sub_(logm), safe)
        del logp
        g = logm.neg_().add_(logq).exp_().mul_(p).mul_(-(1 - alpha))  # −(1−α)·p·q/m
        del p
        q = logq.exp_()
    elif kind == "skew_reverse_kl":
        logm = _mix(logq, alpha, logp)
        del logp
        q = logq.exp()
        d = logq.sub_(logm)  # log q − log m
        del logm
        loss = (d * q).sum(-1)
        r = d.exp().mul_(-alpha)  # −α·q/m
        g = d.add_(r).add_(1.0).mul_(q)
        del r
    else:  # tvd
        q = logq.exp_()
        diff = logp.exp_().neg_().add_(q)  # q − p
        loss = diff.abs().sum(-1).mul_(0.5)
        g = diff.sign_().mul_(q).mul_(0.5)
    if live is not None:
        g = torch.where(live, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return loss, g, q
