"""distill_loss against naive loop implementations, hand-computed values, identities, gradcheck and TRL."""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.losses import KINDS, TAIL_FLOOR, distill_loss
from stillroom.targets import SparseTarget


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64 (restored afterwards: other modules share the process)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def naive(p: list[float], q: list[float], kind: str, beta: float = 0.5, alpha: float = 0.1) -> float:
    """Textbook definitions, one bucket at a time (0·log 0 = 0)."""
    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(p, q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(q, p)
    if kind == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_forward_kl":
        return kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q, strict=True)])
    if kind == "skew_reverse_kl":
        return kl(q, [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q, strict=True)])
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q, strict=True))
    if kind == "soft_ce":
        return -sum(pi * math.log(qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
    raise AssertionError(kind)


def softmax_list(row: torch.Tensor, t: float = 1.0) -> list[float]:
    e = [math.exp(float(x) / t) for x in row]
    s = sum(e)
    return [x / s for x in e]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_matches_naive_loops(kind, temperature):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 7, generator=g) * 2, torch.randn(4, 7, generator=g) * 2
    got = distill_loss(zs, zt, kind=kind, beta=0.3, alpha=0.2, temperature=temperature, reduction="none")
    for n in range(4):
        want = naive(softmax_list(zt[n], temperature), softmax_list(zs[n], temperature), kind, 0.3, 0.2)
        assert got[n].item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_hand_computed_values():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    zs, zt = q.log(), p.log()
    fkl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)   # 0.1438410362
    rkl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)  # 0.1308120359
    assert distill_loss(zs, zt, kind="forward_kl").item() == pytest.approx(0.1438410362, abs=1e-9)
    assert distill_loss(zs, zt, kind="forward_kl").item() == pytest.approx(fkl)
    assert distill_loss(zs, zt, kind="reverse_kl").item() == pytest.approx(0.1308120359, abs=1e-9)
    assert distill_loss(zs, zt, kind="reverse_kl").item() == pytest.approx(rkl)
    assert distill_loss(zs, zt, kind="tvd").item() == pytest.approx(0.25)
    assert distill_loss(zs, zt, kind="soft_ce").item() == pytest.approx(fkl + math.log(2))
    # JSD(β=0.5), m = (0.375, 0.625): ½·KL(p‖m) + ½·KL(q‖m)
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) \
        + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
    assert distill_loss(zs, zt, kind="jsd", beta=0.5).item() == pytest.approx(jsd)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(kind, sparse):
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(3, 6, generator=g, requires_grad=True)
    if sparse:
        ids = torch.tensor([[0, 2, 5], [1, 3, 0], [4, 5, 2]])
        probs = torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.3, 0.0], [0.3, 0.3, 0.3]])
        target = SparseTarget.from_probs(ids, probs)
    else:
        target = torch.randn(3, 6, generator=g)
    assert torch.autograd.gradcheck(
        lambda z: distill_loss(z, target, kind=kind, beta=0.4, temperature=1.7), (zs,))


def test_identities():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    fkl = distill_loss(zs, zt, kind="forward_kl", reduction="none")
    rkl = distill_loss(zs, zt, kind="reverse_kl", reduction="none")
    torch.testing.assert_close(distill_loss(zs, zt, kind="jsd", beta=0.0, reduction="none"), fkl)
    torch.testing.assert_close(distill_loss(zs, zt, kind="jsd", beta=1.0, reduction="none"), rkl)
    p = zt.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(distill_loss(zs, zt, kind="soft_ce", reduction="none"), fkl + entropy)
    # skew with α = 0 is the plain KL
    torch.testing.assert_close(distill_loss(zs, zt, kind="skew_forward_kl", alpha=0.0, reduction="none"), fkl)
    torch.testing.assert_close(distill_loss(zs, zt, kind="skew_reverse_kl", alpha=0.0, reduction="none"), rkl)
    for kind in KINDS:
        if kind == "soft_ce":
            continue
        same = distill_loss(zs, zs + 3.0, kind=kind, reduction="none")  # shift: same distribution
        assert same.abs().max() < 1e-12, kind
        assert (distill_loss(zs, zt, kind=kind, reduction="none") > 0).all(), kind


def test_same_gradient_forward_kl_and_soft_ce():
    zs = torch.randn(4, 8, requires_grad=True)
    zt = torch.randn(4, 8)
    g1 = torch.autograd.grad(distill_loss(zs, zt, kind="forward_kl"), zs)[0]
    g2 = torch.autograd.grad(distill_loss(zs, zt, kind="soft_ce"), zs)[0]
    torch.testing.assert_close(g1, g2)


