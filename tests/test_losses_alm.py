"""alm_loss against a naive per-chunk loop in float64 (values, and gradients by finite differences), chunks from
real alignments against a byte two-pointer, and the row → token shift of cached teacher log-probs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stillroom.losses import ALM_DIVERGENCES, alm_loss, token_logprobs
from stillroom.tokenization.align import align
from stillroom.tokenization.tokens import TokenTable
from tests.test_tokens import passages


def log1m(x: float) -> float:
    return math.log(-math.expm1(x))


def bernoulli(lp: float, lq: float, divergence: str) -> float:
    p, q = math.exp(lp), math.exp(lq)
    if divergence == "bce":
        return -(p * lq + (1 - p) * log1m(lq))
    if divergence == "kl":
        return p * (lp - lq) + (1 - p) * (log1m(lp) - log1m(lq))
    return q * (lq - lp) + (1 - q) * (log1m(lq) - log1m(lp))  # reverse_kl


def naive_alm(s: list[float], t: list[float], groups, *, mask=None, temperature=1.0, divergence="bce",
              sizes=(1,), weighting="tokens", eps=1e-6) -> float:
    """One chunk at a time: teacher tokens t0:t1, student tokens s0:s1; skip empty, masked or unscorable ones."""
    scored = []
    for g, (t0, t1, s0, s1) in enumerate(groups):
        if t1 <= t0 or s1 <= s0 or (mask is not None and not mask[g]):
            continue
        ls, lt = s[s0:s1], t[t0:t1]
        if not all(math.isfinite(x) for x in ls + lt):
            continue
        scored.append((sum(ls), sum(lt), (s1 - s0) if weighting == "tokens" else 1))
    total = 0.0
    for k in sizes:
        num = den = 0.0
        for a in range(0, len(scored), k):
            run = scored[a:a + k]
            lq, lp, w = sum(x[0] for x in run), sum(x[1] for x in run), sum(x[2] for x in run)
            num += w * bernoulli(min(lp, 0.0) / temperature - eps, min(lq, 0.0) / temperature - eps, divergence)
            den += w
        total += (num / den if den else 0.0) / len(sizes)
    return total


def random_case(seed: int, n_s: int = 9, n_t: int = 7):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(n_s, generator=g, dtype=torch.float64) * 2
    t = -torch.rand(n_t, generator=g, dtype=torch.float64) * 2
    s[0] = t[0] = math.nan  # token 0 has no prediction
    # teacher tokens (src) vs student tokens (tgt); one group empty on the student side (a teacher special token)
    groups = np.array([[0, 1, 0, 1], [1, 2, 1, 3], [2, 4, 3, 4], [4, 5, 4, 4], [5, 6, 4, 7], [6, 7, 7, 9]])
    return s, t, groups


@pytest.mark.parametrize("divergence", ALM_DIVERGENCES)
@pytest.mark.parametrize("options", [dict(), dict(temperature=3.0), dict(sizes=(1, 2)), dict(weighting="chunks"),
                                     dict(mask=[True, True, False, True, True, True])])
def test_value_and_gradient_match_naive_loop(divergence, options):
    s, t, groups = random_case(0)
    kw = {"chunk_sizes" if k == "sizes" else "chunk_mask" if k == "mask" else k: v for k, v in options.items()}
    want = naive_alm(s.tolist(), t.tolist(), groups.tolist(), divergence=divergence, **options)
    x = s.clone().requires_grad_(True)
    got = alm_loss(x, t, groups, divergence=divergence, **kw)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)
    (grad,) = torch.autograd.grad(got, x)
    h, fd = 1e-6, torch.zeros_like(s)
    for j in range(1, s.shape[0]):  # token 0 is nan: no gradient
        up, down = s.clone(), s.clone()
        up[j] += h
        down[j] -= h
        fd[j] = (naive_alm(up.tolist(), t.tolist(), groups.tolist(), divergence=divergence, **options)
                 - naive_alm(down.tolist(), t.tolist(), groups.tolist(), divergence=divergence, **options)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=0, atol=1e-8)
    assert grad[0] == 0


def test_hand_computed_single_chunk():
    """One chunk of two student tokens (p = 0.5·0.4 = 0.2) against a teacher token of p = 0.5 (τ = 1, ε = 0)."""
    s = torch.tensor([math.log(0.5), math.log(0.4)], dtype=torch.float64)
    t = torch.tensor([math.log(0.5)], dtype=torch.float64)
    groups = np.array([[0, 1, 0, 2]])
    bce = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8))
    kl = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert alm_loss(s, t, groups, epsilon=0.0).item() == pytest.approx(bce, rel=1e-12)
    assert alm_loss(s, t, groups, divergence="kl", epsilon=0.0).item() == pytest.approx(kl, rel=1e-12)
    assert alm_loss(s, t, groups, divergence="kl", epsilon=0.0, reduction="sum").item() == pytest.approx(2 * kl)
    assert alm_loss(t, t, np.array([[0, 1, 0, 1]]), divergence="kl").abs().item() < 1e-12  # match: 0


def test_batch_order_and_teacher_detached():
    s1, t1, g1 = random_case(1)
    s2, t2, g2 = random_case(2)
    per = [naive_alm(s.tolist(), t.tolist(), g.tolist(), weighting="chunks") for s, t, g in ((s1, t1, g1), (s2, t2, g2))]
    got = alm_loss(torch.stack([s1, s2]), torch.stack([t1, t2]), [g1, g2], weighting="chunks", reduction="sum")
    n1 = sum(1 for a in g1.tolist() if a[1] > a[0] and a[3] > a[2] and a[0] > 0 and a[2] > 0)
    n2 = sum(1 for a in g2.tolist() if a[1] > a[0] and a[3] > a[2] and a[0] > 0 and a[2] > 0)
    assert got.item() == pytest.approx(per[0] * n1 + per[1] * n2, rel=1e-12)
    # the alignment the other way round (student = source) gives the same loss
    swapped = g1[:, [2, 3, 0, 1]]
    torch.testing.assert_close(alm_loss(s1, t1, swapped, teacher_is_source=False), alm_loss(s1, t1, g1))
    tt = t1.clone().requires_grad_(True)
    alm_loss(s1.clone().requires_grad_(True), tt, g1).backward()
    assert tt.grad is None
    assert alm_loss(s1, t1, g1, num_items=4).item() == pytest.approx(
        alm_loss(s1, t1, g1, reduction="sum").item() / 4)


def test_token_logprobs_shift_matches_model_rows():
    """Row i of a model predicts token i + 1: the cache's ``-gold_ce`` rows become token-indexed log-probs."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (6,), generator=g)
    logp = logits.log_softmax(-1)
    gold_ce = torch.stack([-logp[i, ids[i + 1]] for i in range(5)] + [torch.tensor(math.nan, dtype=torch.float64)])
    tok = token_logprobs(-gold_ce)
    assert math.isnan(tok[0])
    for j in range(1, 6):
        assert tok[j].item() == pytest.approx(logp[j - 1, ids[j]].item(), rel=1e-15)


