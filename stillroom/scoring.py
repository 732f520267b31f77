"""A causal language model scored over sliding windows: the windows that cover a sequence, the forwards that score
them (at most ``batch_size`` windows each, and never more logits than ``LOGITS_BUDGET``), their log-probabilities
and their summed negative log-likelihood. ``stillroom.evaluation`` builds bits per byte and teacher agreement on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence

import torch

#: fp32 logits one forward may hold ([windows, width, V]; 2^28 = 1 GiB): ``batch_size`` windows of a 262k vocabulary
#: would need 17 GiB at width 2048, so fewer go together; a window over the budget still runs, alone
LOGITS_BUDGET = 1 << 28


def window_spans(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over a sequence of ``n`` positions whose position 0 is given (never predicted).

    Returns ``(start, end, first)``: feed positions ``[start, end)`` and score positions ``[first, end)``.
    Every position ``1..n-1`` is scored exactly once.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 (got {context})")
    if not 1 <= stride <= context - 1:
        raise ValueError(f"stride must be in [1, context - 1] = [1, {context - 1}] (got {stride})")
    spans = []
    start, done = 0, 1
    while done < n:
        end = min(start + context, n)
        if end > done:
            spans.append((start, end, done))
            done = end
        start += stride
    return spans


def model_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """float32 logits of a batch of windows (the model's ``.logits``, or its output if it returns a tensor)."""
    # windows are never padded; saying so (when the model takes a mask) silences transformers' padding warning
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)) if takes_mask \
        else model(input_ids=input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def vocab_size(model) -> int:
    """The model's output vocabulary (its head's rows, else ``config.vocab_size``; 1 when neither says)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(getattr(getattr(model, "config", None), "vocab_size", None) or 1)  # unknown: no cap but batch_size


def forward_groups(widths: Sequence[int], batch_size: int, vocab: int, budget: int | None = None) -> list[range]:
    """Consecutive groups of windows for one forward each: at most ``batch_size`` windows, and their padded
    ``[n, max width, vocab]`` logits within ``budget`` (``LOGITS_BUDGET``) unless one window alone exceeds it."""
    budget = LOGITS_BUDGET if budget is None else budget
    groups, start, widest = [], 0, 0
    for i, w in enumerate(widths):
        wider = max(widest, w)
        if i > start and (i - start == batch_size or (i - start + 1) * wider * vocab > budget):
            groups.append(range(start, i))
            start, wider = i, w
        widest = wider
    if widths:
        groups.append(range(start, len(widths)))
    return groups


def score_windows(model, seq: torch.Tensor, *, context: int, stride: int, batch_size: int = 8,
                  device: str | torch.device = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
    """Log-probabilities predicting positions ``1..len(seq)-1`` of ``seq``, window by window, in order.

    Yields ``(first, logprobs)``: ``logprobs[r]`` is the distribution over the vocabulary (log-softmax of the
    logits) predicting ``seq[first + r]``.
    """
    spans = window_spans(len(seq), context, stride)
    for g in forward_groups([e - s for s, e, _ in spans], batch_size, vocab_size(model)):
        group = spans[g.start:g.stop]
        width = max(e - s for s, e, _ in group)
        # Right padding: a causal model's outputs at real positions do not depend on later (padded) ones.
        batch = torch.zeros(len(group), width, dtype=torch.long)
        for r, (s, e, _) in enumerate(group):
            batch[r, :e - s] = seq[s:e]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model_logits(model, batch.to(device)), dim=-1).cpu()
        for r, (s, e, first) in enumerate(group):
            # logits at window offset o predict position s + o + 1
            yield first, logprobs[r, first - s - 1:e - s - 1]


def window_nll(model, jobs: list[tuple[torch.Tensor, tuple[int, int, int]]], device) -> float:
    """Total NLL (nats) of the scored positions of a batch of windows ``(seq, (start, end, first))``."""
    width = max(e - s for _, (s, e, _) in jobs)
    batch = torch.zeros(len(jobs), width, dtype=torch.long)
    targets = torch.zeros(len(jobs), width, dtype=torch.long)
    scored = torch.zeros(len(jobs), width, dtype=torch.bool)
    for r, (seq, (s, e, first)) in enumerate(jobs):
        batch[r, :e - s] = seq[s:e]
        # logits at window offset o predict position s + o + 1; positions first..e-1 are scored
        targets[r, first - s - 1:e - s - 1] = seq[first:e]
        scored[r, first - s - 1:e - s - 1] = True
    with torch.inference_mode():
        logits = model_logits(model, batch.to(device))
        # log p(target) = logit(target) - logsumexp(logits), without materialising a second [B, W, V] tensor
        picked = (logits.gather(-1, targets.to(logits.device)[..., None])[..., 0] - torch.logsumexp(logits, -1)).cpu()
    return -picked[scored].double().sum().item()
