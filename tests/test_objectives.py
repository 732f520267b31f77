"""ALM / ULD teachers in the trainer (stillroom.teachers.objectives), against hand-written references on the same batch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stillroom.testing import corpus_texts
from stillroom.training.recipe import load_recipe

SEQ = 48


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("obj-data")
    (d / "train.txt").write_text(corpus_texts("train")[0][:6000], encoding="utf-8")
    (d / "val.txt").write_text(corpus_texts("validation")[0][:800], encoding="utf-8")
    return d


def _raw(tiny_models, data_dir, out, teachers, lam=0.5):
    return {"student": str(tiny_models["gpt2-bpe"]), "teachers": teachers,
            "data": {"train": str(data_dir / "train.txt"), "seq_len": SEQ},
            "loss": {"ce_weight": lam},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 3, "logging_steps": 1,
                      "progress": False, "plot": False, "lr": 1e-3, "lr_scheduler": "constant"}}


def _trainer(raw):
    from stillroom.inputs import BlockCollator, BlockDataset
    from stillroom.models.student import build_student
    from stillroom.training import DistillTrainer, build_teachers, make_plan, training_blocks
    from stillroom.training.run import training_arguments

    plan = make_plan(load_recipe(raw))
    r, tok = plan.recipe, plan.student_tokenizer
    blocks = training_blocks(r, tok)
    student = build_student(r.student, tok)
    for m in student.modules():  # deterministic forwards (the fixture GPT-2 has dropout 0.1)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    tr = DistillTrainer(model=student, args=training_arguments(r, False), train_dataset=BlockDataset(blocks),
                        data_collator=BlockCollator(tok, SEQ), teachers=build_teachers(plan), loss=r.loss,
                        fusion=r.fusion)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
    return tr, batch, plan


def _dense(tr, batch):
    m = tr.model.train()
    return m(**{k: batch[k] for k in ("input_ids", "position_ids")}).logits.double().log_softmax(-1)


def _teacher_rows(path, tok, text):
    """Teacher token ids and dense log-probs [T, V] of its own tokenization of ``text`` (by hand)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor(tok(text)["input_ids"])
    with torch.no_grad():
        return ids, model(input_ids=ids[None]).logits[0].double().log_softmax(-1)


def _alignments(batch, toks, t_tok):
    from stillroom.tokenization.align import align
    from stillroom.tokenization.tokens import TokenTable

    st, tt = TokenTable.from_tokenizer(toks.student_tokenizer), TokenTable.from_tokenizer(t_tok)
    out = []
    for r, text in enumerate(batch["text"]):
        sid = batch["input_ids"][r][batch["attention_mask"][r].bool()]
        out.append(align(t_tok(text)["input_ids"], sid.numpy(), tt, st))
    return out


def _naive_alm(s_tok_lp, t_tok_lp, al, tau=1.0, eps=1e-6):
    """Per-chunk loop: log-likelihood sums, Bernoulli BCE, weighted by student tokens; exact groups only."""
    total = 0.0
    for (t0, t1, s0, s1), ex in zip(al.groups.tolist(), al.exact.tolist(), strict=True):
        if not ex or t1 <= t0 or s1 <= s0 or t0 == 0 or s0 == 0:  # token 0 has no prediction on either side
            continue
        lq = sum(s_tok_lp[j] for j in range(s0, s1)) / tau - eps
        lp = float(sum(t_tok_lp[j] for j in range(t0, t1))) / tau - eps
        p = math.exp(lp)
        total = total - (p * lq + (1 - p) * torch.log(-torch.expm1(lq))) * (s1 - s0)
    return total


