"""bench/real_speed.py: the whole script on tiny stand-in models (``--small --inline``; the real teachers are not
in CI), and its medians / ratios / table against values computed by hand."""

from __future__ import annotations

import json

import pytest

from bench.common import medians
from bench.real_speed import CONFIGS, PEERS, markdown, median_key, ratios, summary_line


def test_small_run_measures_every_configuration(tmp_path, capsys):
    out = tmp_path / "runs.json"
    from bench.real_speed import main

    results = main(["--small", "--inline", "--repeats", "1", "--steps", "3", "--warmup", "1", "--blocks", "4",
                    "--seq", "32", "--json", str(out)])
    assert list(results) == list(CONFIGS)
    for c, r in results.items():
        assert "error" not in r, (c, r)
        assert r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0
    saved = json.loads(out.read_text())
    # the cache configurations scored exactly the teacher tokens of the 4 texts; bytes per token as written
    fwd, cache = saved["runs"]["fwd_gemma3"][0], saved["runs"]["cache_gemma3"][0]
    assert fwd["tokens"] == cache["tokens"] > 4 * 8
    assert 0 < cache["bytes_per_token"] < 200 and cache["kl_mean"] < 1e-3
    for c in ("ce", "fused_cache", "trl_gkd", "sr_online"):  # 3 steps, the first untimed
        assert saved["runs"][c][0]["steps_timed"] == 2
    fused = saved["runs"]["fused_cache"][0]  # each teacher's per-batch CPU work is timed, within the step
    for name in ("smollm2", "gemma3"):
        assert 0 < fused[f"targets_s_per_step/{name}"] < fused["step_s"]
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1].startswith("SUMMARY: cache overhead vs bare forward: smollm2 ")
    assert markdown(results) in text


def _runs():
    return {"fwd_gemma3": [{"tokens_per_s": 100.0, "peak_rss_gb": 3.0}, {"tokens_per_s": 90.0, "peak_rss_gb": 3.2},
                           {"tokens_per_s": 120.0, "peak_rss_gb": 3.1}],
            "cache_gemma3": [{"tokens_per_s": 95.0, "peak_rss_gb": 2.0, "bytes_per_token": 40.0},
                             {"tokens_per_s": 80.0, "peak_rss_gb": 2.5, "bytes_per_token": 41.0},
                             {"tokens_per_s": 85.0, "peak_rss_gb": 2.1, "bytes_per_token": 42.0}],
            "ce": [{"error": ["boom"]}],
            "fused_cache": [{"tokens_per_s": 50.0, "peak_rss_gb": 1.0}]}


def test_medians_ratios_and_table_by_hand():
    res = medians(_runs(), median_of=median_key)
    assert res["fwd_gemma3"]["tokens_per_s"] == 100.0  # median of 100, 90, 120
    assert res["fwd_gemma3"]["peak_rss_gb"] == 3.1  # median of 3.0, 3.2, 3.1
    assert res["cache_gemma3"]["tokens_per_s"] == 85.0 and res["cache_gemma3"]["bytes_per_token"] == 41.0
    assert res["ce"] == {"error": ["boom"]}
    r = ratios(res)
    assert r == pytest.approx({"cache_gemma3": 0.85})  # fused_cache's peer failed: no ratio
    table = markdown(res).splitlines()
    assert table[2] == "| `fwd_gemma3` | 100 90 120 | 100 |  | 3.10 |"
    assert table[3] == "| `cache_gemma3` | 95 80 85 | 85 | 0.85× `fwd_gemma3` | 2.10 |"
    assert table[4].startswith("| `ce` | error:")
    line = summary_line(res)
    assert "gemma3 17.6%" in line  # 100 / 85 − 1
    assert "gemma3 41.0" in line and "smollm2 n/a" in line and "max peak RSS 3.10 GB" in line
    assert set(PEERS) <= set(CONFIGS) and set(PEERS.values()) <= set(CONFIGS)


def test_head_check_times_the_three_variants_interleaved():
    from bench.real_speed import head_check

    out = head_check(1, repeats=2, rows=32, hidden=16, vocab=4096, chunk=8)
    assert list(out) == ["head", "head + topk_logsumexp", "head + topk_logsumexp in 8-row chunks"]
    assert all(len(v) == 2 and min(v) > 0 for v in out.values())
