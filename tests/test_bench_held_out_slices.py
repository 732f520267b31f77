"""bench.held_out_slices on tiny stand-ins: the slices are the works' openings and middles, a teacher's score on
its training blocks read from its cache is its evaluated bits/byte on those texts, and every kept student is
scored and paired by seed."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import held_out_slices as hs
from bench.real_fusion import TEST_WORKS


@pytest.fixture(scope="module")
def corpus(shared):
    return shared / "corpus" / "shakespeare"


def test_slices_are_each_test_works_opening_and_middle(corpus):
    from stillroom.inputs.text import load_texts

    got = hs.slices(corpus, 300, 500)
    for w, opening, body in zip(TEST_WORKS, got["opening"], got["body"], strict=True):
        text = "".join(t for _, t in load_texts(corpus / w))
        assert opening == text[:300] and len(body) == 500
        assert text.index(body) == len(text) // 2


def test_a_teachers_score_on_its_blocks_is_its_cross_entropy_after_the_first_token(tiny_models, corpus, tmp_path):
    import math

    import torch

    from stillroom.evaluation import load_model
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher

    texts = [t[:400] for t in hs.slices(corpus, 2000, 10)["opening"][:3]]
    blocks = tmp_path / "train_blocks.jsonl"
    blocks.write_text("".join(json.dumps({"id": f"b{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    for name, model in (("smollm2", "gpt2-bpe-teacher"), ("gemma3", "llama-spm")):  # without / with a BOS
        write_cache(OnlineTeacher(str(tiny_models[model]), top_k=4), blocks, tmp_path / "cache" / name)
        m, tok = load_model(str(tiny_models[model]))
        nats = nbytes = 0.0
        for t in texts:  # the model run on each text: CE of every token after the first text token
            ids = tok(t, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                lp = m(ids).logits[0].log_softmax(-1)
            first = 1 if ids[0, 0] == tok.bos_token_id else 0
            for j in range(first + 1, ids.shape[1]):
                nats -= float(lp[j - 1, ids[0, j]])
                nbytes += len(tok.decode(ids[0, first:j + 1]).encode()) - len(tok.decode(ids[0, first:j]).encode())
        want = nats / math.log(2) / nbytes
        assert hs.teacher_on_blocks(tmp_path, name, str(tiny_models[model])) == pytest.approx(want, rel=2e-4)


def test_every_kept_student_is_scored_and_paired_by_seed(tiny_models, corpus, tmp_path):
    run = tmp_path / "rf"
    for seed in (0, 1):
        for arm, model in (("ce-only", "gpt2-bpe"), ("kd-x", "gpt2-bpe-teacher")):
            shutil.copytree(tiny_models[model], run / f"seed{seed}" / arm / "model")
    out = tmp_path / "out"
    hs.main(["--runs", str(run), "--opening-chars", "200", "--body-chars", "300", "--paired-with", "rf/ce-only",
             "--smollm2", str(tiny_models["gpt2-bpe-teacher"]), "--gemma3", str(tiny_models["llama-spm"]),
             "--corpus", str(corpus), "--threads", "1", "--out", str(out)])
    scores = json.loads((out / "scores-200-300.json").read_text())
    assert len(scores) == 2 * (2 + 4)  # two slices × (two teachers + four students)
    # the same weights score the same: the kd-x students are the teacher's folder
    for s in hs.SLICES:
        assert scores[f"rf/kd-x/seed0 {s}"] == scores[f"rf/kd-x/seed1 {s}"] == scores[f"teacher smollm2 {s}"]
    d = scores["rf/kd-x/seed1 body"] - scores["rf/ce-only/seed1 body"]
    md = (out / "report.md").read_text()
    assert f"1: {d:+.4f}" in md and "| rf/kd-x | 0, 1 |" in md
    mtime = (out / "scores-200-300.json").stat().st_mtime_ns  # a rerun scores nothing again
    hs.main(["--runs", str(run), "--opening-chars", "200", "--body-chars", "300", "--smollm2", str(tiny_models["gpt2-bpe-teacher"]), "--gemma3",
             str(tiny_models["llama-spm"]), "--corpus", str(corpus), "--threads", "1", "--out", str(out)])
    assert (out / "scores-200-300.json").stat().st_mtime_ns == mtime