@pytest.mark.parametrize("lam,tau", [(0.0, 4.0), (0.5, 1.0)])
def test_alm_training_step_equals_a_hand_computed_loss_and_its_gradient(lam, tau, tiny_models, data_dir, tmp_path):
    """λ = 0 isolates the ALM term (pure distillation); τ = 4 makes its chunks' likelihoods large enough to matter
    for these untrained models (at τ = 1 chunk probabilities are ~1e-3 and the term is small)."""
    t = tiny_models["llama-spm"]
    spec = {"path": str(t), "objective": "alm", "alm_temperature": tau, "weight": 1.0 - lam}
    tr, batch, toks = _trainer(_raw(tiny_models, data_dir, tmp_path, [spec], lam=lam))
    got = tr.compute_loss(tr.model.train(), batch)
    got.backward()
    g_got = tr.model.get_output_embeddings().weight.grad.clone()
    tr.model.zero_grad()

    t_tok = toks.teacher_tokenizers[0]
    logp = _dense(tr, batch)
    ce, alm, n = 0.0, 0.0, 0
    for r, al in enumerate(_alignments(batch, toks, t_tok)):
        lab = batch["labels"][r]
        s_tok = {j: logp[r, j - 1, lab[j]] for j in range(1, SEQ) if lab[j] != -100}
        ce = ce - sum(s_tok.values())
        n += len(s_tok)
        ids, t_lp = _teacher_rows(t, t_tok, batch["text"][r])
        t_tok_lp = {j: t_lp[j - 1, ids[j]] for j in range(1, len(ids))}
        alm = alm + _naive_alm(s_tok, t_tok_lp, al, tau)
    want = (lam * ce + (1 - lam) * alm) / n
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert float(alm) > 0
    want.backward()
    g_want = tr.model.get_output_embeddings().weight.grad
    assert g_got.abs().sum() > 0
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-3, atol=1e-7)


def _naive_uld(logp, batch, toks, t, k):
    """Σ over one-to-one exact pairs of L1 between sorted teacher top-k (+ tail bucket) and sorted student."""
    total, pairs = 0.0, 0
    t_tok = toks.teacher_tokenizers[0]
    for r, al in enumerate(_alignments(batch, toks, t_tok)):
        lab = batch["labels"][r]
        _, t_lp = _teacher_rows(t, t_tok, batch["text"][r])
        for (t0, t1, s0, s1), ex in zip(al.groups.tolist(), al.exact.tolist(), strict=True):
            if not ex or t1 - t0 != 1 or s1 - s0 != 1 or t0 == 0 or s0 == 0 or lab[s0] == -100:
                continue
            p = sorted(t_lp[t0 - 1].exp().tolist(), reverse=True)[:k]  # teacher top-k, rest = one tail bucket
            q = logp[r, s0 - 1].exp().sort(descending=True).values
            total = total + sum(abs(q[i] - p[i]) for i in range(k)) + abs((1 - q[:k].sum()) - (1 - sum(p)))
            pairs += 1
    return total, pairs


def test_each_alm_and_uld_term_is_logged_per_token_next_to_ce(tiny_models, data_dir, tmp_path):
    """``alm/NAME`` and ``uld/NAME`` are each teacher's unweighted term per labelled token, computed here by the
    naive loops; with ``ce`` they add up to ``loss`` (λ·ce + Σ w_i·D_i)."""
    t = tiny_models["llama-spm"]
    raw = _raw(tiny_models, data_dir, tmp_path, [
        {"path": str(t), "objective": "alm", "alm_temperature": 4.0, "weight": 0.3, "name": "spm-alm"},
        {"path": str(t), "objective": "uld", "weight": 0.2, "name": "spm-uld"}], lam=0.5)
    raw["fusion"] = {"top_k": 5}
    tr, batch, toks = _trainer(raw)
    loss = tr.compute_loss(tr.model.train(), batch)
    tr.log({"loss": float(loss.detach())})
    logged = tr.state.log_history[-1]

    logp = _dense(tr, batch)
    ce, alm, n = 0.0, 0.0, 0
    t_tok = toks.teacher_tokenizers[0]
    for r, al in enumerate(_alignments(batch, toks, t_tok)):
        lab = batch["labels"][r]
        s_tok = {j: logp[r, j - 1, lab[j]] for j in range(1, SEQ) if lab[j] != -100}
        ce, n = ce - sum(s_tok.values()), n + len(s_tok)
        ids, t_lp = _teacher_rows(t, t_tok, batch["text"][r])
        alm = alm + _naive_alm(s_tok, {j: t_lp[j - 1, ids[j]] for j in range(1, len(ids))}, al, 4.0)
    uld, pairs = _naive_uld(logp, batch, toks, t, 5)
    assert pairs > 10 and float(alm) > 0
    assert logged["ce"] == pytest.approx(float(ce) / n, rel=1e-5)
    assert logged["alm/spm-alm"] == pytest.approx(float(alm) / n, rel=1e-5)
    assert logged["uld/spm-uld"] == pytest.approx(float(uld) / n, rel=1e-4)
    assert logged["loss"] == pytest.approx(0.5 * logged["ce"] + 0.3 * logged["alm/spm-alm"]
                                           + 0.2 * logged["uld/spm-uld"], rel=1e-5)
    assert "kd" not in logged  # no kd teacher: no fused term


