"""stillroom.teachers.alm_fusion: joint chunks by hand, the fused ALM term against a naive float64 loop (value and gradient),
and in the trainer: two ALM teachers become one ``alm/fused`` term equal to the naive loop on the same batch."""

from __future__ import annotations

import math
import random
import zlib

import numpy as np
import pytest
import torch

from stillroom.teachers.alm_fusion import fused_alm, joint_chunks


def test_joint_chunks_by_hand():
    # 6 student tokens. Teacher A cuts the student at 2, 3; teacher B at 2, 4: shared boundaries 0, 2, 6.
    a = np.array([[0, 1, 0, 2], [1, 3, 2, 3], [3, 4, 3, 6]])
    b = np.array([[0, 2, 0, 2], [2, 3, 2, 4], [3, 5, 4, 6]])
    s, t = joint_chunks([a, b], [None, None], 6)
    assert s.tolist() == [[0, 2], [2, 6]]
    assert t[0].tolist() == [[0, 1], [1, 4]]  # teacher A's tokens of each joint chunk
    assert t[1].tolist() == [[0, 2], [2, 5]]
    # a group a teacher does not keep removes the joint chunk around it (only it)
    s, t = joint_chunks([a, b], [np.array([True, False, True]), None], 6)
    assert s.tolist() == [[0, 2]] and t[:, 0].tolist() == [[0, 1], [0, 2]]
    # student tokens no chunk covers (merged chunks drop a trailing run) are in no joint chunk
    s, t = joint_chunks([a, np.array([[0, 2, 0, 2], [2, 3, 2, 4]])], [None, None], 6)
    assert s.tolist() == [[0, 2]] and t[1].tolist() == [[0, 2]]
    # a teacher group with no student token (a BOS) at a chunk's edge is left out, as alm_loss leaves it out
    c = np.array([[0, 1, 0, 0], [1, 2, 0, 2], [2, 3, 2, 6]])
    s, t = joint_chunks([a, c], [None, None], 6)
    assert s.tolist() == [[0, 2], [2, 6]] and t[1].tolist() == [[1, 2], [2, 3]]


def _random_groups(rng: random.Random, n_student: int) -> np.ndarray:
    """A random teacher-as-source partition: student cuts at random, 1–3 teacher tokens per group."""
    cuts = [c for c in range(1, n_student) if rng.random() < 0.8]
    bounds, out, t = [0, *cuts, n_student], [], 0
    for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
        k = rng.randint(1, 3)
        out.append((t, t + k, s0, s1))
        t += k
    return np.array(out, dtype=np.int64)


def _naive(s_lp, t_lps, groups, keeps, method, level, wt, tau, div, eps=1e-6):
    """Float64 loop over the joint chunks: boundary sets, chunk sums, CE per student token, weights, divergence."""
    S, n = len(s_lp), len(groups)
    common = set(range(S + 1))
    for g in groups:
        common &= {int(x) for row in g for x in (row[2], row[3]) if row[3] > row[2]}
    cuts = sorted(common)
    chunks = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        spans = []
        for g, k in zip(groups, keeps, strict=True):
            inside = [i for i, row in enumerate(g) if row[2] < b and row[3] > a]  # groups with student tokens here
            if sum(min(g[i][3], b) - max(g[i][2], a) for i in inside) != b - a:  # a student token no group covers
                break
            lo, hi = inside[0], inside[-1]
            if k is not None and not all(k[lo:hi + 1]):
                break
            spans.append((int(g[lo][0]), int(g[hi][1])))
        else:
            lq = sum(s_lp[j] for j in range(a, b))
            lps = [sum(t_lps[t][j] for j in range(*spans[t])) for t in range(n)]
            if all(math.isfinite(float(x)) for x in [lq, *lps]):
                chunks.append((b - a, lq, lps))
    if not chunks:
        return 0.0
    if level == "sequence":
        tot = sum(c[0] for c in chunks)
        seq_ce = [sum(-float(c[2][t]) for c in chunks) / tot for t in range(n)]
    total = 0.0
    for size, lq, lps in chunks:
        ce = seq_ce if level == "sequence" else [-float(x) / size for x in lps]
        if method == "min_ce":
            w = [1.0 if t == min(range(n), key=lambda i: ce[i]) else 0.0 for t in range(n)]
        elif method == "avg_ce":
            e = [math.exp(-c / wt) for c in ce]
            w = [x / sum(e) for x in e]
        else:
            w = [1 / n] * n
        lqh = min(lq, 0.0) / tau - eps
        for t in range(n):
            lph = min(float(lps[t]), 0.0) / tau - eps
            p, q = math.exp(lph), torch.exp(lqh)
            if div == "bce":
                d = -(p * lqh + (1 - p) * torch.log1p(-q))
            else:  # kl
                d = p * (lph - lqh) + (1 - p) * (math.log1p(-p) - torch.log1p(-q))
            total = total + size * w[t] * d
    return total


