"""The student's log-probability of given tokens, from hidden states, without the N × V logits kept.

``log q(y_i) = h_i·w_{y_i} − logsumexp_v(h_i·w_v)``, computed chunk by chunk in the forward; the backward
recomputes each chunk's softmax (``∂/∂z = onehot(y) − softmax(z)``) so memory stays O(chunk × V). ALM and ULD
(:mod:`stillroom.teachers.objectives`) read only these per-token log-probs.
"""

from __future__ import annotations

import torch

from stillroom.losses.fused_linear import auto_chunk_size


class _OwnLogprob(torch.autograd.Function):
    """``log softmax(h W^T)[y]`` per row without keeping [N, V]: forward and backward each rebuild one chunk of
    logits at a time; ∂/∂z = onehot(y) − softmax(z)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        out = torch.full((hidden.shape[0],), float("nan"), dtype=torch.float32, device=hidden.device)
        ok = labels != -100
        for a in range(0, hidden.shape[0], chunk):
            z = (hidden[a:a + chunk] @ weight.T).float()
            y = labels[a:a + chunk].clamp_min(0)
            lp = z.gather(1, y[:, None])[:, 0] - torch.logsumexp(z, -1)
            out[a:a + chunk] = torch.where(ok[a:a + chunk], lp, torch.full_like(lp, float("nan")))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels = ctx.saved_tensors
        g = torch.nan_to_num(grad_out.float()) * (labels != -100)
        gh, gw = torch.zeros_like(hidden, dtype=torch.float32), torch.zeros_like(weight, dtype=torch.float32)
        for a in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[a:a + ctx.chunk]
            z = (h @ weight.T).float()
            gz = -torch.softmax(z, -1) * g[a:a + ctx.chunk, None]
            gz.scatter_add_(1, labels[a:a + ctx.chunk].clamp_min(0)[:, None], g[a:a + ctx.chunk, None])
            gh[a:a + ctx.chunk] = gz @ weight.float()
            gw += gz.T @ h.float()
        return gh.to(hidden.dtype), gw.to(weight.dtype), None, None


def own_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 chunk_size: int | None = None) -> torch.Tensor:
    """``[N]`` log-probability of each row's label under ``softmax(hidden @ weight.T)`` (``nan`` where the label
    is -100), differentiable, chunked: at most ``chunk_size`` × V logits exist at once."""

    return _OwnLogprob.apply(hidden, weight, labels, int(chunk_size or auto_chunk_size(weight.shape[0])))
