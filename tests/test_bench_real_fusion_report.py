"""bench.real_fusion_report: aggregates, paired differences and the bar's verdicts by hand; the report's rows."""

import pytest

from bench.real_fusion_report import aggregate, paired, verdicts
from tests.test_bench_real_fusion import _args


def _results(fused: list[float]) -> dict[str, dict[int, float]]:
    return {"ce-only": dict(enumerate([3.00, 3.02, 2.98])), "kd-a": dict(enumerate([2.80, 2.82, 2.78])),
            "kd-b": dict(enumerate([2.90, 2.91, 2.89])), "fused-min_ce": dict(enumerate(fused))}


def test_aggregate_and_paired_differences_by_hand():
    res = {"ce-only": {1: 3.0, 0: 3.2, 2: 3.1}, "kd-a": {0: 2.9, 1: 2.7}}
    agg = aggregate(res)
    assert agg["ce-only"]["mean"] == pytest.approx(3.1)
    assert agg["ce-only"]["spread"] == pytest.approx(0.1)  # (3.2 − 3.0) / 2
    assert list(agg["ce-only"]["seeds"]) == [0, 1, 2]
    assert agg["kd-a"]["spread"] == pytest.approx(0.1)
    d = paired(res, "kd-a", "ce-only")  # only the seeds both have
    assert d == pytest.approx({0: -0.3, 1: -0.3})


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


def test_report_lists_cache_bytes_per_arm(tmp_path):
    import json

    from bench.real_fusion_report import collect, report_md

    for arm, seed, bpb, size in [("ce-only", 0, 3.2, 0.0), ("alm-gemma3", 0, 3.1, 6.5), ("alm-gemma3", 1, 3.0, 6.5)]:
        d = tmp_path / f"seed{seed}" / arm
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"arm": arm, "seed": seed, "test_bpb": bpb, "train_seconds": 10.0,
                                                   "cache_bytes_per_token": size}))
    results, secs, sizes = collect(tmp_path)
    assert results == {"alm-gemma3": {0: 3.1, 1: 3.0}, "ce-only": {0: 3.2}} and sizes["alm-gemma3"] == 6.5
    args = _args(seeds=[0, 1], lr=1e-3, ce_weight=0.9, projection="prefix", top_k=10, eval_chars=100, layers=[0],
                 student_from="/m/s")
    md = report_md(args, results, secs, {}, [], sizes)
    assert "| alm-gemma3 | 3.0500 | 0.0500 | 0: 3.1000 1: 3.0000 | 10 | 6.50 |" in md
    assert "| ce-only | 3.2000 | 0.0000 | 0: 3.2000 | 10 | 0.00 |" in md
