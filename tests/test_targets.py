"""stillroom.targets: the SparseTarget transforms, against naive per-row references."""

import math

import pytest
import torch

from stillroom.targets import SparseTarget


def _naive_soften(probs: list[float], temperature: float) -> list[float]:
    """p'_j = m · p_j^{1/T} / Σ_i p_i^{1/T} over the entries with mass, written out entry by entry."""
    m = sum(probs)
    powered = [p ** (1.0 / temperature) if p > 0 else 0.0 for p in probs]
    z = sum(powered)
    return [m * w / z if z > 0 else 0.0 for w in powered]


@pytest.mark.parametrize("temperature", [0.5, 1.7, 3.0])
def test_soften_support_matches_the_formula_row_by_row(temperature):
    rows = [[0.5, 0.2, 0.1, 0.0], [0.9, 0.05, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]]
    probs = torch.tensor(rows, dtype=torch.float64)
    ids = torch.tensor([[3, 1, 7, 0], [2, 5, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0]])
    valid = torch.tensor([True, True, True, False])
    target = SparseTarget.from_probs(ids, probs, valid)
    got = target.soften_support(temperature)
    for r, row in enumerate(rows):
        want = _naive_soften(row, temperature)
        for j, w in enumerate(want):
            if w == 0.0:
                assert got.logprobs[r, j] == float("-inf")  # padding stays padding
            else:
                assert math.isclose(math.exp(float(got.logprobs[r, j])), w, rel_tol=1e-9)
    assert torch.equal(got.tail, target.tail) and torch.equal(got.ids, ids) and torch.equal(got.valid, valid)
    assert torch.allclose(got.logprobs.exp().sum(-1), probs.sum(-1))  # the support keeps its mass


def test_soften_support_orders_entropy_and_keeps_t1():
    probs = torch.tensor([[0.4, 0.2, 0.1, 0.05]], dtype=torch.float64)
    target = SparseTarget.from_probs(torch.arange(4)[None], probs)
    assert target.soften_support(1.0) is target

    def entropy(t):
        p = t.logprobs.exp() / t.logprobs.exp().sum()
        return float(-(p * p.log()).sum())

    assert entropy(target.soften_support(0.5)) < entropy(target) < entropy(target.soften_support(2.0))
    flat = target.soften_support(1e6).logprobs.exp()[0]
    assert torch.allclose(flat, torch.full((4,), 0.75 / 4, dtype=torch.float64))  # the limit: uniform on the support
    with pytest.raises(ValueError, match="support temperature"):
        target.soften_support(0.0)
