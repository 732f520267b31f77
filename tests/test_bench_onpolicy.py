"""bench/onpolicy.py ``--size real`` on tiny stand-ins (CI has no real models): a byte-level BPE Llama with a chat
template for SmolLM2 (the student is cut from it and saved) and a ▁-BPE Llama with byte fallback and no chat
template for Gemma-3; and the table / summary helpers against values worked out by hand."""

from __future__ import annotations

import json

import pytest

from bench.common import medians
from bench.onpolicy import peer_of, summary_line, table_rows


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    from stillroom.inputs.chat import FALLBACK_TEMPLATE
    from stillroom.testing import corpus_texts, save_pair, tiny_llama, train_byte_bpe, train_spm_bpe

    root = tmp_path_factory.mktemp("onpolicy-stand-ins")
    text = "\n".join(corpus_texts("train"))[:60_000]
    chunks = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    bpe, spm = train_byte_bpe(chunks, 600), train_spm_bpe(chunks, 700)
    bpe.chat_template = FALLBACK_TEMPLATE
    eot = bpe.convert_tokens_to_ids("<|endoftext|>")
    sm = save_pair(tiny_llama(len(bpe), n_layer=3, seed=0, bos_token_id=eot, eos_token_id=eot), bpe, root / "sm")
    gm = save_pair(tiny_llama(len(spm), n_layer=2, seed=1, bos_token_id=spm.bos_token_id,
                              eos_token_id=spm.eos_token_id), spm, root / "gm")
    return {"smollm2": str(sm), "gemma3": str(gm)}


def test_real_size_runs_same_and_cross_tokenizer_configurations(stand_ins, tmp_path, monkeypatch, capsys):
    from bench import onpolicy

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    made = {}
    build = onpolicy.build_real

    def spy(root, smollm2, gemma3, layers):  # look at the cut student before the temporary root goes
        build(root, smollm2, gemma3, layers)
        made["paths"] = json.loads((root / "paths.json").read_text())
        made["config"] = json.loads((root / "student" / "config.json").read_text())
        made["files"] = sorted(p.name for p in (root / "student").iterdir())

    monkeypatch.setattr(onpolicy, "build_real", spy)
    configs = ["trl_l05", "sr_l05", "gold_l1", "goldpos_l1", "srx_l1"]
    results = onpolicy.main(["--size", "real", "--smollm2", stand_ins["smollm2"], "--gemma3", stand_ins["gemma3"],
                             "--layers", "0", "2", "--steps", "3", "--warmup", "1", "--repeats", "1", "--threads", "1",
                             "--configs", ",".join(configs)])
    assert made["config"]["num_hidden_layers"] == 2 and "model.safetensors" in made["files"]
    assert made["paths"]["teacher"] == stand_ins["smollm2"] and made["paths"]["xteacher"] == stand_ins["gemma3"]
    assert list(results) == configs
    for c in ("trl_l05", "sr_l05", "goldpos_l1", "srx_l1"):
        r = results[c]
        assert "error" not in r, (c, r)
        assert r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0 and r["steps_timed"] == 2
    # λ = 1: both timed steps sample
    assert results["srx_l1"]["sampled_steps"] == results["goldpos_l1"]["sampled_steps"] == 2
    # GOLD's default byte-offset alignment refuses a tokenizer that is not ByteLevel (the ▁-BPE "Gemma")
    assert "ByteLevel" in " ".join(results["gold_l1"]["error"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("SUMMARY: sr_l05 ")


def test_medians_peers_table_and_summary_by_hand():
    runs = {"trl_l1": [{"tokens_per_s": 10.0, "peak_rss_gb": 4.0, "sampled_steps": 7, "steps_timed": 7},
                       {"tokens_per_s": 30.0, "peak_rss_gb": 6.0, "sampled_steps": 7, "steps_timed": 7},
                       {"tokens_per_s": 20.0, "peak_rss_gb": 5.0, "sampled_steps": 7, "steps_timed": 7}],
            "sr_l1": [{"tokens_per_s": 45.0, "peak_rss_gb": 2.5, "sampled_steps": 7, "steps_timed": 7},
                      {"error": ["boom"]}],
            "gold_l1": [{"error": ["NotImplementedError: not ByteLevel"]}],
            "srx_l1": [{"tokens_per_s": 12.0, "peak_rss_gb": 3.0, "sampled_steps": 7, "steps_timed": 7}]}
    res = medians(runs, first=("sampled_steps", "steps_timed"))
    assert res["trl_l1"]["tokens_per_s"] == 20.0 and res["trl_l1"]["peak_rss_gb"] == 5.0
    assert res["sr_l1"]["all_tokens_per_s"] == [45.0]  # the failed run is left out
    assert peer_of("sr_l1") == "trl_l1" and peer_of("srx_l05") == "goldpos_l05" and peer_of("trl_l1") is None
    rows = {r[0]: r for r in table_rows(res)}
    assert rows["sr_l1"][1:3] == ["45.0", "45.0"] and rows["trl_l1"][2] == "10.0 30.0 20.0"
    assert rows["sr_l1"][5:] == ["2.25×", "2.00×"]  # 45 / 20 tokens/s, 5.0 / 2.5 GB
    assert rows["srx_l1"][5:] == ["", ""]  # its peer (goldpos_l1) did not run
    assert rows["gold_l1"][1] == "error"
    line = summary_line(res)
    assert line.startswith("sr_l1 45.0 tok/s 2.50 GB vs trl_l1 20.0 tok/s 5.00 GB (2.25x); "
                           "srx_l1 12.0 tok/s 3.00 GB (goldpos_l1: no number)")
    assert line.endswith("gold_l1 error: NotImplementedError: not ByteLevel")
