"""Fusion vs naive per-position references and hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from stillroom.targets import SparseTarget
from stillroom.teachers.fusion import fuse, fusion_weights, merge_duplicates

V = 12


def _target(probs_rows: list[dict[int, float]], k: int, valid=None) -> SparseTarget:
    ids = torch.zeros(len(probs_rows), k, dtype=torch.long)
    p = torch.zeros(len(probs_rows), k)
    for r, row in enumerate(probs_rows):
        for j, (i, q) in enumerate(row.items()):
            ids[r, j], p[r, j] = i, q
    v = None if valid is None else torch.tensor(valid)
    return SparseTarget.from_probs(ids, p, v)


def _dense(t: SparseTarget) -> torch.Tensor:
    """Naive dense view: probability per vocabulary id, plus the tail in an extra column."""
    out = torch.zeros(*t.ids.shape[:-1], V + 1)
    flat_ids, flat_lp = t.ids.reshape(-1, t.k), t.logprobs.reshape(-1, t.k)
    o = out.view(-1, V + 1)
    for r in range(flat_ids.shape[0]):
        for i, lp in zip(flat_ids[r].tolist(), flat_lp[r].tolist(), strict=True):
            if lp > float("-inf"):
                o[r, i] += math.exp(lp)
        o[r, V] = t.tail.reshape(-1)[r]
    return out


def _random_target(gen, lead, k, valid_p=0.8) -> SparseTarget:
    logits = torch.randn(*lead, V, generator=gen)
    probs = logits.softmax(-1)
    top = probs.topk(k, -1)
    valid = torch.rand(*lead, generator=gen) < valid_p
    return SparseTarget(top.indices, top.values.log(), (1 - top.values.sum(-1)).clamp_min(0), valid)


def _naive(targets, ces, method, level, tau=1.0):
    """Loop-per-position reference, written independently of stillroom.teachers.fusion."""
    B, T = targets[0].ids.shape[:2]
    dense = [_dense(t) for t in targets]
    out = torch.zeros(B, T, V + 1)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        seq = []
        for c in ces:
            # the sequence score: every position with a known CE, whether or not the target there is valid
            vals = [c[b, j].item() for j in range(T) if math.isfinite(c[b, j].item())]
            seq.append(sum(vals) / len(vals) if vals else math.inf)
        for j in range(T):
            # a teacher votes where its target is valid and its CE is known somewhere in the sequence
            voters = [i for i, t in enumerate(targets) if t.valid[b, j] and math.isfinite(seq[i])]
            if not voters:
                continue
            valid[b, j] = True
            here = {i: ces[i][b, j].item() for i in voters}  # token level: an unknown CE is the sequence mean
            score = {i: (seq[i] if level == "sequence" or not math.isfinite(here[i]) else here[i]) for i in voters}
            if method == "min_ce":
                best = min(voters, key=lambda i: (score[i], i))
                w = {best: 1.0}
            elif method == "avg_ce":
                z = sum(math.exp(-score[i] / tau) for i in voters)
                w = {i: math.exp(-score[i] / tau) / z for i in voters}
            else:
                w = {i: 1.0 / len(voters) for i in voters}
            for i, wi in w.items():
                out[b, j] += wi * dense[i][b, j]
    return out, valid


@pytest.mark.parametrize("method", ["min_ce", "avg_ce", "mean"])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_fuse_matches_naive_reference(method, level):
    gen = torch.Generator().manual_seed(0)
    B, T = 3, 7
    targets = [_random_target(gen, (B, T), k) for k in (4, 3, 5)]
    ces = [torch.rand(B, T, generator=gen) * 4 for _ in targets]
    ces[1][0, 2] = float("nan")  # a hole in one teacher's CE (still votes there with its valid target)
    ces[0][2, :] = float("nan")  # a teacher whose CE is unknown over a whole sequence: no basis, no vote
    targets[2].valid[1] = False  # a teacher with nothing for a whole sequence
    fused = fuse(targets, ces, method, level)
    ref, ref_valid = _naive(targets, ces, method, level)
    assert torch.equal(fused.valid, ref_valid)
    got = _dense(fused)
    torch.testing.assert_close(got[ref_valid], ref[ref_valid], atol=1e-5, rtol=1e-5)
    # Fused distributions (top-k + tail) still sum to one.
    torch.testing.assert_close(got[ref_valid].sum(-1), torch.ones(int(ref_valid.sum())), atol=1e-5, rtol=0)


def test_avg_ce_hand_computed():
    # Two teachers, one position. CE 1 and 2 -> weights e^-1/(e^-1+e^-2) = 1/(1+e^-1) = 0.7311, 0.2689.
    a = _target([{1: 0.5, 2: 0.5}], k=2)
    b = _target([{2: 0.25, 3: 0.5}], k=2)  # tail 0.25
    fused = fuse([a, b], [torch.tensor([1.0]), torch.tensor([2.0])], "avg_ce", "token")
    w = 1 / (1 + math.exp(-1))
    d = _dense(fused)[0]
    assert d[1].item() == pytest.approx(0.5 * w, abs=1e-6)
    assert d[2].item() == pytest.approx(0.5 * w + 0.25 * (1 - w), abs=1e-6)  # duplicate id summed
    assert d[3].item() == pytest.approx(0.5 * (1 - w), abs=1e-6)
    assert fused.tail[0].item() == pytest.approx(0.25 * (1 - w), abs=1e-6)  # tail kept
    # Ids unique among entries with mass.
    live = fused.ids[0][fused.logprobs[0] > float("-inf")].tolist()
    assert sorted(live) == [1, 2, 3]


def test_min_ce_sequence_level_picks_whole_sequence_teacher_and_skips_invalid():
    # Teacher A is better on average over the sequence but worse at position 0; sequence MinCE picks A
    # everywhere it has a target, token MinCE picks B at position 0. A has no target at position 2 -> B there.
    a = _target([{1: 1.0}, {1: 1.0}, {1: 1.0}], k=1, valid=[True, True, False])
    b = _target([{2: 1.0}, {2: 1.0}, {2: 1.0}], k=1)
    ce_a = torch.tensor([[3.0, 0.5, 0.1]])
    ce_b = torch.tensor([[2.0, 2.0, 2.0]])
    a2 = SparseTarget(a.ids[None], a.logprobs[None], a.tail[None], a.valid[None])
    b2 = SparseTarget(b.ids[None], b.logprobs[None], b.tail[None], b.valid[None])
    seq = fuse([a2, b2], [ce_a, ce_b], "min_ce", "sequence")
    assert seq.ids[0, :, 0].tolist() == [1, 1, 2]
    tok = fuse([a2, b2], [ce_a, ce_b], "min_ce", "token")
    assert tok.ids[0, :, 0].tolist() == [2, 1, 2]
    # The sequence score is the CE over the whole text the teacher read: position 2 counts even though A's
    # distribution did not reach it (mean(3.5, 0.7, 0.2) = 1.47 < 2.05: A); a position with an unknown CE
    # (nan) does not count, and is not taken as CE 0 (mean(3.5, 0.7) = 2.1 > 2.05: B).
    vote = torch.stack([a2.valid, b2.valid])
    w = fusion_weights([torch.tensor([[3.5, 0.7, 0.2]]), torch.full((1, 3), 2.05)], vote, "min_ce", "sequence")
    assert w[:, 0, 0].tolist() == [1.0, 0.0] and w[:, 0, 2].tolist() == [0.0, 1.0]
    w = fusion_weights([torch.tensor([[3.5, 0.7, float("nan")]]), torch.full((1, 3), 2.05)], vote, "min_ce",
                       "sequence")
    assert w[:, 0, 0].tolist() == [0.0, 1.0]


def test_fill_onehot_only_where_no_teacher_voted():
    # Teacher A: no distribution at row 1 (its tokenization had no boundary there); B: none at row 2.
    # Fused per sequence (A wins): row 1 comes from B, row 2 from A; row 3 has neither and becomes one-hot
    # on the next token; row 4 has no next token (-100) and stays invalid.
    a = _target([{1: 0.7}, {1: 0.5}, {3: 0.6}, {1: 1.0}, {1: 1.0}], k=1, valid=[True, False, True, False, False])
    b = _target([{2: 0.9}, {5: 0.4}, {2: 0.9}, {2: 1.0}, {2: 1.0}], k=1, valid=[True, True, False, False, False])
    a2, b2 = (SparseTarget(t.ids[None], t.logprobs[None], t.tail[None], t.valid[None]) for t in (a, b))
    fused = fuse([a2, b2], [torch.full((1, 5), 1.0), torch.full((1, 5), 2.0)], "min_ce", "sequence")
    filled = fused.fill_onehot(torch.tensor([[4, 6, 7, 8, -100]]))
    d = _dense(filled)[0]
    assert filled.valid[0].tolist() == [True, True, True, True, False]
    assert d[0, 1] == pytest.approx(0.7) and d[0, V] == pytest.approx(0.3)  # A's row, tail kept
    assert d[1, 5] == pytest.approx(0.4) and d[1, V] == pytest.approx(0.6)  # B fills A's gap
    assert d[2, 3] == pytest.approx(0.6)  # A again
    assert d[3, 8] == 1.0 and d[3].sum() == 1.0  # nobody: one-hot on the next token, no tail
    # Valid rows are untouched, and a target with nothing to fill is returned as is.
    assert torch.equal(filled.ids[0, :3], fused.ids[0, :3]) and fused.fill_onehot(torch.full((1, 5), -100)) is fused


def test_min_ce_is_an_exact_copy_of_the_single_teacher():
    gen = torch.Generator().manual_seed(1)
    t = _random_target(gen, (2, 5), 4, valid_p=1.0)
    ce = torch.rand(2, 5, generator=gen)
    fused = fuse([t], [ce], "min_ce", "sequence")
    assert torch.equal(fused.ids, t.ids) and torch.equal(fused.logprobs, t.logprobs)
    assert torch.equal(fused.tail, t.tail) and torch.equal(fused.valid, t.valid)


def test_avg_ce_weighting_is_softmax_of_negative_ce_not_fusellm_code():
    vote = torch.ones(2, 1, dtype=torch.bool)
    w = fusion_weights([torch.tensor([0.0]), torch.tensor([3.0])], vote, "avg_ce", "token")
    expected = 1 / (1 + math.exp(-3))
    assert w[0, 0].item() == pytest.approx(expected, abs=1e-6)
    fusellm_code = math.exp(1) / (math.exp(1) + math.exp(math.exp(-3)))  # softmax(exp(-CE)): 0.72
    assert abs(w[0, 0].item() - fusellm_code) > 0.2


def test_top_k_moves_rest_into_tail_and_no_voter_rows_are_invalid():
    a = _target([{1: 0.4, 2: 0.3, 3: 0.2}, {1: 1.0}], k=3, valid=[True, False])
    fused = fuse([a], [torch.tensor([0.5, 0.5])], "mean", "token", top_k=2)
    assert fused.k == 2
    assert fused.ids[0].tolist() == [1, 2]
    assert fused.tail[0].item() == pytest.approx(0.3, abs=1e-6)
    assert fused.valid.tolist() == [True, False]


def test_merge_duplicates():
    ids = torch.tensor([[3, 1, 3, 0]])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.0]])
    out_ids, out_p = merge_duplicates(ids, probs)
    assert out_ids[0, :2].tolist() == [3, 1]
    torch.testing.assert_close(out_p[0], torch.tensor([0.4, 0.2, 0.0, 0.0]))


def test_bad_inputs_name_the_problem():
    t = _target([{1: 1.0}], k=1)
    with pytest.raises(ValueError, match="method"):
        fuse([t], [torch.zeros(1)], "max")
    with pytest.raises(ValueError, match="level"):
        fuse([t], [torch.zeros(1)], "avg_ce", "word")
    with pytest.raises(ValueError, match="leading shape"):
        fuse([t], [torch.zeros(2)])