def test_kd_is_still_logged_next_to_an_alm_term(tiny_models, data_dir, tmp_path):
    """kd = (loss − λ·ce − w·alm) / (1 − λ), recomputed from the logged parts and from the fused target alone."""
    from stillroom.losses import fused_linear_distill_loss
    from stillroom.targets import SparseTarget

    t = str(tiny_models["llama-spm"])
    tr, batch, _ = _trainer(_raw(tiny_models, data_dir, tmp_path, [
        {"path": t, "name": "kd"}, {"path": t, "objective": "alm", "weight": 0.25, "alm_temperature": 4.0, "name": "a"}], lam=0.6))
    loss = tr.compute_loss(tr.model.train(), batch)
    tr.log({"loss": float(loss.detach())})
    logged = tr.state.log_history[-1]
    assert logged["loss"] == pytest.approx(0.6 * logged["ce"] + 0.4 * logged["kd"] + 0.25 * logged["alm/a"],
                                           rel=1e-5)
    with torch.no_grad():  # the fused term alone (ce_weight 0), on the same batch and weights
        fused = tr.fused_target(batch)
        hidden = tr.model(**{k: batch[k] for k in ("input_ids", "position_ids")}, output_hidden_states=True
                          ).hidden_states[-1][:, :-1]
        B, T = batch["labels"].shape
        lab = batch["labels"][:, 1:]
        tgt = SparseTarget(fused.ids[:, : T - 1].reshape(B * (T - 1), -1),
                           fused.logprobs[:, : T - 1].reshape(B * (T - 1), -1), fused.tail[:, : T - 1].reshape(-1),
                           (fused.valid[:, : T - 1] & lab.ne(-100)).reshape(-1))
        kd = fused_linear_distill_loss(hidden.reshape(B * (T - 1), -1), tr.model.get_output_embeddings().weight,
                                       target=tgt, labels=lab.reshape(-1), ce_weight=0.0, kind="forward_kl",
                                       reduction="sum")
    assert logged["kd"] == pytest.approx(float(kd) / int(lab.ne(-100).sum()), rel=1e-3)


