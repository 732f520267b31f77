"""bench/onpolicy_quality.py: the whole benchmark at a toy size (every arm reports both metrics, a rerun resumes
without training again), and its metrics and verdict against values worked out independently."""

from __future__ import annotations

import json

import pytest

from bench.onpolicy_quality import (
    ARMS,
    REFERENCE,
    agreement,
    edit_similarity,
    first_word_match,
    main,
    rows_and_verdict,
    teacher_scores,
)


def test_toy_run_reports_every_arm_and_resumes(tmp_path, capsys):
    out = tmp_path / "q"
    results = main(["--size", "toy", "--seeds", "0", "--out", str(out), "--threads", "1"])
    for arm in (REFERENCE, *ARMS):
        r = results[(arm, 0)]
        for k in ("ll_per_byte", "ll_per_token"):  # a log-likelihood: finite and at most 0
            assert -50 < r[k] <= 0, (arm, k, r[k])
        assert 0 <= r["agree"] <= 1 and 0 <= r["word1"] <= 1, arm
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(x)["arm"] for x in lines if json.loads(x)["seed"] == 0} == {REFERENCE, *ARMS}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("SUMMARY: teacher ll/byte (agree): ")
    assert all(f"{arm} " in last for arm in ARMS)
    again = main(["--size", "toy", "--seeds", "0", "--out", str(out), "--threads", "1"])  # nothing left to do
    assert (out / "results.jsonl").read_text(encoding="utf-8").splitlines() == lines
    assert again[(ARMS[-1], 0)] == results[(ARMS[-1], 0)]


def test_edit_similarity_and_agreement_by_hand():
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # 2 substitutions + 1 insertion
    assert edit_similarity("", "") == 1.0 and edit_similarity("abc", "") == 0.0
    assert edit_similarity("abc", "abc") == 1.0 and edit_similarity("ab", "ba") == 0.0
    assert agreement(" " + "x" * 32 + "tail", "x" * 32 + "other") == 1.0  # stripped, first 32 characters only
    assert agreement("abcd", "abce", chars=3) == 1.0
    assert first_word_match("Sir, I", "Sir, you") and not first_word_match("Sir", "sir")
    assert not first_word_match("", "")


def test_teacher_scores_equal_the_models_own_loss(tiny_models):
    """The summed log-probabilities of the completion tokens equal −(HF's mean CE × tokens) of a forward with
    labels on exactly the completion tokens; bytes count the text plus one for the end token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.inputs import chat

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]).eval()
    ex = chat.Example("a", None, ({"role": "user", "content": "Continue: To be"},), None)
    text = "or not to bé"
    ll, n, nbytes = teacher_scores(model, tok, [ex], [text], [True])[0]
    p = chat.prompt_ids(tok, ex)
    c = tok(text, add_special_tokens=False)["input_ids"] + [chat.end_of_turn_id(tok)]
    ids = torch.tensor([p + c])
    labels = ids.clone()
    labels[0, :len(p)] = -100
    with torch.no_grad():
        ce = model(input_ids=ids, labels=labels).loss.item()
    assert n == len(c) and nbytes == len(text.encode("utf-8")) + 1 == 14
    assert ll == pytest.approx(-ce * len(c), rel=1e-5)
    ll2, n2, b2 = teacher_scores(model, tok, [ex], [text], [False])[0]  # cut: no end token
    assert n2 == len(c) - 1 and b2 == 13 and ll2 > ll


def _r(arm, seed, ll, agree):
    return {"arm": arm, "seed": seed, "ll_per_byte": ll, "ll_per_token": 2 * ll, "agree": agree, "word1": 0.5,
            "ended": 1.0, "mean_bytes": 30.0}


def test_verdict_needs_every_seed_and_more_than_the_spread():
    seeds = [0, 1, 2]
    res = {}
    for s, (off, l05, l1, seq) in enumerate([(-2.0, -1.9, -1.5, -2.1), (-2.1, -2.05, -1.6, -2.0),
                                             (-1.9, -2.0, -1.55, -1.95)]):
        for arm, ll in zip(ARMS, (off, seq, l05, l1), strict=True):
            res[(arm, s)] = _r(arm, s, ll, 0.3 + (0.2 if arm == "on-policy λ=1" else 0.0) + 0.01 * s)
        res[(REFERENCE, s)] = _r(REFERENCE, s, -3.0, 0.1)
    rows, paired, verdict = rows_and_verdict(res, seeds)
    assert [r[0] for r in rows] == [REFERENCE, *ARMS]
    assert rows[1][1] == "-2.0000 ± 0.1000"  # off-policy: mean of -2.0, -2.1, -1.9; half of their range
    l1 = next(x for x in paired if x.startswith("on-policy λ=1 − off-policy KD, ll_per_byte"))
    assert "per seed +0.5000 +0.5000 +0.3500" in l1 and "beats the spread" in l1
    l05 = next(x for x in paired if x.startswith("on-policy λ=0.5 − off-policy KD, ll_per_byte"))
    assert "per seed +0.1000 +0.0500 -0.1000" in l05 and "does not beat" in l05
    assert verdict.startswith("goal met: on-policy λ=1 ")
    for s in seeds:  # λ = 1 now wins on likelihood only
        res[("on-policy λ=1", s)]["agree"] = res[("off-policy KD", s)]["agree"]
    assert rows_and_verdict(res, seeds)[2] == ("goal partly met: only on-policy λ=1 on ll_per_byte beat "
                                               "off-policy KD by more than the seed spread")
