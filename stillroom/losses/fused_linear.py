"""Chunked fused-linear distillation loss: ``λ·CE(labels) + (1−λ)·D(p, q)`` from hidden states, never N×V.

The student logits ``z = hidden @ weight.T`` (and, for a same-vocabulary online teacher,
``teacher_hidden @ teacher_weight.T`` under no_grad) are built ``chunk_size`` rows at a time. For each chunk
the loss and its gradient w.r.t. the chunk's logits are computed in closed form
(``stillroom.losses.divergences.row_divergence_grad``; CE: ``softmax(z) − onehot(y)``), and turned at once
into ``grad_hidden[chunk] = grad_z @ W`` and ``grad_weight += grad_z.T @ hidden[chunk]``. The forward pass
therefore does all the work; backward only scales the stored gradients by the incoming grad. Peak memory is
the inputs, one ``grad_weight`` and a few ``chunk_size × V`` buffers, whatever N is.

Normalisation (``reduction``): ``"mean"`` averages CE over positions whose label is not ``ignore_index`` and
D over counted positions (``mask`` ∧ ``target.valid`` ∧ label not ignored when labels are given);
``"sum"`` sums both. For exact gradient accumulation use ``reduction="sum"`` and divide by the global
number of counted positions over all micro-batches — or pass that number as ``num_items``, which gives
``(λ·ΣCE + (1−λ)·ΣD) / num_items``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stillroom.losses.distill import check_finite
from stillroom.losses.divergences import check_kind, row_divergence_grad
from stillroom.losses.sparse import check_sparse, support_buckets, target_rows
from stillroom.targets import SparseTarget

CHUNK_ELEMENTS = 1 << 24  # auto chunk: at most about 16M logits (64 MB in fp32) per chunk_size × V buffer
CHUNK_ELEMENTS_FAST = 1 << 21  # ... and 2M (8 MB) when that still leaves >= 128 rows per matmul


def auto_chunk_size(vocab: int) -> int:
    """Rows per chunk. The element-wise work (softmaxes, divergence, gradient) is fastest when a chunk's
    buffers stay in cache (~8 MB: 256 rows at V = 8,000 ran the loss 20% faster than 2,048 rows on 2 CPU
    cores), but a chunk's two matmuls re-read the LM head, so a chunk keeps at least 128 rows when the
    16M-logit budget allows it (large vocabularies keep their old, memory-bounded size)."""
    v = max(vocab, 1)
    return max(8, CHUNK_ELEMENTS_FAST // v, min(128, CHUNK_ELEMENTS // v))


@dataclass
class _Config:
    kind: str
    temperature: float
    beta: float
    alpha: float
    ce_weight: float
    chunk_size: int
    vocab: int
    t2_scale: bool
    reduction: str
    num_items: float | None
    sparse: bool
    dense_teacher: bool
    parts: dict | None = None


def _dense_grad(logq: torch.Tensor, logp: torch.Tensor, cfg: _Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row D and ∂D/∂s for dense log-probs (both consumed); s = z / T."""
    loss, g, q = row_divergence_grad(logq, logp, cfg.kind, cfg.beta, cfg.alpha)
    return loss, g.sub_(q.mul_(g.sum(-1, keepdim=True)))  # ∂ℓ/∂s = g − q·Σg


