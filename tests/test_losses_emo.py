"""EMO: closed forms against an explicit cost matrix, the reference combination, and the fused form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stillroom.losses import EMOLoss, emo_loss, fused_linear_emo_loss
from stillroom.targets import SparseTarget

N, H, V, D = 13, 5, 11, 4


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64)
    cost = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2:5] = -100
    ids = torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(N)])
    probs = torch.rand(N, 3, generator=g, dtype=torch.float64) * 0.3
    target = SparseTarget.from_probs(ids, probs)
    return z, cost, labels, target


def cost_matrix(cost):
    """C[i, j] = 1 − cos(e_i, e_j), materialised (small V only)."""
    C = torch.empty(V, V, dtype=cost.dtype)
    for i in range(V):
        for j in range(V):
            C[i, j] = 1 - torch.dot(cost[i], cost[j]) / (cost[i].norm() * cost[j].norm())
    return C


def test_one_hot_closed_form_equals_explicit_cost():
    z, cost, labels, _ = make()
    C = cost_matrix(cost)
    q = z.softmax(-1)
    rows = [sum(q[n, i] * C[i, labels[n]] for i in range(V)) for n in range(N) if labels[n] != -100]
    want = torch.stack(rows).mean()
    torch.testing.assert_close(emo_loss(z, cost, labels=labels, mode=None), want)


def test_soft_closed_form_equals_explicit_cost():
    z, cost, _, target = make()
    C = cost_matrix(cost)
    q = z.softmax(-1)
    rows = []
    for n in range(N):
        p = torch.zeros(V, dtype=z.dtype)
        p[target.ids[n]] = target.logprobs[n].exp()
        p = p / p.sum()  # support renormalised (the tail's spread is unknown)
        rows.append(sum(q[n, i] * p[j] * C[i, j] for i in range(V) for j in range(V)))
    torch.testing.assert_close(emo_loss(z, cost, target=target, mode=None), torch.stack(rows).mean())
    # dense teacher logits: independent coupling with the full teacher distribution
    zt = torch.randn(N, V + 2, dtype=z.dtype)
    p = zt[:, :V].softmax(-1)
    want = torch.stack([(q[n][:, None] * p[n][None, :] * C).sum() for n in range(N)]).mean()
    torch.testing.assert_close(emo_loss(z, cost, target=zt, mode=None), want)


def test_soft_emo_is_minimised_by_one_hot_not_by_p():
    _, cost, _, _ = make()
    C = cost_matrix(cost)
    p = torch.softmax(torch.randn(V, dtype=torch.float64), -1)
    u = C @ p  # expected cost of each student token
    one_hot_cost, p_cost = u.min(), (p * u).sum()
    assert one_hot_cost < p_cost


@pytest.mark.parametrize("mode", [1, 2])
def test_modes_match_reference_combination(mode):
    z, cost, labels, _ = make()
    zz = z.clone().requires_grad_(True)
    got = emo_loss(zz, cost, labels=labels, mode=mode)
    mask = labels != -100
    y = labels.clamp_min(0)
    mle = F.cross_entropy(zz, y, reduction="none")
    C = cost_matrix(cost)
    emo = (zz.softmax(-1) * C[:, y].T).sum(-1)
    if mode == 1:
        per = 0.5 * (mle + torch.clamp((mle / (emo + 1e-10)).detach(), max=3.0) * emo)
    else:
        per = emo + torch.clamp((emo / (mle + 1e-10)).detach(), max=3.0) * mle
    want = per[mask].mean()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, zz)[0], torch.autograd.grad(want, zz)[0])


def test_gradcheck_and_no_gradient_into_cost():
    z, cost, labels, target = make()
    zz = z[:4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: emo_loss(a, cost, labels=labels[:4], mode=None), (zz,))
    c = cost.clone().requires_grad_(True)
    loss = emo_loss(zz, c, labels=labels[:4], mode=1)
    loss.backward()
    assert c.grad is None


def test_no_one_hot_materialised(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("one_hot must not be called")

    monkeypatch.setattr(F, "one_hot", boom)
    z, cost, labels, _ = make()
    emo_loss(z, cost, labels=labels)


@pytest.mark.parametrize("mode", [None, 1, 2])
@pytest.mark.parametrize("soft", [False, True])
def test_fused_equals_dense(mode, soft):
    _, cost, labels, target = make()
    g = torch.Generator().manual_seed(7)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(V + 3, H, generator=g, dtype=torch.float64).requires_grad_(True)  # padded head
    kw = dict(target=target) if soft else dict(labels=labels)
    for chunk in (1, 2, 5, 100):  # chunk 1/2: rows 2..4 are fully masked chunks
        got = fused_linear_emo_loss(h, w, cost, mode=mode, chunk_size=chunk, **kw)
        want = emo_loss(h @ w[:V].T, cost, mode=mode, **kw)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fixed_and_adaptive_cost():
    z, cost, labels, _ = make()
    head = cost.clone()
    fixed = EMOLoss(head, cost="fixed", mode=None)
    adaptive = EMOLoss(cost="adaptive", mode=None)
    before = fixed(z, labels)
    head.mul_(-1).add_(torch.randn_like(head))  # the head trains on
    torch.testing.assert_close(fixed(z, labels), before)  # frozen copy
    torch.testing.assert_close(adaptive(z, labels, head=head), emo_loss(z, head, labels=labels, mode=None))
    with pytest.raises(ValueError, match="adaptive"):
        adaptive(z, labels)


def test_all_masked_and_errors():
    z, cost, labels, _ = make()
    zz = z.clone().requires_grad_(True)
    loss = emo_loss(zz, cost, labels=torch.full((N,), -100))
    assert loss.item() == 0.0 and (torch.autograd.grad(loss, zz)[0] == 0).all()
    with pytest.raises(ValueError, match="exactly one"):
        emo_loss(z, cost)
    with pytest.raises(ValueError, match="cost_embedding"):
        emo_loss(z, cost[:5], labels=labels)
    with pytest.raises(ValueError, match="mode"):
        emo_loss(z, cost, labels=labels, mode=3)
    bad = z.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        emo_loss(bad, cost, labels=labels)
