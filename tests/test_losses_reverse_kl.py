"""projected_student_kl (stillroom.losses.reverse_kl) against a dense, looped reference and against the
student-vocabulary sparse loss where the map is a bijection."""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.losses import distill_loss
from stillroom.losses.reverse_kl import projected_student_kl
from stillroom.targets import SparseTarget


def _columns(w: torch.Tensor):
    """W [V_s, V_t] dense -> (ptr, rows, weights) by teacher column."""
    ptr, rows, vals = [0], [], []
    for t in range(w.shape[1]):
        nz = w[:, t].nonzero()[:, 0]
        rows += nz.tolist()
        vals += w[nz, t].tolist()
        ptr.append(len(rows))
    return torch.tensor(ptr), torch.tensor(rows, dtype=torch.long), torch.tensor(vals, dtype=torch.float32)


def _naive(logits, w, ids, lp, tail, kind):
    """Row by row: q = softmax(z) @ W, the teacher's unreachable ids moved to its tail, KL over k + 1 buckets."""
    total = 0.0
    for r in range(logits.shape[0]):
        q_full = torch.softmax(logits[r], -1) @ w
        pt, qs, mass_t = [], [], float(tail[r])
        for j in range(ids.shape[1]):
            if math.isinf(float(lp[r, j])):
                continue
            t = int(ids[r, j])
            if w[:, t].abs().sum() == 0:
                mass_t += math.exp(float(lp[r, j]))
                continue
            pt.append(torch.exp(lp[r, j]).double())
            qs.append(q_full[t])
        q_tail = 1 - sum(qs) if qs else torch.ones((), dtype=torch.float64)
        p_all, q_all = pt + [torch.tensor(mass_t, dtype=torch.float64)], qs + [q_tail]
        for p, q in zip(p_all, q_all, strict=True):
            if kind == "forward_kl" and p > 0:
                total = total + p * (torch.log(p) - torch.log(q))
            elif kind == "reverse_kl":
                total = total + q * (torch.log(q) - torch.log(p.clamp_min(1e-6)))
    return total


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_value_and_gradient_match_a_dense_looped_reference(kind):
    g = torch.Generator().manual_seed(0)
    vs, vt, n, k = 12, 20, 7, 4
    w = torch.zeros(vs, vt, dtype=torch.float64)
    for s in range(vs - 1):  # the last student id maps nowhere (its mass counts as outside every teacher id)
        pieces = torch.randperm(vt, generator=g)[: 1 + s % 3]
        d = 0.1 ** torch.arange(len(pieces), dtype=torch.float64)
        w[s, pieces] = d / d.sum()
    w[:, 19] = 0  # teacher id 19 is reached by no student token
    ids = torch.stack([torch.randperm(vt, generator=g)[:k] for _ in range(n)])
    ids[0, 0] = 19
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g, dtype=torch.float64), -1)
    tail = lp[:, -1].exp()
    lp = lp[:, :k].clone()
    lp[1, 3] = -math.inf  # a padding entry
    logits = torch.randn(n, vs, generator=g, dtype=torch.float64, requires_grad=True)
    target = SparseTarget(ids, lp, tail, torch.ones(n, dtype=torch.bool))
    got = projected_student_kl(logits, target, _columns(w.float()), kind=kind, reduction="sum")
    want = _naive(logits, w, ids, lp, tail, kind)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_a_bijective_map_gives_the_student_vocabulary_sparse_loss():
    """With W a permutation, moving the student into the teacher's vocabulary is a relabelling: the loss must equal
    distill_loss on the same top-k relabelled into the student's vocabulary."""
    g = torch.Generator().manual_seed(1)
    v, n, k = 30, 9, 5
    perm = torch.randperm(v, generator=g)  # student id s is teacher id perm[s]
    w = torch.zeros(v, v)
    w[torch.arange(v), perm] = 1.0
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(v)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g), -1)
    tail, lp = lp[:, -1].exp(), lp[:, :k].contiguous()
    logits = torch.randn(n, v, generator=g)
    valid = torch.ones(n, dtype=torch.bool)
    valid[2] = False
    mine = projected_student_kl(logits, SparseTarget(ids, lp, tail, valid), _columns(w))
    peer = distill_loss(logits, SparseTarget(inv[ids], lp, tail, valid))
    assert float(mine) == pytest.approx(float(peer), rel=1e-5)


def test_a_teacher_id_outside_the_map_is_refused():
    w = torch.eye(4)
    t = SparseTarget(torch.tensor([[7]]), torch.tensor([[0.0]]), torch.tensor([0.0]), torch.tensor([True]))
    with pytest.raises(ValueError, match="outside the map"):
        projected_student_kl(torch.zeros(1, 4), t, _columns(w))


def test_hybrid_is_the_matched_kl_plus_the_mass_weighted_sorted_l1_of_the_rest():
    """A looped reference: twins compared id by id (+ one bucket for everything else), the teacher's entries
    without a twin sorted against the student's largest unmatched probabilities, weighted by their teacher mass."""
    from stillroom.losses.reverse_kl import hybrid_loss

    g = torch.Generator().manual_seed(3)
    vs, vt, n, k = 10, 16, 6, 4
    w = torch.zeros(vs, vt)
    for s in range(7):  # student ids 0..6 have a twin (teacher id 2s); 7..9 have none
        w[s, 2 * s] = 1.0
    unmatched = torch.tensor([False] * 7 + [True] * 3)
    ids = torch.stack([torch.randperm(vt, generator=g)[:k] for _ in range(n)])
    lp = torch.log_softmax(torch.randn(n, k + 1, generator=g, dtype=torch.float64), -1)
    tail, lp = lp[:, -1].exp(), lp[:, :k].contiguous()
    logits = torch.randn(n, vs, generator=g, dtype=torch.float64, requires_grad=True)
    got = hybrid_loss(logits, SparseTarget(ids, lp, tail, torch.ones(n, dtype=torch.bool)), _columns(w),
                      unmatched, reduction="sum")
    want = 0.0
    for r in range(n):
        q = torch.softmax(logits[r], -1)
        p_m, q_m, p_un = [], [], []
        for j in range(k):
            t, p = int(ids[r, j]), lp[r, j].exp()
            if t % 2 == 0 and t // 2 < 7:
                p_m.append(p)
                q_m.append(q[t // 2])
            else:
                p_un.append(p)
        zero = torch.zeros((), dtype=torch.float64)
        rest_p, rest_q = 1 - sum(p_m, zero), 1 - sum(q_m, zero)
        kl = sum((a * (a.log() - b.log()) for a, b in zip(p_m, q_m, strict=True)), zero)
        kl = kl + rest_p * (rest_p.log() - rest_q.log())
        p_sorted = sorted(p_un, reverse=True)
        q_sorted = q[7:].sort(descending=True).values
        l1 = sum(abs((q_sorted[i] if i < len(q_sorted) else 0) - p_sorted[i]) for i in range(len(p_sorted)))
        want = want + kl + sum(p_un) * l1
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-8)
