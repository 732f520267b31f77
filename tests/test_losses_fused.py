"""fused_linear_distill_loss (chunked, closed-form gradients) equals the materialised-logits form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stillroom.losses import KINDS, distill_loss, fused_linear_distill_loss
from stillroom.targets import SparseTarget

N, H, V, HT = 23, 6, 19, 5


def make(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_(True)
    th = torch.randn(N, HT, generator=g, dtype=dtype)
    tw = torch.randn(V + 4, HT, generator=g, dtype=dtype)  # teacher head padded by 4 rows
    labels = torch.randint(0, V, (N,), generator=g)
    labels[4:15] = -100  # covers whole chunks for chunk sizes <= 5
    ids = torch.stack([torch.randperm(V, generator=g)[:4] for _ in range(N)])
    probs = torch.rand(N, 4, generator=g, dtype=dtype)
    probs = probs / probs.sum(-1, keepdim=True) * 0.85
    probs[0, 2:] = 0  # padding entries
    target = SparseTarget.from_probs(ids, probs)
    target.valid[17] = False
    return h, w, th, tw, labels, target


def reference(h, w, th, tw, labels, target, kind, lam, T, reduction, use_sparse):
    z = h @ w.T
    mask = labels != -100
    teacher = target if use_sparse else th @ tw.T
    d = distill_loss(z, teacher, kind=kind, beta=0.3, alpha=0.2, temperature=T, mask=mask, reduction=reduction)
    if lam == 0:
        return d
    return lam * F.cross_entropy(z, labels, ignore_index=-100, reduction=reduction) + (1 - lam) * d


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_sparse", [False, True])
def test_chunked_equals_dense_every_kind(kind, use_sparse):
    h, w, th, tw, labels, target = make()
    for chunk, lam, T, red in [(1, 0.0, 1.0, "mean"), (3, 0.4, 2.0, "sum"), (5, 0.0, 0.7, "mean"),
                               (64, 0.25, 1.0, "mean")]:
        kw = dict(target=target) if use_sparse else dict(teacher_hidden=th, teacher_weight=tw)
        got = fused_linear_distill_loss(h, w, labels=labels, ce_weight=lam, kind=kind, beta=0.3, alpha=0.2,
                                        temperature=T, chunk_size=chunk, reduction=red, **kw)
        want = reference(h, w, th, tw, labels, target, kind, lam, T, red, use_sparse)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        g_got = torch.autograd.grad(got, (h, w))
        g_want = torch.autograd.grad(want, (h, w))
        for a, b in zip(g_got, g_want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_within_1e5_relative():
    h, w, th, tw, labels, target = make(torch.float32, seed=3)
    got = fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw, kind="jsd", chunk_size=7)
    gg = torch.autograd.grad(got, (h, w))
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    want = distill_loss(h64 @ w64.T, th.double() @ tw.double().T, kind="jsd")
    gw = torch.autograd.grad(want, (h64, w64))
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    for a, b in zip(gg, gw, strict=True):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def test_bfloat16_inputs_accumulate_in_float32():
    h, w, th, tw, labels, target = make(seed=4)
    hb, wb = h.detach().bfloat16().requires_grad_(True), w.detach().bfloat16().requires_grad_(True)
    got = fused_linear_distill_loss(hb, wb, target=target, labels=labels, ce_weight=0.5, kind="jsd", chunk_size=5)
    assert got.dtype == torch.float32
    got.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    h64, w64 = hb.detach().double().requires_grad_(True), wb.detach().double().requires_grad_(True)
    want = reference(h64, w64, th, tw, labels, target, "jsd", 0.5, 1.0, "mean", True)
    want.backward()
    assert abs(got.item() - want.item()) < 2e-2 * abs(want.item())
    assert (wb.grad.double() - w64.grad).abs().max() < 2e-2 * w64.grad.abs().max()


def test_gradcheck_fused():
    h, w, th, tw, labels, target = make()
    h, w = h[:6].detach().requires_grad_(True), w.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_distill_loss(a, b, teacher_hidden=th[:6], teacher_weight=tw, labels=labels[:6],
                                               ce_weight=0.3, kind="skew_reverse_kl", chunk_size=4,
                                               temperature=1.3), (h, w))
    assert torch.autograd.gradcheck(
        lambda a, b: fused_linear_distill_loss(
            a, b, target=SparseTarget(target.ids[:6], target.logprobs[:6], target.tail[:6], target.valid[:6]),
            kind="jsd", chunk_size=4), (h, w))


def test_gradient_accumulation_with_num_items():
    h, w, th, tw, labels, target = make()
    full = fused_linear_distill_loss(h, w, target=target, labels=labels, ce_weight=0.0, kind="reverse_kl")
    g_full = torch.autograd.grad(full, (h, w))
    count = int(((labels != -100) & target.valid).sum())
    parts = []
    for sl in (slice(0, 9), slice(9, N)):
        t = SparseTarget(target.ids[sl], target.logprobs[sl], target.tail[sl], target.valid[sl])
        parts.append(fused_linear_distill_loss(h[sl], w, target=t, labels=labels[sl], kind="reverse_kl",
                                               reduction="sum") / count)
    acc = parts[0] + parts[1]
    torch.testing.assert_close(acc, full)
    for a, b in zip(torch.autograd.grad(acc, (h, w)), g_full, strict=True):
        torch.testing.assert_close(a, b)
    via_num_items = fused_linear_distill_loss(h, w, target=target, labels=labels, kind="reverse_kl",
                                              num_items=count)
    torch.testing.assert_close(via_num_items, full)


def test_all_masked_is_zero():
    h, w, th, tw, labels, target = make()
    loss = fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw, labels=torch.full((N,), -100),
                                     ce_weight=0.5)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (h, w)):
        assert (g == 0).all()


def test_leading_dims_and_padded_student_head():
    h, w, th, tw, labels, target = make()
    h3 = h.detach().reshape(1, N, H)
    w_pad = torch.cat([w.detach(), torch.randn(3, H, dtype=w.dtype)]).requires_grad_(True)
    got = fused_linear_distill_loss(h3, w_pad, teacher_hidden=th.reshape(1, N, HT), teacher_weight=tw,
                                    vocab_size=V, kind="forward_kl", chunk_size=4)
    want = distill_loss(h3 @ w_pad[:V].T, (th @ tw.T).reshape(1, N, -1), kind="forward_kl")
    torch.testing.assert_close(got, want)
    (gw,) = torch.autograd.grad(got, w_pad)
    assert (gw[V:] == 0).all()


def test_only_ce():
    h, w, th, tw, labels, target = make()
    got = fused_linear_distill_loss(h, w, labels=labels, ce_weight=1.0, chunk_size=4)
    torch.testing.assert_close(got, F.cross_entropy(h @ w.T, labels, ignore_index=-100))


def test_errors():
    h, w, th, tw, labels, target = make()
    with pytest.raises(ValueError, match="needs target"):
        fused_linear_distill_loss(h, w)
    with pytest.raises(ValueError, match="do not fit"):
        fused_linear_distill_loss(h, w[:, :4], target=target)
    with pytest.raises(ValueError, match="fewer than the student"):
        fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw[:5])
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_distill_loss(h, w, target=target, ce_weight=0.5)
    bad = h.detach().clone()
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        fused_linear_distill_loss(bad, w, target=target, chunk_size=4)
    with pytest.raises(ValueError, match="leading"):
        fused_linear_distill_loss(h[:5], w, target=target)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3, 1.0])
def test_parts_report_each_term_as_the_loss_normalises_it(ce_weight):
    """``parts`` = the unweighted CE and divergence, each checked against materialised logits."""
    g = torch.Generator().manual_seed(3)
    N, H, V = 23, 8, 41
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    t_hidden, t_weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 7]] = -100
    parts = {}
    total = fused_linear_distill_loss(hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, labels=labels,
                                      ce_weight=ce_weight, kind="jsd", chunk_size=5, parts=parts)
    z = hidden.double() @ weight.double().T
    ce = F.cross_entropy(z, labels, ignore_index=-100)
    d = distill_loss(z, t_hidden.double() @ t_weight.double().T, kind="jsd", mask=labels.ne(-100))
    assert torch.allclose(parts["ce"], ce, atol=1e-5)
    if ce_weight < 1:
        assert torch.allclose(parts["d"], d, atol=1e-5)
    else:
        assert parts["d"].isnan()
    assert torch.allclose(total.double(), ce_weight * ce + (1 - ce_weight) * (d if ce_weight < 1 else 0), atol=1e-5)


@pytest.mark.parametrize("use_sparse", [False, True])
def test_rows_without_a_term_never_reach_the_head(use_sparse):
    """Prompt / padding rows (label ignored) are dropped before the head: an inf hidden state there is never
    multiplied (it would fail the finite-logits check), the loss equals the one on the kept rows alone, and
    their gradient is exactly 0."""
    h, w, th, tw, labels, target = make()
    dead = labels == -100
    h_bad = h.detach().clone()
    h_bad[dead] = float("inf")
    h_bad.requires_grad_(True)
    th_bad = th.clone()
    th_bad[dead] = float("inf")
    kw = dict(target=target) if use_sparse else dict(teacher_hidden=th_bad, teacher_weight=tw)
    loss = fused_linear_distill_loss(h_bad, w, labels=labels, ce_weight=0.3, kind="jsd", beta=0.3, chunk_size=4, **kw)
    gh, gw = torch.autograd.grad(loss, (h_bad, w))
    assert (gh[dead] == 0).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    live = ~dead
    sub = SparseTarget(target.ids[live], target.logprobs[live], target.tail[live], target.valid[live])
    want = reference(h[live], w, th[live], tw, labels[live], sub, "jsd", 0.3, 1.0, "mean", use_sparse)
    torch.testing.assert_close(loss, want)
