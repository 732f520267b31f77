"""bench.target_shapes: a row's statistics by hand, and the means over a real cache equal the ones computed from the
teacher model's own forward pass."""

from __future__ import annotations

import json
import math

import pytest

from bench import target_shapes as ts


def test_row_statistics_by_hand():
    q = {3: 0.5, 7: 0.25}  # mass 0.75, tail 0.25 over the other 8 ids of a 10-id vocabulary
    st, bits = ts.row_stats(q, gold=7, vocab_size=10)
    assert st == {"mass": 0.75, "top-1": 0.5, "top-1 = gold": 0.0, "q(gold)": 0.25,
                  "entropy": pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))}
    assert bits == pytest.approx(2.0)
    st, bits = ts.row_stats(q, gold=5, vocab_size=10)
    assert st["q(gold)"] == 0.0 and bits == pytest.approx(-math.log2(0.25 / 8))
    assert ts.total_variation({1: 0.5, 2: 0.5}, {2: 0.25, 3: 0.75}) == pytest.approx(0.5 * (0.5 + 0.25 + 0.75))


def test_match_entropy_by_hand():
    """{0.8, 0.2} tempered to {0.6, 0.4}: 4^(1/T) = 1.5, so T = ln 4 / ln 1.5."""
    rows = [(0, 1, {"a": {0: 0.8, 1: 0.2}})]
    goal = -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4))
    assert ts.mean_entropy(rows, "a") == pytest.approx(-(0.8 * math.log2(0.8) + 0.2 * math.log2(0.2)))
    assert ts.match_entropy(rows, "a", goal) == pytest.approx(math.log(4) / math.log(1.5), rel=1e-3)
    with pytest.raises(ValueError, match="no support temperature"):
        ts.match_entropy(rows, "a", 1.5)  # above the uniform's 1 bit


def test_means_over_a_cache_are_the_teachers_own_top_k(tiny_models, shared, tmp_path):
    import torch

    from stillroom.evaluation import load_model
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher

    folder = tiny_models["gpt2-bpe-teacher"]
    text = (shared / "corpus" / "shakespeare" / "othello_gut.txt").read_text(encoding="utf-8")
    texts = [text[5000 + 700 * i: 5300 + 700 * i] for i in range(3)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_blocks.jsonl").write_text("".join(json.dumps({"id": f"b{i}", "text": t}) + "\n"
                                                    for i, t in enumerate(texts)))
    write_cache(OnlineTeacher(str(folder), top_k=4), run / "train_blocks.jsonl", run / "cache" / "t")
    out = tmp_path / "out"
    ts.main(["--blocks-from", str(run), "--blocks", "3", "--target", f"t={run / 'cache' / 't'}",
             "--student", str(folder), "--soften", "t=2", "--match-entropy", "t@2", "--out", str(out)])
    model, tok = load_model(str(folder))
    mass = qg = n = 0.0
    for t in texts:  # the model's own softmax, its top-4, on every row that predicts a token with bytes
        ids = tok(t, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = model(ids).logits[0].float().softmax(-1)
        for r in range(ids.shape[1] - 1):
            gold = int(ids[0, r + 1])
            if not tok.convert_ids_to_tokens(gold):
                continue
            top = p[r].topk(4)
            mass += float(top.values.sum())
            qg += float(p[r, gold]) if gold in top.indices.tolist() else 0.0
            n += 1
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| t |"))
    cells = [float(c) for c in row.strip("|").split("|")[1:] if c.strip() != "—"]
    assert cells[0] == pytest.approx(mass / n, abs=2e-3)  # the cache stores log-probs in 1/16-nat steps
    assert cells[3] == pytest.approx(qg / n, abs=2e-3)
    report = (out / "report.md").read_text()
    soft = next(line for line in report.splitlines() if line.startswith("| t@2 |"))
    soft_cells = [float(c) for c in soft.strip("|").split("|")[1:] if c.strip() != "—"]
    assert soft_cells[0] == pytest.approx(cells[0], abs=1e-6)  # the support keeps its mass
    assert soft_cells[4] > cells[4]  # and is softer
    matched = float(report.split("- t: T = ")[1].split()[0])
    assert matched == pytest.approx(2.0, rel=1e-3)  # the softened copy's entropy is reached at T = 2
    from stillroom.errors import ConfigError

    with pytest.raises(ConfigError, match="LABEL=CACHE"):
        ts.main(["--blocks-from", str(run), "--target", "nocache", "--out", str(out)])
    with pytest.raises(ConfigError, match="--soften u=2"):
        ts.main(["--blocks-from", str(run), "--target", f"t={run / 'cache' / 't'}", "--soften", "u=2", "--out", str(out)])
    with pytest.raises(ConfigError, match="--split-by u"):
        ts.main(["--blocks-from", str(run), "--target", f"t={run / 'cache' / 't'}", "--split-by", "u", "--out", str(out)])
    # a same-tokenizer cache: every next token starts where one of its tokens starts
    ts.main(["--blocks-from", str(run), "--blocks", "3", "--target", f"t={run / 'cache' / 't'}", "--student", str(folder),
             "--split-by", "t", "--out", str(out)])
    split = (out / "report.md").read_text()
    assert f"{n:,.0f} rows (100.0%)" in split and "0 rows (0.0%)" in split
