"""What a top-k teacher target costs in the chunked fused loss, next to plain CE (the floor) and to the same loss
on materialised logits (the peer a user would write).

    python -m bench.sparse_tail [--rows 512] [--hidden 576] [--vocab 49152 262144] [--k 16] [--repeats 5]

Per vocabulary, one forward + backward of, on the same student hidden states ``[N, H]`` and head ``[V, H]``
(float32, with grad):

- ``ce``: ``fused_linear_distill_loss(ce_weight=1)``, CE alone — what any trainer pays;
- ``fused``: λ = 0.9 CE + forward KL against a random top-k target holding 90% of the teacher's mass (tail 0.1),
  student logits as they come (its tail bucket from the support, ``stillroom.losses.sparse.support_buckets``);
- ``fused_peaked``: the same with the student's mass lifted onto the support (student tail < 1e-3 on every row,
  so every row takes the exact complement logsumexp: the slow path's cost);
- ``materialised``: the same loss as ``fused`` on materialised logits, ``λ·cross_entropy + (1−λ)·distill_loss``
  with autograd (``distill_loss``'s sparse path, the complement logsumexp on every row).

Configurations run interleaved, ``--repeats`` times after one warm-up; the table shows medians and each one's
time over ``ce``'s. Ends with a ``SUMMARY:`` line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import console, machine, print_table, summary
from stillroom.losses import distill_loss, fused_linear_distill_loss
from stillroom.targets import SparseTarget

CONFIGS = ("ce", "fused", "fused_peaked", "materialised")


def inputs(n: int, h: int, v: int, k: int, seed: int = 0):
    """Student hidden states and head (with grad), labels, and a random top-k target (90% on the support)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    logprobs = torch.log_softmax(torch.randn(n, k, generator=g), -1) + torch.log(torch.tensor(0.9))
    target = SparseTarget(ids, logprobs, torch.full((n,), 0.1), torch.ones(n, dtype=torch.bool))
    return hidden, weight, labels, target


def peaked(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states whose logits put > 99.9% of the student's mass on each row's support ids."""
    with torch.no_grad():
        boost = torch.zeros(hidden.shape[0], weight.shape[0])
        boost.scatter_(1, ids, 1.0)
        # h' = h + δ·(boost @ W) / |W_s|²: adds ~δ to the support logits
        step = boost @ weight / weight[ids].pow(2).sum(-1).mean(-1, keepdim=True)
        return (hidden + 30.0 * step).requires_grad_()


def step(config: str, hidden, weight, labels, target, hidden_peaked) -> float:
    """Seconds for one forward + backward of ``config``."""
    hidden.grad = weight.grad = hidden_peaked.grad = None
    t = time.perf_counter()
    if config == "ce":
        loss = fused_linear_distill_loss(hidden, weight, labels=labels, ce_weight=1.0)
    elif config in ("fused", "fused_peaked"):
        h = hidden_peaked if config == "fused_peaked" else hidden
        loss = fused_linear_distill_loss(h, weight, labels=labels, ce_weight=0.9, target=target)
    else:
        z = hidden @ weight.T
        loss = 0.9 * torch.nn.functional.cross_entropy(z, labels) + 0.1 * distill_loss(z, target)
    loss.backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 262144])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    console.print(machine())
    rows, ratios = [], {}
    for v in a.vocab:
        hidden, weight, labels, target = inputs(a.rows, a.hidden, v, a.k)
        hp = peaked(hidden, weight, target.ids)
        with torch.no_grad():
            q = torch.softmax(hp @ weight.T, -1)
            tail = float((1 - q.gather(1, target.ids).sum(-1)).max())
        assert tail < 1e-3, f"peaked student keeps {tail:.2e} outside the support"
        times = {c: [] for c in CONFIGS}
        for c in CONFIGS:  # warm-up
            step(c, hidden, weight, labels, target, hp)
        for _ in range(a.repeats):
            for c in CONFIGS:
                times[c].append(step(c, hidden, weight, labels, target, hp))
        med = {c: statistics.median(ts) for c, ts in times.items()}
        for c in CONFIGS:
            ratios[(v, c)] = med[c] / med["ce"]
            rows.append([f"{v:,}", c, f"{med[c]:.3f}", " ".join(f"{t:.2f}" for t in times[c]),
                         f"{ratios[(v, c)]:.2f}×"])
        del hidden, weight, hp
    print_table(f"fused loss with a top-{a.k} target, N = {a.rows}, H = {a.hidden}, fp32, forward + backward, "
                f"median of {a.repeats} ({machine()})", ["V", "config", "s (median)", "per run", "vs ce"], rows)
    summary("; ".join(f"V={v}: fused {ratios[(v, 'fused')]:.2f}x CE, peaked {ratios[(v, 'fused_peaked')]:.2f}x, "
                      f"materialised {ratios[(v, 'materialised')]:.2f}x" for v in a.vocab))


if __name__ == "__main__":
    main()