@pytest.mark.parametrize("method", ["min_ce", "avg_ce", "mean"])
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("div,tau", [("bce", 1.0), ("kl", 3.0)])
def test_fused_alm_matches_a_naive_loop_value_and_gradient(method, level, div, tau):
    rng = random.Random(zlib.crc32(f"{method} {level} {div}".encode()))
    torch.manual_seed(rng.randint(0, 999))
    S = 30
    groups = [_random_groups(rng, S) for _ in range(3)]
    keeps = [np.array([rng.random() > 0.15 for _ in g]) for g in groups]
    keeps[1] = None
    t_lps = [-torch.rand(int(g[-1, 1]), dtype=torch.float64) * 2.0 for g in groups]
    t_lps[0][0] = float("nan")  # token 0 has no prediction: chunks holding it are not scored
    s_lp = (-torch.rand(S, dtype=torch.float64) * 2.0).requires_grad_()
    got, w, spans = fused_alm(s_lp, t_lps, groups, keeps, method=method, level=level, weight_temperature=0.7,
                              temperature=tau, divergence=div)
    want = _naive(s_lp, t_lps, groups, keeps, method, level, 0.7, tau, div)
    assert len(spans) >= 1 and float(want) > 0
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    torch.testing.assert_close(w.sum(0), torch.ones(w.shape[1], dtype=w.dtype))
    (g_got,) = torch.autograd.grad(got, s_lp)
    (g_want,) = torch.autograd.grad(want, s_lp)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-9)


def test_min_ce_sequence_follows_the_better_teacher_and_one_teacher_is_plain_alm():
    from stillroom.losses import alm_loss

    g = np.array([[0, 1, 0, 1], [1, 2, 1, 3], [2, 4, 3, 4]])
    good = torch.tensor([float("nan"), -0.1, -0.2, -0.1], dtype=torch.float64)
    bad = good - 1.0
    s = torch.tensor([float("nan"), -0.5, -0.7, -0.3], dtype=torch.float64)
    both, w, _ = fused_alm(s, [bad, good], [g, g], method="min_ce")
    assert w[:, 0].tolist() == [0.0, 1.0]
    alone = alm_loss(s, good, g, reduction="sum")  # one teacher: its own chunks, token-weighted
    assert float(both) == pytest.approx(float(alone), rel=1e-12)
    assert float(fused_alm(s, [good], [g])[0]) == pytest.approx(float(alone), rel=1e-12)


def test_fused_alm_refuses_mismatched_inputs():
    g = np.array([[0, 1, 0, 1]])
    with pytest.raises(ValueError, match="one of each per teacher"):
        fused_alm(torch.zeros(1), [torch.zeros(1)], [g, g])
    with pytest.raises(ValueError, match="reach student token 1 of a sequence of 0"):
        fused_alm(torch.zeros(0), [torch.zeros(1)], [g])
    with pytest.raises(ValueError, match="level"):
        fused_alm(torch.tensor([float("nan"), -1.0]), [torch.tensor([float("nan"), -1.0])],
                  [np.array([[0, 1, 0, 1], [1, 2, 1, 2]])], level="chunk")


# --- in the trainer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,level,chunks", [("min_ce", "sequence", "exact"), ("avg_ce", "token", "exact"),
                                                  ("min_ce", "token", "unbiased")])
