"""bench.projection_signal on tiny stand-ins: every projection scored, coverage ordered as the projections
promise, and a teacher projected onto its own tokenizer scores exactly as the same-tokenizer target."""

from __future__ import annotations

import math

import pytest

from bench import projection_signal as ps


@pytest.fixture(scope="module")
def corpus(shared):
    return shared / "corpus" / "shakespeare"


def _run(tmp_path, corpus, smol, gemma):
    return ps.main(["--blocks", "3", "--seq-len", "48", "--top-k", "4", "--threads", "1", "--smollm2", str(smol),
                    "--gemma3", str(gemma), "--corpus", str(corpus), "--out", str(tmp_path)])


def test_every_projection_is_scored_and_coverage_grows_with_the_projection(tiny_models, corpus, tmp_path):
    r = _run(tmp_path / "x", corpus, tiny_models["gpt2-bpe-teacher"], tiny_models["llama-spm"])
    p = r["projections"]
    x = p.pop("xtoken")
    assert set(p) == set(ps.PROJECTIONS)
    assert x["defined"] == p["prefix"]["defined"]  # X-Token's rows are the group starts, as prefix's
    assert 0 < x["reached_mass"] <= x["topk_mass"] <= 1 and all(math.isfinite(v) for v in x.values())
    # onehot transfers only 1-to-1 groups; bytes and prefix every group start; next_bytes also inside groups
    assert p["onehot"]["defined"] <= p["prefix"]["defined"] <= p["next_bytes"]["defined"] <= 1.0
    assert p["bytes"]["defined"] == p["prefix"]["defined"]
    for v in p.values():
        assert all(math.isfinite(x) for x in v.values())
        assert 0.98 < v["defined"] + v["onehot_rows"] <= 1.0  # defined, or left to the one-hot fill (BOS rows aside)
    assert (tmp_path / "x" / "report.md").read_text().count("| next_bytes |") == 1


def test_a_teacher_projected_onto_its_own_tokenizer_scores_as_the_same_tokenizer_target(tiny_models, corpus,
                                                                                        tmp_path):
    t = tiny_models["gpt2-bpe-teacher"]
    r = _run(tmp_path / "same", corpus, t, t)
    a = r["all"]
    assert abs(a["smol_exact"] - a["gemma_exact"]) < 1e-9
    x = r["projections"].pop("xtoken")
    # the map is the identity on text tokens: the teacher's own top-k is the same-tokenizer target (its tail spread
    # over the text tokens instead of every id), its mass reachable but on special ids, every gold one teacher token
    assert x["whole_gold"] == 1.0 and 0.99 < x["reached_mass"] / x["topk_mass"] <= 1.0
    assert abs(x["projected"] - x["smol_topk"]) < 0.01
    for v in r["projections"].values():
        assert v["defined"] > 0.9  # every row is a 1-to-1 group (BOS rows aside)
        assert abs(v["projected"] - v["smol_topk"]) < 1e-4 and abs(v["kept_advantage"]) < 1e-4  # float32 rounding
        assert abs(v["advantage"]) < 1e-9
