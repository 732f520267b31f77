"""bench/real_fusion.py's pure parts (the benchmark itself needs the real models and is not a test): the works
split against the shared corpus and by hand, and the report's aggregation, paired differences and verdicts
against values computed by hand."""

from __future__ import annotations

import pytest

from bench.real_fusion import TEST_WORKS, VALIDATION_WORKS, aggregate, paired, split_works, verdicts


def test_split_is_by_whole_works_and_disjoint_on_the_shared_corpus(shared):
    names = sorted(p.name for p in (shared / "corpus" / "shakespeare").glob("*.txt"))
    split = split_works(names)
    parts = [set(split[k]) for k in ("train", "validation", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert parts[0] | parts[1] | parts[2] == set(names)
    assert parts[2] == set(TEST_WORKS) and parts[1] == set(VALIDATION_WORKS)
    assert len(split["train"]) == len(names) - 6 == 36


def test_split_by_hand_and_missing_works_are_named():
    names = ["a.txt", "b.txt", "c.txt", "d.txt"]
    assert split_works(names, test=["c.txt"], validation=["a.txt"]) == {
        "train": ["b.txt", "d.txt"], "validation": ["a.txt"], "test": ["c.txt"]}
    with pytest.raises(FileNotFoundError, match=r"\['x.txt'\]"):
        split_works(names, test=["x.txt"], validation=["a.txt"])


def test_aggregate_and_paired_differences_by_hand():
    res = {"ce-only": {1: 3.0, 0: 3.2, 2: 3.1}, "kd-a": {0: 2.9, 1: 2.7}}
    agg = aggregate(res)
    assert agg["ce-only"]["mean"] == pytest.approx(3.1)
    assert agg["ce-only"]["spread"] == pytest.approx(0.1)  # (3.2 − 3.0) / 2
    assert list(agg["ce-only"]["seeds"]) == [0, 1, 2]
    assert agg["kd-a"]["spread"] == pytest.approx(0.1)
    d = paired(res, "kd-a", "ce-only")  # only the seeds both have
    assert d == pytest.approx({0: -0.3, 1: -0.3})


def _results(fused: list[float]) -> dict[str, dict[int, float]]:
    return {"ce-only": dict(enumerate([3.00, 3.02, 2.98])), "kd-a": dict(enumerate([2.80, 2.82, 2.78])),
            "kd-b": dict(enumerate([2.90, 2.91, 2.89])), "fused-min_ce": dict(enumerate(fused))}


def test_verdict_holds_only_when_each_gap_exceeds_the_spread():
    # fused 2.60 ± 0.02, best KD = kd-a 2.80 ± 0.02, CE 3.00 ± 0.02: both gaps 0.2 > 0.02
    (line,) = verdicts(_results([2.60, 2.62, 2.58]))
    assert "best KD (kd-a)" in line and "bar HOLDS" in line and "0: -0.2000" in line
    # fused 2.79 ± 0.09: below best KD on average, but by less than the spread
    (line,) = verdicts(_results([2.70, 2.88, 2.79]))
    assert "bar does NOT hold" in line
    # two seeds: not tested, whatever the numbers
    two = {k: {s: v for s, v in d.items() if s < 2} for k, d in _results([2.60, 2.62, 2.58]).items()}
    (line,) = verdicts(two)
    assert "bar not yet tested (2 seeds < 3)" in line
    assert verdicts({"ce-only": {0: 3.0}}) == ["not enough arms finished for a verdict"]


def test_an_out_folder_refuses_a_rerun_with_other_options(tmp_path):
    import argparse

    from bench.real_fusion import SCALE, check_scale
    from stillroom.errors import ConfigError

    args = argparse.Namespace(**{k: 1 for k in SCALE})
    check_scale(args, tmp_path)
    check_scale(args, tmp_path)  # same options: resumes
    args.steps = 2
    with pytest.raises(ConfigError, match=r"'steps': \(1, 2\)"):
        check_scale(args, tmp_path)
