"""uld_loss against a naive sorted-probability loop, its sparse bucket convention, and TRL's GOLD ULDLoss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from stillroom.losses import uld_loss
from stillroom.targets import SparseTarget


def naive_uld_row(zs: list[float], zt: list[float], temperature: float = 1.0) -> float:
    """Sort both softmaxes by hand, pad the shorter with zeros, sum the rank-wise |differences|."""
    def probs(z):
        e = [math.exp(x / temperature) for x in z]
        return sorted((x / sum(e) for x in e), reverse=True)

    q, p = probs(zs), probs(zt)
    n = max(len(q), len(p))
    q, p = q + [0.0] * (n - len(q)), p + [0.0] * (n - len(p))
    return sum(abs(a - b) for a, b in zip(q, p, strict=True))


def naive_sparse_row(zs: list[float], top: list[float], tail: float) -> float:
    """Teacher ranks 1..m known (top = live probabilities), everything below rank m one bucket holding ``tail``."""
    e = [math.exp(x) for x in zs]
    q = sorted((x / sum(e) for x in e), reverse=True)
    top = sorted(top, reverse=True)
    m = len(top)
    return sum(abs(q[r] - top[r]) for r in range(m)) + abs(sum(q[m:]) - tail)


def test_dense_matches_naive_loop_across_vocabularies():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(2, 3, 11, generator=g, dtype=torch.float64) * 2  # a wider teacher vocabulary
    got = uld_loss(zs, zt, temperature=1.7, reduction="none")
    for i in range(2):
        for j in range(3):
            want = naive_uld_row(zs[i, j].tolist(), zt[i, j].tolist(), 1.7)
            assert got[i, j].item() == pytest.approx(want, rel=1e-12)
    # and the other way round (student wider); the distance is symmetric in its two arguments
    assert uld_loss(zt, zs, reduction="sum").item() == pytest.approx(uld_loss(zs, zt, reduction="sum").item())
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert uld_loss(zs, zt, temperature=1.7, mask=mask).item() == pytest.approx(got[mask].mean().item())


def test_invariant_to_permuting_either_vocabulary():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 9, generator=g), torch.randn(4, 6, generator=g)
    base = uld_loss(zs, zt)
    torch.testing.assert_close(uld_loss(zs[:, torch.randperm(9, generator=g)], zt[:, torch.randperm(6, generator=g)]),
                               base)
    assert uld_loss(zs, zs + 2.0).abs().item() < 1e-6  # same distribution, shifted logits: 0


def test_gradcheck_dense_and_sparse():
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, zt, temperature=1.3), (zs,))
    target = SparseTarget.from_probs(torch.tensor([[0, 5, 2], [1, 3, 0], [7, 2, 4]]),
                                     torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.3, 0.0], [0.3, 0.3, 0.25]],
                                                  dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, target), (zs,))


def test_sparse_bucket_convention():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    # ids live in the teacher's vocabulary and play no part; a padding entry (−inf) joins the tail bucket
    ids = torch.tensor([[40, 3, 0], [7, 0, 0], [1, 2, 3]])
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.6, 0.0, 0.0], [0.3, 0.3, 0.25]], dtype=torch.float64)
    target = SparseTarget.from_probs(ids, probs)
    got = uld_loss(zs, target, reduction="none")
    for n in range(3):
        top = [p for p in probs[n].tolist() if p > 0]
        want = naive_sparse_row(zs[n].tolist(), top, max(0.0, 1 - sum(top)))
        assert got[n].item() == pytest.approx(want, rel=1e-12)


def test_sparse_is_a_lower_bound_equal_to_dense_with_full_support():
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 10, generator=g, dtype=torch.float64)
    p = zt.softmax(-1)
    dense = uld_loss(zs, zt, reduction="none")
    full = SparseTarget(torch.arange(10).expand(5, 10), p.log(), torch.zeros(5, dtype=torch.float64),
                        torch.ones(5, dtype=torch.bool))
    torch.testing.assert_close(uld_loss(zs, full, reduction="none"), dense)
    top = p.topk(3, -1)
    truncated = SparseTarget(top.indices, top.values.log(), 1 - top.values.sum(-1), torch.ones(5, dtype=torch.bool))
    assert (uld_loss(zs, truncated, reduction="none") <= dense + 1e-12).all()


def _trl_uld(student_logits, teacher_logits, student_labels, teacher_labels):
    pytest.importorskip("trl")
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss

    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False)
    loss = ULDLoss(config)
    ids_s = torch.zeros(student_labels.shape, dtype=torch.long)
    ids_t = torch.zeros(teacher_labels.shape, dtype=torch.long)
    return loss(student_logits, teacher_logits, student_labels, teacher_labels, ids_s, ids_t)


def test_equals_trl_gold_uld_on_equal_lengths():
    """Same rank-wise L1 and zero padding: with sequences of one length, TRL's per-sequence mean averaged over
    sequences equals our mean over all rows."""
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    labels = torch.ones(2, 5, dtype=torch.long)
    ours, theirs = uld_loss(zs, zt), _trl_uld(zs, zt, labels, labels)
    torch.testing.assert_close(ours, theirs.reshape(()))
    torch.testing.assert_close(torch.autograd.grad(ours, zs)[0], torch.autograd.grad(theirs.sum(), zs)[0])


def test_trl_normalises_per_sequence_we_pool_rows():
    """The stated difference: with answers of different lengths TRL averages per-sequence means; ours with
    ``reduction='none'`` and the same per-sequence averaging reproduces it, and our pooled mean differs."""
    g = torch.Generator().manual_seed(6)
    zs = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    labels = torch.ones(2, 6, dtype=torch.long)
    labels[1, :4] = -100  # sequence 1 answers only at its last 2 positions
    counted = labels != -100
    per_row = uld_loss(zs, zt, mask=counted, reduction="none")
    per_sequence = torch.stack([per_row[b][counted[b]].mean() for b in range(2)]).mean()
    theirs = _trl_uld(zs, zt, labels, labels).reshape(())
    torch.testing.assert_close(per_sequence, theirs)
    assert abs(uld_loss(zs, zt, mask=counted).item() - theirs.item()) > 1e-3


def test_errors():
    zs = torch.randn(2, 5)
    with pytest.raises(ValueError, match="leading"):
        uld_loss(zs, torch.randn(3, 5))
    with pytest.raises(ValueError, match="temperature"):
        uld_loss(zs, torch.randn(2, 5), temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        uld_loss(zs, torch.randn(2, 5), reduction="avg")
    with pytest.raises(ValueError, match="NaN or inf"):
        uld_loss(zs, torch.full((2, 5), math.nan))
