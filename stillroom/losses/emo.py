"""EMO: earth mover distance optimisation (Ren et al., arXiv 2310.04691), dense and chunked fused-linear forms.

Transport cost between tokens i, j: ``c(i, j) = 1 − cos(e_i, e_j)`` over a frozen cost embedding E ``[V, d]``
(the LM head). With unit rows ``ê_i = e_i / ‖e_i‖``:

- one-hot label y: ``EMO = Σ_i q_i c(i, y) = 1 − ⟨Σ_i q_i ê_i, ê_y⟩`` — an ``(N×V)·(V×d)`` product;
- soft target p (independent coupling, an upper bound on the optimal transport):
  ``Σ_ij q_i p_j c(i, j) = 1 − ⟨Σ_i q_i ê_i, Σ_j p_j ê_j⟩``.

Neither builds a V×V cost matrix or an N×V one-hot. Note the soft form is linear in q, so it is minimised by
a one-hot q on the token whose embedding is closest to ``Σ p_j ê_j``, *not* by q = p: always keep a KD term
beside it (``mode=1`` or ``2``). For a ``SparseTarget`` the soft form uses the support renormalised to sum to 1
(the tail's spread over tokens is unknown; a row without support mass gets EMO = 0); its KD term is the sparse
soft CE of ``stillroom.losses.sparse``.

Combination with MLE, per position, as in the reference code (``sg`` = stop-gradient, C = ``RATIO_CAP`` = 3):
``mode=1``: ``0.5·(mle + min(sg(mle/emo), C)·emo)`` (weight on MLE);  ``mode=2``: ``emo + min(sg(emo/mle), C)·mle``;
``mode=None``: EMO alone. ``mle`` is the CE of the label (one-hot form) or the soft CE of the target (soft form).

The ratio bound. The reference code caps mode 1's ratio at 3 (EMO → 0 while MLE does not). Mode 2's ratio is
capped at the same C. For a label or a dense target it never binds: ``c ≤ 2`` and ``c(j, j) = 0`` give
``emo ≤ 2·(1 − Σ_j q_j p_j)`` while ``mle ≥ −log Σ_j q_j p_j ≥ 1 − Σ_j q_j p_j`` (Jensen), so ``emo/mle ≤ 2``.
For a sparse target EMO sees only the renormalised support while MLE also scores the tail bucket, so the ratio
grows without bound as the tail takes the mass (tail 0.999 and the student matching the buckets: MLE ≈ 0.008,
EMO ≈ 1, ratio ≈ 130; the uncapped ratio reached ~1e10 on a padding-only row). A row whose mass is all in the
tail has no support to transport to: its EMO is 0 (the double sum over an empty p̃), and its MLE is 0.
Both ratios are computed as ``x / (y + 1e-10)`` before the cap, so 0/0 gives 0.

Cost embedding: ``"fixed"`` = a frozen copy of the initial head (``EMOLoss(head, cost="fixed")`` keeps one),
``"adaptive"`` = the current head, detached, each step. Either way no gradient flows into the cost.
Logits are at temperature 1; ``labels[j]`` is the token that ``logits[j]`` predicts (shift before calling).
"""

from __future__ import annotations

import torch
from torch import nn

from stillroom.losses.distill import check_finite, reduce_rows
from stillroom.losses.fused_linear import auto_chunk_size, scaled_grad, sparse_grad
from stillroom.losses.sparse import buckets, check_sparse, target_rows
from stillroom.targets import SparseTarget

MODES = (None, 1, 2)
RATIO_CAP = 3.0  # bound on the stop-gradient ratios of modes 1 and 2 (see the module docstring)
_EPS = 1e-10