def naive_sparse(zs_row: torch.Tensor, ids: list[int], probs: list[float], tail: float, kind: str) -> float:
    """k + 1 buckets by hand: the support ids and everything else."""
    q = softmax_list(zs_row)
    qb = [q[i] for i in ids] + [sum(q[i] for i in range(len(q)) if i not in ids)]
    pb = list(probs) + [tail]
    if kind in ("reverse_kl",):
        pb[-1] = max(tail, TAIL_FLOOR)
    return naive(pb, qb, kind, 0.5, 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_matches_naive_buckets(kind):
    g = torch.Generator().manual_seed(4)
    zs = torch.randn(3, 10, generator=g)
    ids = torch.tensor([[1, 4, 7], [0, 2, 9], [3, 5, 6]])
    probs = torch.tensor([[0.5, 0.3, 0.1], [0.7, 0.2, 0.1], [0.2, 0.2, 0.2]])
    got = distill_loss(zs, SparseTarget.from_probs(ids, probs), kind=kind, reduction="none")
    for n in range(3):
        tail = max(0.0, 1 - float(probs[n].sum()))
        want = naive_sparse(zs[n], ids[n].tolist(), probs[n].tolist(), tail, kind)
        assert got[n].item() == pytest.approx(want, rel=1e-9, abs=1e-12), (kind, n)


def test_sparse_padding_entries_stay_in_tail():
    zs = torch.randn(1, 6)
    full = SparseTarget(torch.tensor([[2, 0, 0]]), torch.tensor([[math.log(0.6), -math.inf, -math.inf]]),
                        torch.tensor([0.4]), torch.tensor([True]))
    short = SparseTarget(torch.tensor([[2]]), torch.tensor([[math.log(0.6)]]), torch.tensor([0.4]),
                         torch.tensor([True]))
    for kind in KINDS:
        torch.testing.assert_close(distill_loss(zs, full, kind=kind), distill_loss(zs, short, kind=kind))
    # a padding entry (id 0, −inf) next to a live id 0: the live one wins, deterministically
    dup = SparseTarget(torch.tensor([[0, 3, 0]]), torch.tensor([[math.log(0.5), math.log(0.2), -math.inf]]),
                       torch.tensor([0.3]), torch.tensor([True]))
    ref = SparseTarget(torch.tensor([[0, 3]]), torch.tensor([[math.log(0.5), math.log(0.2)]]), torch.tensor([0.3]),
                       torch.tensor([True]))
    for kind in KINDS:
        torch.testing.assert_close(distill_loss(zs, dup, kind=kind), distill_loss(zs, ref, kind=kind))


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_with_full_support_equals_dense(kind):
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    lp = zt.log_softmax(-1)
    perm = torch.stack([torch.randperm(6, generator=g) for _ in range(4)])
    target = SparseTarget(perm, lp.gather(-1, perm), torch.zeros(4), torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(distill_loss(zs, target, kind=kind), distill_loss(zs, zt, kind=kind))


def test_temperature_and_t2_scale():
    zs, zt = torch.randn(3, 5), torch.randn(3, 5)
    base = distill_loss(zs / 2.0, zt / 2.0, kind="jsd")
    torch.testing.assert_close(distill_loss(zs, zt, kind="jsd", temperature=2.0), base)
    torch.testing.assert_close(distill_loss(zs, zt, kind="jsd", temperature=2.0, t2_scale=True), 4.0 * base)


def test_mask_reductions_and_accumulation():
    zs = torch.randn(2, 5, 7, requires_grad=True)
    zt = torch.randn(2, 5, 7)
    mask = torch.rand(2, 5) > 0.3
    mask[0, 0] = True
    per = distill_loss(zs, zt, kind="reverse_kl", mask=mask, reduction="none")
    assert per.shape == (2, 5) and (per[~mask] == 0).all()
    mean = distill_loss(zs, zt, kind="reverse_kl", mask=mask)
    torch.testing.assert_close(mean, per.sum() / mask.sum())
    # two micro-batches with "sum" / global count == the full-batch mean, gradients too
    g_full = torch.autograd.grad(mean, zs)[0]
    count = int(mask.sum())
    acc = sum(distill_loss(zs[i], zt[i], kind="reverse_kl", mask=mask[i], num_items=count) for i in range(2))
    torch.testing.assert_close(acc, mean)
    torch.testing.assert_close(torch.autograd.grad(acc, zs)[0], g_full)


def test_all_masked_is_zero_without_nan():
    zs = torch.randn(3, 4, requires_grad=True)
    for kind in KINDS:
        loss = distill_loss(zs, torch.randn(3, 4), kind=kind, mask=torch.zeros(3, dtype=torch.bool))
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, zs)
        assert (grad == 0).all()
    target = SparseTarget.from_probs(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                                     torch.zeros(3, dtype=torch.bool))
    assert distill_loss(zs, target).item() == 0.0


def test_padded_teacher_vocab_is_dropped_and_renormalised():
    zs, zt = torch.randn(3, 5), torch.randn(3, 8)  # teacher head padded with 3 extra rows
    torch.testing.assert_close(distill_loss(zs, zt, kind="jsd"), distill_loss(zs, zt[:, :5], kind="jsd"))
    # both padded: vocab_size drops the padding on both sides
    zs_pad = torch.cat([zs, torch.randn(3, 2)], -1)
    torch.testing.assert_close(distill_loss(zs_pad, zt, vocab_size=5), distill_loss(zs, zt[:, :5]))
    with pytest.raises(ValueError, match="cover the student"):
        distill_loss(torch.randn(3, 8), torch.randn(3, 5))


def test_bad_input_errors():
    zs, zt = torch.randn(3, 5), torch.randn(3, 5)
    bad = zs.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf .*row 1"):
        distill_loss(bad, zt)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        distill_loss(bad, zt)
    with pytest.raises(ValueError, match="NaN or inf"):
        distill_loss(zs, bad)
    with pytest.raises(ValueError, match="leading"):
        distill_loss(zs, torch.randn(4, 5))
    with pytest.raises(ValueError, match="kind"):
        distill_loss(zs, zt, kind="kl")
    with pytest.raises(ValueError, match="mask shape"):
        distill_loss(zs, zt, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ids must lie"):
        distill_loss(zs, SparseTarget.from_probs(torch.tensor([[7]] * 3), torch.ones(3, 1)))
    nan_lp = SparseTarget(torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), float("nan")), torch.zeros(3),
                          torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="logprobs"):
        distill_loss(zs, nan_lp)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_trl(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(2, 4, 11, generator=g), torch.randn(2, 4, 11, generator=g)
    labels = torch.randint(0, 11, (2, 4), generator=g)
    labels[0, :2] = -100
    want = gkd.GKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=beta, temperature=1.5)
    got = distill_loss(zs, zt, kind="jsd", beta=beta, temperature=1.5, mask=labels != -100)
    torch.testing.assert_close(got, want)