def test_alm_unbiased_chunks_are_merged_groups_ending_at_unbiased_boundaries(tiny_models, data_dir, tmp_path):
    """``alm_chunks: unbiased``: the chunks are the exact groups merged up to the boundaries a BoundaryBias built
    here (unigram counts of the whole training text) calls unbiased, and the ALM step equals the naive loop on them."""
    from types import SimpleNamespace

    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.unbiased import BoundaryBias, unbiased_boundaries, unigram_probs

    t = tiny_models["llama-spm"]
    spec = {"path": str(t), "objective": "alm", "alm_chunks": "unbiased", "alm_temperature": 4.0, "weight": 1.0}
    tr, batch, toks = _trainer(_raw(tiny_models, data_dir, tmp_path, [spec], lam=0.0))
    s_tok, t_tok = toks.student_tokenizer, toks.teacher_tokenizers[0]
    text = (data_dir / "train.txt").read_text(encoding="utf-8")
    st, tt = TokenTable.from_tokenizer(s_tok), TokenTable.from_tokenizer(t_tok)
    rule = BoundaryBias(tt, st, unigram_probs(t_tok, [text], len(tt.token_bytes)),
                        unigram_probs(s_tok, [text], len(st.token_bytes)), t_tok, s_tok)
    got = tr.compute_loss(tr.model.train(), batch)
    logp = _dense(tr, batch)
    pairs = tr.extra[0].aligned(batch)
    groups, masks = tr.extra[0].chunks(pairs)
    want, n, merged = 0.0, 0, 0
    for r, (al, g, m) in enumerate(zip(_alignments(batch, toks, t_tok), groups, masks, strict=True)):
        ok = unbiased_boundaries(al.groups, al.src_ids, al.tgt_ids, rule)
        ends = {(int(a), int(b)) for (_, a, _, b), o in zip(al.groups, ok, strict=True) if o}
        starts = {(0, 0)} | ends
        assert 0 < len(g) < len(al.groups)  # merged: fewer chunks than groups, but some
        for t0, t1, s0, s1 in g.tolist():  # each chunk runs from an unbiased boundary to the next one
            assert (t0, s0) in starts and (t1, s1) in ends
            assert not any(t0 < a < t1 for a, _ in ends)  # and none inside it
            merged += 1
        lab = batch["labels"][r]
        s_lp = {j: logp[r, j - 1, lab[j]] for j in range(1, SEQ) if lab[j] != -100}
        n += len(s_lp)
        ids, t_lp = _teacher_rows(t, t_tok, batch["text"][r])
        want = want + _naive_alm(s_lp, {j: t_lp[j - 1, ids[j]] for j in range(1, len(ids))},
                                 SimpleNamespace(groups=g, exact=m), 4.0)
    assert merged > 10 and float(want) > 0
    assert float(got.detach()) == pytest.approx(float(want.detach()) / n, rel=1e-5)


def test_alm_chunks_are_the_exact_alignment_groups(tiny_models, data_dir, tmp_path):
    """The trainer's chunks are stillroom.tokenization.align's groups of the teacher's and the student's tokenizations."""
    tr, batch, toks = _trainer(_raw(tiny_models, data_dir, tmp_path,
                                    [{"path": str(tiny_models["llama-spm"]), "objective": "alm"}]))
    pairs = tr.extra[0].aligned(batch)
    for r, ((out, al), ref) in enumerate(zip(pairs, _alignments(batch, toks, toks.teacher_tokenizers[0]), strict=True)):
        assert out.input_ids.tolist() == toks.teacher_tokenizers[0](batch["text"][r])["input_ids"]
        assert (al.groups == ref.groups).all() and (al.exact == ref.exact).all()
        assert 0 < al.exact.sum() <= len(al.exact)


def test_alm_from_the_cache_equals_alm_online(tiny_models, data_dir, tmp_path):
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.training.data import export_training_blocks

    t = str(tiny_models["llama-spm"])
    raw = _raw(tiny_models, data_dir, tmp_path / "o", [{"path": t, "objective": "alm", "weight": 2.0}])
    export_training_blocks(load_recipe(raw), tmp_path / "blocks.jsonl")
    write_cache(OnlineTeacher(t, top_k=1), tmp_path / "blocks.jsonl", tmp_path / "cache", progress=False)
    online, batch, _ = _trainer(raw)
    raw["teachers"][0]["cache"] = str(tmp_path / "cache")
    cached, _, _ = _trainer(raw)
    cached.model.load_state_dict(online.model.state_dict())
    a = online.compute_loss(online.model.train(), batch)
    b = cached.compute_loss(cached.model.train(), batch)
    assert float(a) == pytest.approx(float(b), rel=2e-3)  # the cache stores gold_ce in float16


