"""bench/gold_peer.py end to end on the tiny fixture models (CI has no real models): a GPT-2 byte-level BPE student
cut to its 2 layers, distilled by TRL's GOLD trainer from the ▁-BPE Llama (not ByteLevel, like Gemma-3: GOLD's
positional ULD must run) and from the byte-level GPT-2 teacher (its byte-offset ULD must run), over a stand-in
for a bench.real_fusion OUT (train_blocks.jsonl and data/test)."""

from __future__ import annotations

import json
import math

import pytest

from bench import gold_peer

N_BLOCKS = 10


@pytest.fixture(scope="module")
def blocks_from(tmp_path_factory):
    """A bench.real_fusion OUT in miniature: 10 blocks of 160 characters, two test works."""
    from stillroom.testing import corpus_texts

    root = tmp_path_factory.mktemp("rf-out")
    text = corpus_texts("train")[0]
    rows = [{"id": f"w#{i}", "text": text[i * 160:(i + 1) * 160]} for i in range(N_BLOCKS)]
    (root / "train_blocks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "data" / "test").mkdir(parents=True)
    for i, t in enumerate(corpus_texts("validation")[:2]):
        (root / "data" / "test" / f"work{i}.txt").write_text(t[:2000], encoding="utf-8")
    return root


def _argv(tiny_models, blocks_from, out, teacher: str, *extra: str) -> list[str]:
    return ["--blocks-from", str(blocks_from), "--student-from", str(tiny_models["gpt2-bpe"]), "--layers", "0", "1",
            "--teacher", str(tiny_models[teacher]), "--eval-chars", "300", "--threads", "1", "--out", str(out), *extra]


def _student_lengths(tiny_models, texts: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _stillroom_order(student: str, data: str, out: str, n: int, steps: int, batch: int, seed: int) -> list[int]:
    """The order in which stillroom's trainer (its TrainingArguments, transformers' default sampler: its
    DistillTrainer keeps it) visits ``n`` examples in ``steps`` steps of ``batch``."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer

    from stillroom.training.recipe import load_recipe
    from stillroom.training.run import training_arguments

    recipe = load_recipe({"name": "order", "student": {"init_from": student, "layers": [0, 1]},
                          "data": {"train": data}, "loss": {"ce_weight": 1.0},
                          "train": {"output_dir": out, "max_steps": steps, "batch_size": batch, "seed": seed,
                                    "warmup_steps": 1, "lr": 5e-4}})
    seen: list[int] = []

    def collate(rows):
        seen.extend(r["i"] for r in rows)
        ids = torch.tensor([[1, 2, 3]] * len(rows))
        return {"input_ids": ids, "labels": ids}

    model = AutoModelForCausalLM.from_pretrained(student)
    Trainer(model=model, args=training_arguments(recipe, False), train_dataset=[{"i": i} for i in range(n)],
            data_collator=collate).train()
    return seen


def test_positional_uld_for_a_sentencepiece_teacher_end_to_end_and_resumed(tiny_models, blocks_from, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "out"
    argv = _argv(tiny_models, blocks_from, out, "llama-spm", "--steps", "2", "--batch-size", "2", "--seeds", "0",
                 "--arms", "gold-uld", "gold-uld-hybrid")
    found = gold_peer.main(argv)
    assert list(found) == ["gold-uld", "gold-uld-hybrid"]
    blocks = [json.loads(x)["text"] for x in (blocks_from / "train_blocks.jsonl").read_text().splitlines()][:4]
    lengths = _student_lengths(tiny_models, blocks)
    for arm, distance_calls in (("gold-uld", 0), ("gold-uld-hybrid", 4)):
        r = json.loads((out / "seed0" / arm / "result.json").read_text())
        assert r["arm"] == arm and r["seed"] == 0
        assert math.isfinite(r["test_bpb"]) and 0 < r["test_bpb"] < 20
        assert r["train_seconds"] > 0 and r["seconds_per_step"] > 0
        path = r["loss_path"]
        # the ▁-BPE teacher is refused by GOLD's byte-offset alignment (as Gemma-3 is): the positional ULD ran,
        # once per step, with no byte alignment; the hybrid arm's distance once per sequence (2 × 2)
        assert "ByteLevel" in path["alignment"] and path["use_extended_uld"] is False
        assert path["name"] == ("uld-positional-hybrid" if distance_calls else "uld-positional")
        assert path["calls"].get("uld") == 2 and "byte_alignment" not in path["calls"]
        assert path["calls"].get("hybrid", 0) == distance_calls
        assert path["ce_weight"] == 0.9 and path["distillation_weight"] == pytest.approx(0.1)
        # every block once; the whole block is fed with no EOS, and CE predicts its tokens 1..n-1 (as stillroom's)
        assert sorted(r["block_order"]) == [0, 1, 2, 3]
        assert r["train_tokens"] == sum(lengths) and r["ce_targets"] == sum(n - 1 for n in lengths)
        assert not (out / "seed0" / arm / "trainer").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results["test_bpb"]) == {"gold-uld", "gold-uld-hybrid"}
    assert results["loss_path"]["gold-uld"] == ["uld-positional"]
    report = (out / "report.md").read_text()
    assert "| gold-uld |" in report and "uld-positional-hybrid" in report
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("SUMMARY: gold-uld ")

    # a rerun skips the finished arms: nothing is built or trained again, the results stay as they were
    before = {a: (out / "seed0" / a / "result.json").read_text() for a in found}

    def no_training(*a, **k):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(gold_peer, "make_trainer", no_training)
    again = gold_peer.main(argv)
    assert {a: [r["test_bpb"] for r in rs] for a, rs in again.items()} == {
        a: [r["test_bpb"] for r in rs] for a, rs in found.items()}
    assert {a: (out / "seed0" / a / "result.json").read_text() for a in found} == before

    # another setting into the same OUT is refused
    from stillroom.errors import ConfigError

    with pytest.raises(ConfigError, match="'steps': \\(2, 3\\)"):
        gold_peer.main(_argv(tiny_models, blocks_from, out, "llama-spm", "--steps", "3", "--batch-size", "2",
                             "--seeds", "0", "--arms", "gold-uld", "gold-uld-hybrid"))


def test_byte_offset_uld_for_a_bytelevel_teacher_in_stillrooms_block_order(tiny_models, blocks_from, tmp_path):
    out = tmp_path / "out"
    found = gold_peer.main(_argv(tiny_models, blocks_from, out, "gpt2-bpe-teacher", "--steps", "3", "--batch-size",
                                 "2", "--seeds", "1", "--arms", "gold-uld"))
    (r,) = found["gold-uld"]
    path = r["loss_path"]
    assert path["name"] == "uld-extended" and path["use_extended_uld"] is True
    assert path["calls"].get("uld") == 3 and path["calls"].get("byte_alignment") == 6  # one per sequence
    assert math.isfinite(r["test_bpb"])
    # the blocks come in the order stillroom's trainer takes them with the same seed (not GOLD's own shuffle)
    assert r["block_order"] == _stillroom_order(str(tiny_models["gpt2-bpe"]), str(blocks_from / "data" / "test"),
                                                str(tmp_path / "order"), 6, 3, 2, 1)


def test_block_example_choose_alignment_and_block_count(tiny_models, blocks_from):
    from transformers import AutoTokenizer

    from stillroom.errors import ConfigError

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    text = "To be, or not to be: that is the question."
    ex = gold_peer.block_example(text, tok)
    assert ex["prompt"] + ex["completion"] == text
    first = tok(text, add_special_tokens=False)["input_ids"][0]
    assert tok(ex["prompt"], add_special_tokens=False)["input_ids"] == [first]  # one token: GOLD needs a prompt

    spm = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    teacher = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe-teacher"])
    extended, why = gold_peer.choose_alignment("auto", tok, spm)
    assert extended is False and "teacher" in why and "NotImplementedError" in why
    assert gold_peer.choose_alignment("auto", tok, teacher)[0] is True
    assert gold_peer.choose_alignment("positional", tok, teacher) == (False, "--alignment positional")

    assert len(gold_peer.read_blocks(blocks_from, 4)) == 4
    with pytest.raises(ConfigError, match=f"holds {N_BLOCKS} blocks"):
        gold_peer.read_blocks(blocks_from, N_BLOCKS + 1)
    assert gold_peer.path_name({}) == "none"
    assert gold_peer.path_name({"uld": 1, "hybrid": 2}) == "uld-positional-hybrid"