def sparse_grad(s: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, *, kind: str,
                beta: float = 0.5, alpha: float = 0.1, lse: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row D and ∂D/∂s against k + 1 buckets (``stillroom.losses.sparse``); ``s`` is consumed (``lse``: its
    logsumexp when already known).

    With ``g = ∂ℓ/∂log q_b`` per bucket: ``∂ℓ/∂s_i = g_b(i)·q_i/q_b(i) − q_i·Σg``, i.e. ``g_j − q_j·Σg`` on a
    support id and ``q_i·(g_tail/q_tail − Σg)`` elsewhere — one exp over V, the support fixed up by a scatter.
    Rows with a tiny tail (:func:`support_buckets`' exact rows) take the complement softmax from their masked copy.
    """
    if lse is None:
        lse = torch.logsumexp(s, -1, keepdim=True)
    reverse = kind == "reverse_kl" or (kind == "jsd" and beta == 1.0)
    bq, bp, live, log_qt, (rows, s_tail) = support_buckets(s, lse, ids, logprobs, tail, reverse)
    loss, g, _ = row_divergence_grad(bq, bp, kind, beta, alpha, live)
    g_support, g_tail = g[:, :-1], g[:, -1:]
    c = torch.where(torch.isfinite(log_qt), g_tail * torch.exp(-log_qt), torch.zeros((), dtype=s.dtype))
    if rows is not None:
        c[rows] = 0.0  # their complement term comes from s_tail below
    q = s.sub_(lse).exp_()
    fix = g_support - torch.where(live[:, :-1], q.gather(-1, ids) * c, torch.zeros((), dtype=s.dtype))
    grad = q.mul_(c - g.sum(-1, keepdim=True)).scatter_add_(-1, ids, fix)
    if rows is not None:
        lse_tail = (log_qt[rows] + lse[rows]).clamp_min(torch.finfo(s.dtype).min)
        grad[rows] += s_tail.sub_(lse_tail).exp_().mul_(g_tail[rows])
    return loss, grad


def scaled_grad(grad: torch.Tensor | None, grad_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``grad · grad_out`` without a copy when grad_out is 1 (a V×H copy would double the peak)."""
    if grad is None:
        return None
    if not bool(grad_out == 1):
        grad = grad * grad_out
    return grad.to(dtype)


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    @torch.no_grad()
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, ids, logprobs, tail, labels, dmask, cmask,
                cfg: _Config):
        N, V, n = hidden.shape[0], cfg.vocab, cfg.chunk_size
        W = weight[:V]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        lam = cfg.ce_weight
        use_d, use_ce = lam < 1.0, lam > 0.0
        n_d, n_ce = int(dmask.sum()), int(cmask.sum())
        if cfg.num_items is not None:
            den_d = den_ce = float(cfg.num_items)
        elif cfg.reduction == "mean":
            den_d, den_ce = max(n_d, 1), max(n_ce, 1)
        else:
            den_d = den_ce = 1.0
        w_d = (1.0 - lam) * (cfg.temperature**2 if cfg.t2_scale else 1.0) / den_d
        w_ce = lam / den_ce
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)  # unweighted parts, for ``parts``
        d_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
        # CE's value is cheap next to the matmuls: with ``parts`` it is computed even where λ = 0 (no gradient)
        want_ce = use_ce or (cfg.parts is not None and labels is not None)
        for a in range(0, N, n):
            b = min(a + n, N)
            dm, cm = dmask[a:b], cmask[a:b]
            do_d, do_ce = use_d and bool(dm.any()), want_ce and bool(cm.any())
            if not (do_d or do_ce):
                continue  # fully masked chunk: no loss, no gradient
            h = hidden[a:b]
            z = (h @ W.T).to(acc)
            check_finite(z, f"student logits (rows {a}..{b - 1})")
            gz = lse1 = None
            if do_ce:  # CE at T = 1 on the raw logits: ∂/∂z = softmax(z) − onehot(y)
                y = torch.where(cm, labels[a:b], 0).unsqueeze(-1)
                lse1 = torch.logsumexp(z, -1, keepdim=True)
                ce = (lse1 - z.gather(-1, y)).squeeze(-1)
                ce_sum += ce[cm].sum().double()
                if use_ce:
                    total += ce[cm].sum().double() * w_ce
                    wrow = (cm.to(z.dtype) * w_ce).unsqueeze(-1)
                    gz = z.sub(lse1).exp_().mul_(wrow)
                    gz.scatter_add_(-1, y, -wrow)
            if do_d:
                T = cfg.temperature
                if T != 1.0:
                    z.div_(T)
                if cfg.dense_teacher:  # (z is dropped as soon as log q exists: peak = 4 chunk buffers)
                    zt = (teacher_hidden[a:b] @ teacher_weight[:V].T).to(acc)
                    check_finite(zt, f"teacher logits (rows {a}..{b - 1})")
                    logp = torch.log_softmax(zt.div_(T) if T != 1.0 else zt, -1)
                    del zt
                    logq = torch.log_softmax(z, -1)
                    del z
                    loss, gs = _dense_grad(logq, logp, cfg)
                    del logq, logp
                else:
                    loss, gs = sparse_grad(z, ids[a:b], logprobs[a:b], tail[a:b], kind=cfg.kind, beta=cfg.beta,
                                          alpha=cfg.alpha, lse=lse1 if T == 1.0 else None)
                    del z
                if T != 1.0:
                    gs.div_(T)  # ∂/∂z = ∂/∂s / T
                total += loss[dm].sum().double() * w_d
                d_sum += loss[dm].sum().double()
                if bool(dm.all()):
                    gs.mul_(w_d)
                else:  # where, not multiply: a masked row's values must not leak (0 · inf = nan)
                    gs = torch.where(dm.unsqueeze(-1), gs.mul_(w_d), torch.zeros((), dtype=gs.dtype))
                gz = gs if gz is None else gz.add_(gs)
                del gs
            if gz is None:  # only CE's value was wanted here (λ = 0, for ``parts``)
                continue
            if need_h:
                grad_h[a:b] = gz.to(W.dtype) @ W
            if need_w:
                grad_w[:V].addmm_(gz.T, h.to(acc))
            del gz
        if cfg.parts is not None:  # each term normalised as in the loss, before λ: loss = λ·ce + (1−λ)·d
            nan = torch.full((), float("nan"), dtype=torch.float64, device=hidden.device)
            cfg.parts["ce"] = ce_sum / den_ce if want_ce else nan
            cfg.parts["d"] = d_sum * (cfg.temperature**2 if cfg.t2_scale else 1.0) / den_d if use_d else nan
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (scaled_grad(grad_h, grad_out, ctx.dtypes[0]), scaled_grad(grad_w, grad_out, ctx.dtypes[1]),
                None, None, None, None, None, None, None, None, None)


