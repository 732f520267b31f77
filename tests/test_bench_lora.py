"""bench.lora end to end on a tiny stand-in: both configurations run in their own process, LoRA trains fewer
parameters (so its optimizer state is smaller) and the summary compares them."""

from __future__ import annotations

from bench import lora


def test_both_configurations_run_and_are_compared(tiny_models, shared, tmp_path, capsys):
    out = lora.main(["--steps", "2", "--warmup", "1", "--repeats", "1", "--batch", "1", "--seq-len", "32",
                     "--rank", "2", "--threads", "1", "--smollm2", str(tiny_models["gpt2-bpe-teacher"]),
                     "--layers", "0", "1", "--corpus", str(shared / "corpus" / "shakespeare"),
                     "--json", str(tmp_path / "r.json")])
    for c in lora.CONFIGS:
        assert out[c]["tokens_per_s"] > 0 and out[c]["peak_rss_gb"] > 0, out
    assert (tmp_path / "r.json").is_file()
    assert "SUMMARY: LoRA r=2" in capsys.readouterr().out