def test_uld_training_step_equals_a_naive_sorted_probability_loss(tiny_models, data_dir, tmp_path):
    t = tiny_models["llama-spm"]
    raw = _raw(tiny_models, data_dir, tmp_path, [{"path": str(t), "objective": "uld", "weight": 0.3}], lam=0.7)
    raw["fusion"] = {"top_k": 5}
    tr, batch, toks = _trainer(raw)
    got = tr.compute_loss(tr.model.train(), batch)
    logp = _dense(tr, batch)
    ce, n = 0.0, 0
    for r in range(len(batch["text"])):
        lab = batch["labels"][r]
        ce = ce - sum(logp[r, j - 1, lab[j]] for j in range(1, SEQ) if lab[j] != -100)
        n += int((lab[1:] != -100).sum())
    uld, pairs = _naive_uld(logp, batch, toks, t, 5)
    assert pairs > 10
    want = (0.7 * ce + 0.3 * uld) / n
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    got.backward()
    assert tr.model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_own_logprobs_value_and_gradient_match_log_softmax():
    from stillroom.losses.own_logprob import own_logprobs

    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (13,), generator=g)
    y[4] = -100
    got = own_logprobs(h, w, y, chunk_size=5)
    assert torch.isnan(got[4])
    ref = (h @ w.T).log_softmax(-1).gather(1, y.clamp_min(0)[:, None])[:, 0]
    keep = y != -100
    torch.testing.assert_close(got[keep].double(), ref[keep], rtol=1e-5, atol=1e-5)
    c = torch.randn(13, dtype=torch.float64, generator=g)
    gh, gw = torch.autograd.grad((got[keep] * c[keep]).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref[keep] * c[keep]).sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


def test_alm_and_kd_teachers_train_together(tiny_models, data_dir, tmp_path):
    from stillroom.training.run import train

    t = str(tiny_models["llama-spm"])
    raw = _raw(tiny_models, data_dir, tmp_path / "out", [{"path": t, "name": "kd"},
                                                        {"path": t, "name": "alm", "objective": "alm",
                                                         "alm_chunks": "all", "alm_divergence": "kl"}])
    res = train(raw)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert res.metrics


@pytest.mark.parametrize("teacher,lam,match", [
    ({"weight": 0.5}, 0.5, r"weight set but objective is 'kd'"),
    ({"objective": "uld", "alm_temperature": 2.0}, 0.5, r"alm_temperature set but objective is 'uld'"),
    ({"objective": "alm"}, 1.0, r"teachers.0.weight: objective 'alm' with loss.ce_weight=1.0"),
    ({"objective": "alm", "alm_chunks": "some"}, 0.5, r"alm_chunks"),
    ({"objective": "ctc"}, 0.5, r"objective"),
])
def test_recipe_rejects_bad_objective_settings(teacher, lam, match, tiny_models, data_dir, tmp_path):
    raw = _raw(tiny_models, data_dir, tmp_path, [{"path": str(tiny_models["llama-spm"]), **teacher}], lam=lam)
    with pytest.raises(ValueError, match=match):
        load_recipe(raw)


def _group_starts(tr, batch, toks, t, k):
    """The looped reference's walk shared by the term objectives: (CE sum, labelled count, [(teacher top-k at the
    row before each group, the student's probabilities at the row before it)]) over every group past token 0."""
    t_tok = toks.teacher_tokenizers[0]
    logp = _dense(tr, batch)
    ce, n, rows = 0.0, 0, []
    for r, al in enumerate(_alignments(batch, toks, t_tok)):
        lab = batch["labels"][r]
        ce = ce - sum(logp[r, j - 1, lab[j]] for j in range(1, SEQ) if lab[j] != -100)
        n += int((lab[1:] != -100).sum())
        _, t_lp = _teacher_rows(t, t_tok, batch["text"][r])
        for t0, _, s0, _ in al.groups.tolist():
            if t0 == 0 or s0 == 0 or lab[s0] == -100:
                continue
            rows.append((t_lp[t0 - 1].topk(k), logp[r, s0 - 1].exp()))
    return ce, n, rows