def fused_linear_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, *, target: SparseTarget | None = None,
                              teacher_hidden: torch.Tensor | None = None,
                              teacher_weight: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                              ce_weight: float = 0.0, kind: str = "forward_kl", temperature: float = 1.0,
                              beta: float = 0.5, alpha: float = 0.1, chunk_size: int | None = None,
                              ignore_index: int = -100, reduction: str = "mean",
                              mask: torch.Tensor | None = None, t2_scale: bool = False,
                              vocab_size: int | None = None,
                              num_items: int | float | torch.Tensor | None = None,
                              parts: dict | None = None) -> torch.Tensor:
    """``λ·CE(labels) + (1−λ)·D(teacher, student)`` from hidden states, chunked over rows (λ = ``ce_weight``).

    ``hidden [..., H]`` student hidden states (the LM head's input), ``weight [V, H]`` its LM head (no bias).
    Teacher: ``target`` (``SparseTarget`` in the student vocabulary, leading shape ``[...]``) or
    ``teacher_hidden [..., H_t]`` + ``teacher_weight [V_t, H_t]`` with ``V_t >= V`` (extra teacher rows, e.g.
    Qwen's padding, are dropped and the teacher renormalised over V). ``labels [...]`` next-token ids for the CE
    term (``ignore_index`` skipped; also masks D). ``mask [...]`` extra bool mask for D. ``vocab_size``: the
    real vocabulary when the student head is padded (rows ``>= vocab_size`` get zero gradient).
    ``chunk_size`` rows per chunk (default: about 16M logits per chunk). Values and gradients equal
    ``ce_weight·cross_entropy + (1−ce_weight)·distill_loss`` on materialised logits. Rows where neither term
    applies (prompt, padding) are dropped before the head: on completion data their logits, and the dense
    teacher's, are never computed.

    ``parts``: a dict that receives the two terms' values (0-dim float64 tensors, no gradient) before weighting,
    normalised like the loss —
    ``parts["ce"]`` (also when λ = 0, if labels are given; no gradient is spent on it) and ``parts["d"]``
    (``nan`` for a term not computed) — so a trainer can log CE and the divergence from the same pass.
    """
    check_kind(kind, beta, alpha)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; the fused loss supports 'mean' and 'sum'")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight={ce_weight} must lie in [0, 1]")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit: weight must "
                         f"be the LM head [V, H] with H = hidden.shape[-1]")
    leading = tuple(hidden.shape[:-1])
    h = hidden.reshape(-1, hidden.shape[-1])
    N = h.shape[0]
    V = weight.shape[0] if vocab_size is None else vocab_size
    if V > weight.shape[0] or V < 1:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {weight.shape[0]}] (the head's rows)")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels (next-token ids, ignore_index where not counted)")
    if ce_weight < 1 and target is None and teacher_hidden is None:
        raise ValueError("a distillation term needs target= (SparseTarget) or teacher_hidden= + teacher_weight=")
    if target is not None and teacher_hidden is not None:
        raise ValueError("give either target= or teacher_hidden=/teacher_weight=, not both")
    dmask = torch.ones(N, dtype=torch.bool, device=h.device)
    cmask = torch.zeros(N, dtype=torch.bool, device=h.device)
    y = torch.zeros(N, dtype=torch.long, device=h.device)
    if labels is not None:
        if tuple(labels.shape) != leading:
            raise ValueError(f"labels {tuple(labels.shape)} must have the hidden states' leading shape {leading}")
        y = labels.reshape(-1).long()
        cmask = y != ignore_index
        if ((y[cmask] < 0) | (y[cmask] >= V)).any():
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
        dmask = dmask & cmask
    if mask is not None:
        if tuple(mask.shape) != leading:
            raise ValueError(f"mask {tuple(mask.shape)} must have the hidden states' leading shape {leading}")
        dmask = dmask & mask.reshape(-1).bool()
    ids = logprobs = tail = th = tw = None
    sparse = target is not None
    if sparse:
        check_sparse(target, N, V, leading)
        ids, logprobs, tail, valid = target_rows(target)
        dmask = dmask & valid
    elif teacher_hidden is not None:
        if teacher_weight is None or teacher_weight.dim() != 2:
            raise ValueError("teacher_hidden needs teacher_weight, the teacher's LM head [V_t, H_t]")
        if tuple(teacher_hidden.shape[:-1]) != leading or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_weight "
                             f"{tuple(teacher_weight.shape)} do not fit the student's positions {leading}")
        if teacher_weight.shape[0] < V:
            raise ValueError(f"teacher head has {teacher_weight.shape[0]} rows, fewer than the student's {V}; "
                             f"this loss needs a same-vocabulary teacher (use a SparseTarget otherwise)")
        th, tw = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach(), teacher_weight.detach()
    keep = dmask | cmask  # rows with no term (prompt, padding) cost nothing: not even their logits
    if not bool(keep.all()):
        rows = keep.nonzero().squeeze(1)
        h, y, dmask, cmask = h.index_select(0, rows), y[rows], dmask[rows], cmask[rows]
        if sparse:
            ids, logprobs, tail = ids[rows], logprobs[rows], tail[rows]
        if th is not None:
            th = th.index_select(0, rows)
    cfg = _Config(kind=kind, temperature=float(temperature), beta=float(beta), alpha=float(alpha),
                  ce_weight=float(ce_weight), chunk_size=int(chunk_size or auto_chunk_size(V)), vocab=V,
                  t2_scale=bool(t2_scale), reduction=reduction, num_items=None if num_items is None else float(num_items),
                  sparse=sparse, dense_teacher=th is not None, parts=parts)
    if cfg.chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _FusedLinearDistill.apply(h, weight, th, tw, ids, logprobs, tail, y, dmask, cmask, cfg)
