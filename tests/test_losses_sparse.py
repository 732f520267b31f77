"""Sparse (top-k) targets at the edges (issue 13): padding-only rows, padding that repeats a live token 0, zero tails.

For every divergence kind and EMO modes 1/2, the sparse, fused-linear and (where a dense target says the same
thing) dense paths are checked in float64 against a naive per-row bucket loop written here: values directly,
gradients against central finite differences of that loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.losses import (
    KINDS,
    TAIL_FLOOR,
    distill_loss,
    emo_loss,
    fused_linear_distill_loss,
    fused_linear_emo_loss,
)
from stillroom.targets import SparseTarget

V = 7
# (ids, probs, tail) per row; a probability of 0 is a padding entry (log-prob −inf)
EDGE = [  # k = 3
    ([0, 0, 0], [0.0, 0.0, 0.0], 1.0),    # padding only, all mass in the tail (the row)
    ([0, 0, 0], [0.7, 0.0, 0.0], 0.3),    # live token 0 first, padding repeats it
    ([3, 0, 0], [0.2, 0.5, 0.0], 0.3),    # live token 0 in the middle, padding after it
    ([0, 0, 2], [0.0, 0.6, 0.1], 0.3),    # padding before the live token 0
    ([0, 0, 0], [1.0, 0.0, 0.0], 0.0),    # one-hot on token 0, zero tail
    ([1, 4, 0], [0.6, 0.4, 0.0], 0.0),    # zero tail, support short of the vocabulary, token 0 only padding
    ([5, 0, 0], [0.001, 0.0, 0.0], 0.999),  # nearly all mass in the tail (EMO mode 2's ratio above the cap)
]


def _full_rows() -> list:
    """k = V: a full-support zero-tail row (no student tail bucket), and the padded rows again at this k."""
    g = torch.Generator().manual_seed(11)
    perm = torch.randperm(V, generator=g).tolist()
    probs = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 2, -1).tolist()
    return [(perm, probs, 0.0),
            ([0] * V, [0.0] * V, 1.0),
            ([0] * V, [1.0] + [0.0] * (V - 1), 0.0),
            ([6] + [0] * (V - 1), [0.25, 0.5] + [0.0] * (V - 2), 0.25)]


CASES = {"edge": EDGE, "full": _full_rows()}


def make_target(rows) -> SparseTarget:
    ids = torch.tensor([r[0] for r in rows])
    lp = torch.tensor([[math.log(p) if p > 0 else -math.inf for p in r[1]] for r in rows], dtype=torch.float64)
    tail = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    return SparseTarget(ids, lp, tail, torch.ones(len(rows), dtype=torch.bool))


def dense_logits(rows, temperature: float = 1.0) -> torch.Tensor:
    """The same teacher as dense logits (rows with a zero tail only): T·log p, and −1e4 (p = 0 in float64)
    elsewhere — dense logits are divided by T, a SparseTarget is not."""
    t = torch.full((len(rows), V), -1e4, dtype=torch.float64)
    for n, (ids, probs, _) in enumerate(rows):
        for i, p in zip(ids, probs, strict=True):
            if p > 0:
                t[n, i] = temperature * math.log(p)
    return t


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    m = max(row)
    e = [math.exp((x - m) / temperature) for x in row]
    s = sum(e)
    return [x / s for x in e]


def kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)


def naive_buckets(q: list[float], ids, probs, tail, kind: str) -> tuple[list[float], list[float]]:
    """Teacher and student over k + 1 buckets, by hand: live ids, then everything else (if anything is)."""
    live = {i: p for i, p in zip(ids, probs, strict=True) if p > 0}
    pb, qb = list(live.values()), [q[i] for i in live]
    rest = [i for i in range(len(q)) if i not in live]
    if rest:
        pb.append(max(tail, TAIL_FLOOR) if kind == "reverse_kl" else tail)
        qb.append(sum(q[i] for i in rest))
    return pb, qb


def naive_divergence(p: list[float], q: list[float], kind: str, beta: float = 0.5, alpha: float = 0.1) -> float:
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_forward_kl":
        return kl(p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q, strict=True)])
    if kind == "skew_reverse_kl":
        return kl(q, [alpha * b + (1 - alpha) * a for a, b in zip(p, q, strict=True)])
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
    return -sum(a * math.log(b) for a, b in zip(p, q, strict=True) if a > 0)  # soft_ce


def naive_loss(z: torch.Tensor, rows, kind: str, temperature: float) -> float:
    total = 0.0
    for n, (ids, probs, tail) in enumerate(rows):
        pb, qb = naive_buckets(softmax(z[n].tolist(), temperature), ids, probs, tail, kind)
        total += naive_divergence(pb, qb, kind)
    return total


def central_differences(f, z: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(z)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in z.shape]).tolist():
        up, down = z.clone(), z.clone()
        up[tuple(idx)] += h
        down[tuple(idx)] -= h
        grad[tuple(idx)] = (f(up) - f(down)) / (2 * h)
    return grad


def logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


def value_and_grad(fn, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = z.clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out, x)
    return out.item(), g


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_sparse_fused_dense_against_finite_differences(kind, temperature, case):
    rows = CASES[case]
    z, target, eye = logits(len(rows)), make_target(rows), torch.eye(V, dtype=torch.float64)
    want = naive_loss(z, rows, kind, temperature)
    fd = central_differences(lambda x: naive_loss(x, rows, kind, temperature), z)
    paths = {
        "sparse": lambda x: distill_loss(x, target, kind=kind, temperature=temperature, reduction="sum"),
        "fused": lambda x: fused_linear_distill_loss(x, eye, target=target, kind=kind, temperature=temperature,
                                                     reduction="sum", chunk_size=3),
    }
    for name, fn in paths.items():
        got, grad = value_and_grad(fn, z)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), name
        torch.testing.assert_close(grad, fd, rtol=0, atol=1e-7, msg=f"{name} gradient, {kind}")
    # dense: the rows whose zero tail makes the target a full distribution. Reverse KL differs by design (a
    # dense target has no tail floor: student mass where p = 0 costs q·(log q + 1e4)).
    zero_tail = [n for n, r in enumerate(rows) if r[2] == 0.0]
    if kind != "reverse_kl":
        sub = [rows[n] for n in zero_tail]
        zt = dense_logits(sub, temperature)
        got, grad = value_and_grad(
            lambda x: distill_loss(x, zt, kind=kind, temperature=temperature, reduction="sum"), z[zero_tail])
        assert got == pytest.approx(naive_loss(z[zero_tail], sub, kind, temperature), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(grad, fd[zero_tail], rtol=0, atol=1e-7, msg=f"dense gradient, {kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_padding_only_row_is_zero_with_zero_gradient(kind):
    """The issue's row: k = 3 padding entries at id 0, all mass in the tail. Teacher and student are both the
    single bucket {1}, so the loss is 0 and so is every gradient entry (it used to be −2·softmax(z)₀ at id 0)."""
    z = logits(1, seed=3)
    target = make_target([EDGE[0]])
    for fn in (lambda x: distill_loss(x, target, kind=kind),
               lambda x: fused_linear_distill_loss(x, torch.eye(V, dtype=torch.float64), target=target, kind=kind)):
        got, grad = value_and_grad(fn, z)
        assert abs(got) < 1e-15
        assert grad.abs().max().item() < 1e-15


# ---- EMO ----------------------------------------------------------------------------------------------------

def cost_matrix(cost: torch.Tensor) -> list[list[float]]:
    """c(i, j) = 1 − cos(e_i, e_j), one pair at a time."""
    e = cost.tolist()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    return [[1 - cos(a, b) for b in e] for a in e]


def naive_emo_parts(z: torch.Tensor, rows, C) -> list[tuple[float, float]]:
    """Per row (mle, emo): the bucket soft CE, and Σ_ij q_i p̃_j c(i, j) with p̃ the renormalised support."""
    out = []
    for n, (ids, probs, tail) in enumerate(rows):
        q = softmax(z[n].tolist())
        pb, qb = naive_buckets(q, ids, probs, tail, "soft_ce")
        mle = naive_divergence(pb, qb, "soft_ce")
        live = {i: p for i, p in zip(ids, probs, strict=True) if p > 0}
        mass = sum(live.values())
        emo = sum(q[i] * p / mass * C[i][j] for i in range(V) for j, p in live.items())
        out.append((mle, emo))
    return out


def naive_emo_weights(parts, mode: int) -> list[tuple[float, float]]:
    """Stop-gradient weights (a on mle, b on emo), from the reference combination with both ratios capped at 3."""
    if mode == 1:
        return [(0.5, 0.5 * min(m / (e + 1e-10), 3.0)) for m, e in parts]
    return [(min(e / (m + 1e-10), 3.0), 1.0) for m, e in parts]


def naive_emo_loss(z: torch.Tensor, rows, C, weights) -> float:
    return sum(a * m + b * e for (a, b), (m, e) in zip(weights, naive_emo_parts(z, rows, C), strict=True))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", [1, 2])
def test_emo_modes_sparse_fused_dense_against_finite_differences(mode, case):
    rows = CASES[case]
    z, target, eye = logits(len(rows), seed=1), make_target(rows), torch.eye(V, dtype=torch.float64)
    cost = torch.randn(V, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    C = cost_matrix(cost)
    parts = naive_emo_parts(z, rows, C)
    weights = naive_emo_weights(parts, mode)  # held fixed under differentiation: they are stop-gradients
    want = naive_emo_loss(z, rows, C, weights)
    fd = central_differences(lambda x: naive_emo_loss(x, rows, C, weights), z)
    if case == "edge" and mode == 2:  # the cap binds on the near-all-tail row, and only there
        ratios = [e / (m + 1e-10) for m, e in parts]
        assert ratios[-1] > 3.0 and max(ratios[:-1]) < 3.0
    paths = {
        "sparse": lambda x: emo_loss(x, cost, target=target, mode=mode, reduction="sum"),
        "fused": lambda x: fused_linear_emo_loss(x, eye, cost, target=target, mode=mode, reduction="sum",
                                                 chunk_size=3),
    }
    for name, fn in paths.items():
        got, grad = value_and_grad(fn, z)
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), name
        torch.testing.assert_close(grad, fd, rtol=0, atol=1e-7, msg=f"{name} gradient, mode {mode}")
    zero_tail = [n for n, r in enumerate(rows) if r[2] == 0.0]
    sub = [rows[n] for n in zero_tail]
    got, grad = value_and_grad(lambda x: emo_loss(x, cost, target=dense_logits(sub), mode=mode, reduction="sum"),
                               z[zero_tail])
    assert got == pytest.approx(naive_emo_loss(z[zero_tail], sub, C, [weights[n] for n in zero_tail]),
                                rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, fd[zero_tail], rtol=0, atol=1e-7, msg=f"dense gradient, mode {mode}")


@pytest.mark.parametrize("mode", [None, 1, 2])
def test_emo_padding_only_row_is_zero_with_zero_gradient(mode):
    """Mode 2 on the padding-only row gave a gradient of ~−1e10 (sg(emo/mle) with mle ≈ 0); now every path
    gives value 0 (nothing to transport, nothing to predict) and gradient 0."""
    z = logits(1, seed=3)
    target = make_target([EDGE[0]])
    cost = torch.randn(V, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for fn in (lambda x: emo_loss(x, cost, target=target, mode=mode),
               lambda x: fused_linear_emo_loss(x, torch.eye(V, dtype=torch.float64), cost, target=target,
                                               mode=mode)):
        got, grad = value_and_grad(fn, z)
        assert abs(got) < 1e-15
        assert grad.abs().max().item() < 1e-15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_tail_bucket_across_student_tail_masses(kind, dtype):
    """The fused path takes the student's tail mass as 1 − Σ support q (exact complement logsumexp only where
    that would cancel): across rows whose student tail runs from ~0.9 down to ~1e-13 (both sides of the
    switch in the first chunk of 7 rows, all exact rows in the second), its value matches the naive bucket
    loop and its gradient the autograd sparse path, which always takes the complement logsumexp."""
    n, v, k = 14, 40, 5
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, v, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    for r in range(n):  # lift the support: row r keeps a tail of roughly e^(-2.2 r)
        z[r, ids[r]] += 2.2 * r
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1) * 0.8
    rows = [(ids[r].tolist(), probs[r].tolist(), 0.2) for r in range(n)]
    target = make_target(rows)
    q_tail = 1 - torch.softmax(z, -1).gather(-1, ids).sum(-1)
    assert q_tail.max() > 0.1 and q_tail.min() < 1e-11
    zc = z.to(dtype)
    tgt = SparseTarget(target.ids, target.logprobs.to(dtype), target.tail.to(dtype), target.valid)
    eye = torch.eye(v, dtype=dtype)
    got, grad = value_and_grad(lambda x: fused_linear_distill_loss(x, eye, target=tgt, kind=kind, reduction="sum",
                                                                   chunk_size=7), zc)
    _, ref = value_and_grad(lambda x: distill_loss(x, tgt, kind=kind, reduction="sum"), zc)
    tight = dtype == torch.float64
    assert got == pytest.approx(naive_loss(z, rows, kind, 1.0), rel=1e-10 if tight else 2e-5)
    torch.testing.assert_close(grad, ref, rtol=1e-9 if tight else 1e-4, atol=1e-12 if tight else 1e-6)