def test_xtoken_training_step_equals_a_dense_loss_in_the_teacher_vocabulary(tiny_models, data_dir, tmp_path):
    """objective: xtoken — at every alignment group past token 0, the teacher's dense top-k (+ tail, ids no student
    token reaches moved to it) against softmax(student) @ W, summed; W is the map (tested in tests/test_reverse.py)."""
    from stillroom.tokenization.reverse import reverse_map
    from stillroom.tokenization.tokens import TokenTable

    t = tiny_models["llama-spm"]
    raw = _raw(tiny_models, data_dir, tmp_path, [{"path": str(t), "objective": "xtoken", "weight": 0.4,
                                                  "name": "spm-x"}], lam=0.6)
    raw["fusion"] = {"top_k": 5}
    tr, batch, toks = _trainer(raw)
    got = tr.compute_loss(tr.model.train(), batch)
    tr.log({"loss": float(got.detach())})
    logged = tr.state.log_history[-1]
    got.backward()
    g_got = tr.model.get_output_embeddings().weight.grad.clone()
    tr.model.zero_grad()

    t_tok = toks.teacher_tokenizers[0]
    w = reverse_map(TokenTable.from_tokenizer(toks.student_tokenizer), TokenTable.from_tokenizer(t_tok),
                    t_tok).dense().double()
    reach = w.sum(0) > 0
    ce, n, rows = _group_starts(tr, batch, toks, t, 5)
    x, pairs = 0.0, len(rows)
    for top, p_s in rows:
        q = p_s @ w
        keep = reach[top.indices]
        p_k, q_k = top.values.exp()[keep], q[top.indices][keep]
        p_tail, q_tail = 1 - p_k.sum(), 1 - q_k.sum()
        x = x + (p_k * (p_k.log() - q_k.log())).sum() + p_tail * (p_tail.log() - q_tail.log())
    assert pairs > 20
    want = (0.6 * ce + 0.4 * x) / n
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    assert logged["xtoken/spm-x"] == pytest.approx(float(x.detach()) / n, rel=1e-4)
    want.backward()
    g_want = tr.model.get_output_embeddings().weight.grad
    assert g_got.abs().sum() > 0
    torch.testing.assert_close(g_got.double(), g_want.double(), rtol=1e-3, atol=1e-7)


def test_hybrid_training_step_equals_a_looped_gold_hybrid(tiny_models, data_dir, tmp_path):
    """objective: hybrid — at every group start the teacher's dense top-k: ids whose bytes are a student token
    compared with it (+ one bucket for the rest), the others sorted against the student's largest probabilities
    among its tokens without a twin, weighted by their teacher mass."""
    from stillroom.tokenization.tokens import TokenTable

    t = tiny_models["llama-spm"]
    raw = _raw(tiny_models, data_dir, tmp_path, [{"path": str(t), "objective": "hybrid", "weight": 0.3,
                                                  "name": "spm-h"}], lam=0.7)
    raw["fusion"] = {"top_k": 5}
    tr, batch, toks = _trainer(raw)
    got = tr.compute_loss(tr.model.train(), batch)
    tr.log({"loss": float(got.detach())})
    logged = tr.state.log_history[-1]

    t_tok = toks.teacher_tokenizers[0]
    st, tt = TokenTable.from_tokenizer(toks.student_tokenizer), TokenTable.from_tokenizer(t_tok)
    by_bytes = {}
    for s, b in enumerate(st.token_bytes):
        if b and not st.is_special[s]:
            by_bytes[b] = s
    twin = {}
    for i, b in enumerate(tt.token_bytes):
        if b and not tt.is_special[i] and b in by_bytes and by_bytes[b] not in twin.values():
            twin[i] = by_bytes[b]
    unmatched = [s for s, b in enumerate(st.token_bytes) if b and not st.is_special[s] and s not in twin.values()]
    ce, n, rows = _group_starts(tr, batch, toks, t, 5)
    h = 0.0
    zero = torch.zeros((), dtype=torch.float64)
    for top, q in rows:
        pm, qm, pu = [], [], []
        for v, i in zip(top.values.exp(), top.indices.tolist(), strict=True):
            if i in twin:
                pm.append(v)
                qm.append(q[twin[i]])
            else:
                pu.append(v)
        rest_p, rest_q = 1 - sum(pm, zero), 1 - sum(qm, zero)
        kl = sum((a * (a.log() - b.log()) for a, b in zip(pm, qm, strict=True)), zero)
        kl = kl + rest_p * (rest_p.log() - rest_q.log())
        qs = q[unmatched].sort(descending=True).values
        ps = sorted(pu, reverse=True)
        l1 = sum((abs((qs[i] if i < len(qs) else 0) - ps[i]) for i in range(len(ps))), zero)
        h = h + kl + sum(pu, zero) * l1
    want = (0.7 * ce + 0.3 * h) / n
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-4)
    assert logged["hybrid/spm-h"] == pytest.approx(float(h.detach()) / n, rel=1e-4)