def _inv_norms(cost: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 / ‖e_i‖`` per row, ``[V]`` (rows of norm 0 get cost 1 to everything)."""
    norms = torch.linalg.vector_norm(cost.to(dtype), dim=-1)
    return torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros((), dtype=dtype, device=norms.device))


def _target_embedding(cost: torch.Tensor, inv: torch.Tensor, ids: torch.Tensor,
                      probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = Σ_j p̃_j ê_{ids_j}`` ``[n, d]`` with p̃ = p renormalised over its support, and ``Σ_j p̃_j`` ``[n]``:
    1, or 0 for a row without support mass (then u = 0 and the row's EMO is 0: nothing is transported)."""
    mass = probs.sum(-1, keepdim=True)
    w = probs / mass.clamp_min(1e-30) * inv[ids]
    u = torch.einsum("nk,nkd->nd", w, cost[ids].to(w.dtype))
    return u, (mass.squeeze(-1) > 0).to(w.dtype)


def _combine(mle: torch.Tensor, emo: torch.Tensor, mode: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss and the (stop-gradient) weights on mle and emo."""
    if mode is None:
        a, b = torch.zeros_like(mle), torch.ones_like(emo)
    elif mode == 1:
        a, b = torch.full_like(mle, 0.5), 0.5 * torch.clamp((mle / (emo + _EPS)).detach(), max=RATIO_CAP)
    else:
        a, b = torch.clamp((emo / (mle + _EPS)).detach(), max=RATIO_CAP), torch.ones_like(emo)
    return a * mle + b * emo, a, b


def _check(mode, reduction) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose 1 (weight on MLE), 2 (weight on EMO) or None (EMO alone)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; choose 'mean' or 'sum'")


def emo_loss(logits: torch.Tensor, cost_embedding: torch.Tensor, *, labels: torch.Tensor | None = None,
             target: SparseTarget | torch.Tensor | None = None, mode: int | None = 1, ignore_index: int = -100,
             mask: torch.Tensor | None = None, reduction: str = "mean",
             num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """EMO (combined with MLE per ``mode``) on materialised ``logits [..., V]``.

    One-hot form: ``labels [...]`` (``ignore_index`` skipped). Soft form: ``target`` = ``SparseTarget`` or
    dense teacher logits ``[..., V']`` (V' >= V, extra columns dropped). ``cost_embedding [V_c, d]`` with
    V_c >= V (rows beyond V unused); it is detached here.
    """
    _check(mode, reduction)
    if (labels is None) == (target is None):
        raise ValueError("give exactly one of labels= (one-hot EMO) or target= (soft EMO)")
    leading = tuple(logits.shape[:-1])
    V = logits.shape[-1]
    if cost_embedding.dim() != 2 or cost_embedding.shape[0] < V:
        raise ValueError(f"cost_embedding {tuple(cost_embedding.shape)} must be [V, d] with V >= {V} (the logits' "
                         f"vocabulary); pass the LM head weight")
    z = logits.reshape(-1, V)
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    check_finite(z, "logits")
    cost = cost_embedding[:V].detach().to(z.dtype)
    inv = _inv_norms(cost, z.dtype)
    counted = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if mask is not None:
        if tuple(mask.shape) != leading:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {leading}")
        counted = counted & mask.reshape(-1).bool()
    logq = torch.log_softmax(z, -1)
    mass = 1.0  # Σ_j p_j of the (renormalised) target: 0 only for a sparse row without support mass
    if labels is not None:
        if tuple(labels.shape) != leading:
            raise ValueError(f"labels {tuple(labels.shape)} must have the logits' leading shape {leading}")
        y = labels.reshape(-1).long()
        counted = counted & (y != ignore_index)
        y = torch.where(counted, y, 0)
        if ((y < 0) | (y >= V)).any():
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
        u = cost[y] * inv[y].unsqueeze(-1)
        mle = -logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    elif isinstance(target, SparseTarget):
        check_sparse(target, z.shape[0], V, leading)
        ids, logprobs, tail, valid = target_rows(target)
        counted = counted & valid
        u, mass = _target_embedding(cost, inv, ids, logprobs.to(z.dtype).exp())
        lse = torch.logsumexp(z, -1, keepdim=True)
        bq, bp, live, _ = buckets(z, lse, ids, logprobs, tail, reverse=False)
        mle = torch.where(live, -bp.exp() * bq, torch.zeros((), dtype=z.dtype)).sum(-1)
    else:
        if tuple(target.shape[:-1]) != leading or target.shape[-1] < V:
            raise ValueError(f"teacher logits {tuple(target.shape)} must be [..., V'] with V' >= {V} and the "
                             f"logits' leading shape {leading}")
        t = target.reshape(-1, target.shape[-1])[:, :V].to(z.dtype)
        check_finite(t, "teacher logits")
        p = torch.softmax(t, -1)
        u = (p * inv) @ cost
        mle = -(p * logq).sum(-1)
    emo = mass - ((logq.exp() * inv) @ cost * u).sum(-1)
    per_row, _, _ = _combine(mle, emo, mode)
    per_row = torch.where(counted, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    return reduce_rows(per_row, counted, reduction, num_items)


class EMOLoss(nn.Module):
    """EMO with a ``"fixed"`` cost embedding (frozen copy of ``head`` now) or an ``"adaptive"`` one (the head
    passed at each call, detached). ``forward(logits, labels=None, target=None, head=None)``."""

    def __init__(self, head: torch.Tensor | None = None, *, cost: str = "fixed", mode: int | None = 1,
                 ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if cost not in ("fixed", "adaptive"):
            raise ValueError(f"cost={cost!r}; choose 'fixed' (frozen initial head) or 'adaptive' (current head)")
        if cost == "fixed":
            if head is None:
                raise ValueError("cost='fixed' needs the initial LM head weight [V, d] to freeze")
            self.register_buffer("cost_embedding", head.detach().clone())
        self.cost, self.mode, self.ignore_index, self.reduction = cost, mode, ignore_index, reduction

    def forward(self, logits: torch.Tensor, labels: torch.Tensor | None = None,
                target: SparseTarget | torch.Tensor | None = None, head: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cost == "adaptive":
            if head is None:
                raise ValueError("cost='adaptive' needs head= (the current LM head weight) at each call")
            cost = head.detach()
        else:
            cost = self.cost_embedding
        return emo_loss(logits, cost, labels=labels, target=target, mode=self.mode, ignore_index=self.ignore_index,
                        mask=mask, reduction=self.reduction)


class _FusedLinearEMO(torch.autograd.Function):
    @staticmethod
    @torch.no_grad()
    def forward(ctx, hidden, weight, cost, labels, ids, logprobs, tail, counted, mode, chunk_size, den):
        N, V = hidden.shape[0], cost.shape[0]
        W = weight[:V]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        inv = _inv_norms(cost, acc)
        soft = ids is not None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            cm = counted[a:b]
            if not bool(cm.any()):
                continue
            h = hidden[a:b]
            z = (h @ W.T).to(acc)
            check_finite(z, f"student logits (rows {a}..{b - 1})")
            if soft:  # u = Σ p_j ê_j; mle = sparse soft CE, gradient from the bucket kernel
                u, mass = _target_embedding(cost, inv, ids[a:b], logprobs[a:b].to(acc).exp())
                mle, g_mle = sparse_grad(z.clone(), ids[a:b], logprobs[a:b], tail[a:b], kind="soft_ce")
                lse = torch.logsumexp(z, -1, keepdim=True)
                q = z.sub_(lse).exp_()
            else:  # u = ê_y; mle = CE; ∂mle/∂z = q − onehot(y)
                y = labels[a:b].unsqueeze(-1)
                u = cost[y.squeeze(-1)].to(acc) * inv[y]
                lse = torch.logsumexp(z, -1, keepdim=True)
                mle = (lse - z.gather(-1, y)).squeeze(-1)
                q = z.sub_(lse).exp_()
                g_mle = q.clone().scatter_add_(-1, y, torch.full_like(y, -1, dtype=acc))
            # EMO = 1 − Σ_i q_i c_i with c_i = ê_i · u;  ∂EMO/∂z = q ⊙ (Σ_j q_j c_j − c)
            c = (u @ cost.T.to(acc)).mul_(inv)
            qc = (q * c).sum(-1)
            emo = qc.neg().add_(mass if soft else 1.0)
            loss, wa, wb = _combine(mle, emo, mode)
            total += loss[cm].sum().double() / den
            wa = torch.where(cm, wa, 0.0).unsqueeze(-1) / den
            wb = torch.where(cm, wb, 0.0).unsqueeze(-1) / den
            gz = c.neg_().add_(qc.unsqueeze(-1)).mul_(q).mul_(wb)
            del c, q
            gz.add_(g_mle.mul_(wa))
            del g_mle
            if need_h:
                grad_h[a:b] = gz.to(W.dtype) @ W
            if need_w:
                grad_w[:V].addmm_(gz.T, h.to(acc))
            del gz
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total.to(acc)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return scaled_grad(grad_h, grad_out, ctx.dtypes[0]), scaled_grad(grad_w, grad_out, ctx.dtypes[1]), None, None, None, None, None, None, None, None, None


def fused_linear_emo_loss(hidden: torch.Tensor, weight: torch.Tensor, cost_embedding: torch.Tensor | None = None,
                          *, labels: torch.Tensor | None = None, target: SparseTarget | None = None,
                          mode: int | None = 1, ignore_index: int = -100, mask: torch.Tensor | None = None,
                          chunk_size: int | None = None, reduction: str = "mean",
                          num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """``emo_loss`` on ``hidden @ weight.T`` computed ``chunk_size`` rows at a time, never N×V.

    ``cost_embedding [V, d]``: a frozen copy of the initial head ("fixed"); ``None`` uses ``weight`` detached
    ("adaptive"). Its vocabulary V sets the loss's vocabulary (rows of ``weight`` beyond it get no gradient).
    One-hot form with ``labels``; soft form with ``target`` (``SparseTarget``, labels then unused).
    """

    _check(mode, reduction)
    if (labels is None) == (target is None):
        raise ValueError("give exactly one of labels= (one-hot EMO) or target= (soft EMO)")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not fit: weight must "
                         f"be the LM head [V, H] with H = hidden.shape[-1]")
    cost = (weight if cost_embedding is None else cost_embedding).detach()
    if cost.dim() != 2 or cost.shape[0] > weight.shape[0]:
        raise ValueError(f"cost_embedding {tuple(cost.shape)} must be [V, d] with V <= the head's {weight.shape[0]} rows")
    leading = tuple(hidden.shape[:-1])
    h = hidden.reshape(-1, hidden.shape[-1])
    N, V = h.shape[0], cost.shape[0]
    counted = torch.ones(N, dtype=torch.bool, device=h.device)
    if mask is not None:
        if tuple(mask.shape) != leading:
            raise ValueError(f"mask {tuple(mask.shape)} must have the hidden states' leading shape {leading}")
        counted = counted & mask.reshape(-1).bool()
    y = ids = logprobs = tail = None
    if labels is not None:
        if tuple(labels.shape) != leading:
            raise ValueError(f"labels {tuple(labels.shape)} must have the hidden states' leading shape {leading}")
        y = labels.reshape(-1).long()
        counted = counted & (y != ignore_index)
        y = torch.where(counted, y, 0)
        if ((y < 0) | (y >= V)).any():
            raise ValueError(f"labels must lie in [0, {V}) or equal ignore_index={ignore_index}")
    else:
        check_sparse(target, N, V, leading)
        ids, logprobs, tail, valid = target_rows(target)
        counted = counted & valid
    if num_items is not None:
        den = float(num_items)
    else:
        den = float(max(int(counted.sum()), 1)) if reduction == "mean" else 1.0
    size = int(chunk_size or auto_chunk_size(V))
    if size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    return _FusedLinearEMO.apply(h, weight, cost, y, ids, logprobs, tail, counted, mode, size, den)
