"""bench/decode_kernels.py on small shapes: every row is measured, the two forms agree (the script checks it
before timing), and the ratios are the timings' quotients."""

from __future__ import annotations

import pytest

import bench.decode_kernels as dk


def test_kernels_rows_and_ratios(monkeypatch, capsys):
    monkeypatch.setattr(dk, "SHAPES", {"smollm2 head 64→3000": (3000, 64), "mlp up 64→96": (96, 64)})
    lin = dk.linear_rows(1, (1, 4))
    assert [(r["shape"], r["rows"]) for r in lin] == [(s, m) for s in dk.SHAPES for m in (1, 4)]
    for r in lin:
        assert r["linear_ms"] > 0 and r["skinny_ms"] > 0
        assert r["ratio"] == pytest.approx(r["linear_ms"] / r["skinny_ms"])
    draws = dk.draw_rows(1)
    assert [r["vocab"] for r in draws] == [49152, 262144]
    assert all(r["ratio"] == pytest.approx(r["multinomial_ms"] / r["inverse_cdf_ms"]) for r in draws)


def test_main_prints_a_summary(monkeypatch, capsys):
    monkeypatch.setattr(dk, "SHAPES", {"smollm2 head 64→3000": (3000, 64)})
    out = dk.main(["--repeats", "1", "--rows", "4", "--skip-decode", "--threads", "1"])
    text = capsys.readouterr().out
    assert out["decode"] is None and len(out["linear"]) == 1
    assert "SUMMARY: smollm2 head 4 rows" in text and "draw 262144" in text