def test_two_alm_teachers_are_one_fused_term_equal_to_the_naive_loop(method, level, chunks, tiny_models, tmp_path):
    """A cross-tokenizer (llama-spm) and a same-tokenizer (gpt2-bpe-teacher) ALM teacher: one ``alm/fused`` term,
    equal to the naive loop over their own-token log-probs (dense teacher forwards written here); with unbiased
    chunks, over each teacher's merged chunks (stillroom.tokenization.unbiased, tested on its own)."""
    from test_objectives import SEQ, _alignments, _dense, _raw, _teacher_rows, _trainer

    from stillroom.teachers.objectives import FusedALM
    from stillroom.testing import corpus_texts

    d = tmp_path / "data"
    d.mkdir()
    (d / "train.txt").write_text(corpus_texts("train")[0][:6000], encoding="utf-8")
    specs = [{"path": str(tiny_models[n]), "objective": "alm", "alm_temperature": 4.0, "weight": 0.5, "name": n,
              "alm_chunks": chunks} for n in ("llama-spm", "gpt2-bpe-teacher")]
    raw = _raw(tiny_models, d, tmp_path / "out", specs, lam=0.5)
    raw["fusion"] = {"method": method, "level": level, "weight_temperature": 0.5}
    tr, batch, toks = _trainer(raw)
    assert len(tr.extra) == 1 and isinstance(tr.extra[0], FusedALM)
    loss = tr.compute_loss(tr.model.train(), batch)
    tr.log({"loss": float(loss.detach())})
    logged = tr.state.log_history[-1]

    logp = _dense(tr, batch)
    total, n = 0.0, 0
    aligned = [_alignments(batch, toks, t_tok) for t_tok in toks.teacher_tokenizers]
    merged = [m.chunks(m.aligned(batch)) for m in tr.extra[0].members]  # (groups, masks) per teacher
    for r in range(len(batch["text"])):
        lab = batch["labels"][r]
        S = int(batch["attention_mask"][r].sum())
        s_lp = [float("nan")] + [logp[r, j - 1, lab[j]] if lab[j] != -100 else float("nan") for j in range(1, S)]
        n += sum(1 for j in range(1, SEQ) if lab[j] != -100)
        t_lps = []
        for name, t_tok in zip(("llama-spm", "gpt2-bpe-teacher"), toks.teacher_tokenizers, strict=True):
            ids, t_lp = _teacher_rows(tiny_models[name], t_tok, batch["text"][r])
            t_lps.append([float("nan")] + [float(t_lp[j - 1, ids[j]]) for j in range(1, len(ids))])
        if chunks == "exact":
            groups, keeps = [a[r].groups for a in aligned], [a[r].exact for a in aligned]
        else:
            groups, keeps = [g[r] for g, _ in merged], [m[r] for _, m in merged]
            assert len(groups[0]) < len(aligned[0][r].groups)  # cross-tokenizer: merged (same tokenizer: not)
            assert len(groups[1]) == len(aligned[1][r].groups)
        total = total + _naive(s_lp, t_lps, groups, keeps, method, level, 0.5, 4.0, "bce")
    assert float(total) > 0
    assert logged["alm/fused"] == pytest.approx(float(total) / n, rel=1e-4)
    assert logged["loss"] == pytest.approx(0.5 * logged["ce"] + 0.5 * logged["alm/fused"], rel=1e-5)


def test_fused_alm_teachers_must_share_their_options(tiny_models, tmp_path):
    from stillroom.testing import corpus_texts
    from stillroom.training.recipe import RecipeError, load_recipe

    (tmp_path / "t.txt").write_text(corpus_texts("train")[0][:2000], encoding="utf-8")
    t = [{"path": str(tiny_models["llama-spm"]), "objective": "alm"},
         {"path": str(tiny_models["gpt2-bpe-teacher"]), "objective": "alm", "alm_temperature": 2.0}]
    with pytest.raises(RecipeError, match=r"teachers\.1: ALM teachers are fused .*set the same values"):
        load_recipe({"student": str(tiny_models["gpt2-bpe"]), "teachers": t, "data": {"train": str(tmp_path / "t.txt")},
                     "train": {"output_dir": str(tmp_path / "o")}})