def byte_two_pointer_groups(ends_a: list[int], ends_b: list[int]) -> list[tuple[int, int, int, int]]:
    """Groups of tokens ending at the same byte: advance the side whose current token ends first."""
    groups, i, j, a0, b0 = [], 0, 0, 0, 0
    while i < len(ends_a) and j < len(ends_b):
        if ends_a[i] < ends_b[j]:
            i += 1
        elif ends_a[i] > ends_b[j]:
            j += 1
        else:
            i, j = i + 1, j + 1
            groups.append((a0, i, b0, j))
            a0, b0 = i, j
    return groups


@pytest.mark.parametrize("pair", [("gpt2", "llama3"), ("qwen2.5", "gpt2")])
def test_chunks_from_real_alignments_are_the_exact_groups(pair, shared, shared_tokenizer):
    """On real tokenizers, ``align``'s groups are the chunks ALM needs — the token spans ending at the same byte
    (all exact) — and the loss over them equals the naive loop over the two-pointer chunks."""
    (ta, tb) = (shared_tokenizer(n) for n in pair)
    A, B = TokenTable.from_tokenizer(ta), TokenTable.from_tokenizer(tb)
    g = torch.Generator().manual_seed(4)
    for text in passages(shared, n=3, size=300):
        text = text.encode("ascii", "ignore").decode()  # ASCII: character offsets are byte offsets
        ea, eb = (tok(text, add_special_tokens=False, return_offsets_mapping=True) for tok in (ta, tb))
        al = align(ea.input_ids, eb.input_ids, A, B)
        want = byte_two_pointer_groups([e for _, e in ea.offset_mapping], [e for _, e in eb.offset_mapping])
        assert [tuple(x) for x in al.groups.tolist()] == want
        assert al.exact.all()
        assert (al.groups[:, 1] - al.groups[:, 0] > 1).any() or (al.groups[:, 3] - al.groups[:, 2] > 1).any()
        t = -torch.rand(len(ea.input_ids), generator=g, dtype=torch.float64) * 3
        s = -torch.rand(len(eb.input_ids), generator=g, dtype=torch.float64) * 3
        got = alm_loss(s, t, al, chunk_mask=al.exact, temperature=2.0)
        assert got.item() == pytest.approx(naive_alm(s.tolist(), t.tolist(), want, temperature=2.0), rel=1e-12)


def test_errors():
    s, t, groups = random_case(0)
    with pytest.raises(ValueError, match="divergence"):
        alm_loss(s, t, groups, divergence="js")
    with pytest.raises(ValueError, match="chunks must be alignment groups"):
        alm_loss(s, t, np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="teacher_is_source"):
        alm_loss(s[:4], t, groups)
    with pytest.raises(ValueError, match="chunk_mask"):
        alm_loss(s, t, groups, chunk_mask=[True])
    with pytest.raises(ValueError, match="chunk_sizes"):
        alm_loss(s, t, groups, chunk_sizes=(0,))
