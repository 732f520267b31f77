"""bench/common.py: the helpers the benchmarks share, each against an example worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common
from bench.common import (
    StepTimer,
    cache_bytes_per_token,
    gkd_collator,
    medians,
    read_blocks,
    spread,
    trainer_args,
    write_blocks,
)


def test_spread_is_half_the_range():
    assert spread([1.0, 3.0, 2.0]) == 1.0
    assert spread([3.05, 2.95]) == pytest.approx(0.05)
    assert spread([2.5]) == 0.0  # one seed: no spread
    assert spread([]) == 0.0


def test_medians_of_runs_by_hand():
    runs = {"a": [{"tokens_per_s": 10.0, "peak_rss_gb": 2.0, "step_s": 1.0, "kl": 9.0, "steps_timed": 7},
                  {"error": ["killed"]},
                  {"tokens_per_s": 30.0, "peak_rss_gb": 4.0, "step_s": 3.0, "kl": 8.0, "steps_timed": 7},
                  {"tokens_per_s": 20.0, "peak_rss_gb": 9.0, "step_s": 2.0, "kl": 7.0, "steps_timed": 7}],
            "b": [{"tokens_per_s": 5.0, "peak_rss_gb": 1.0, "step_s": 4.0, "kl": 1.0, "steps_timed": 3},
                  {"tokens_per_s": 7.0, "peak_rss_gb": 2.0, "step_s": 6.0, "kl": 1.0, "steps_timed": 3}],
            "c": [{"error": ["boom"]}, {"error": ["again"]}],
            "d": []}
    res = medians(runs, median_of=lambda key: key == "step_s", first=("steps_timed",))
    # the failed repeat of "a" is left out; peak RSS is the median (4.0), not the largest (9.0)
    assert res["a"] == {"tokens_per_s": 20.0, "peak_rss_gb": 4.0, "all_tokens_per_s": [10.0, 30.0, 20.0],
                        "step_s": 2.0, "steps_timed": 7}
    # two repeats: the mean of the two
    assert res["b"] == {"tokens_per_s": 6.0, "peak_rss_gb": 1.5, "all_tokens_per_s": [5.0, 7.0], "step_s": 5.0,
                        "steps_timed": 3}
    assert res["c"] == {"error": ["boom"]}
    assert res["d"] == {"error": "not run"}
    assert list(res) == ["a", "b", "c", "d"]
    assert "step_s" not in medians(runs)["a"]  # only the keys asked for


def test_step_timer_times_the_steps_after_the_warm_up(monkeypatch):
    ticks = iter([100.0, 100.5, 101.5, 101.75, 103.0])  # the ends of steps 2..6
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    timer = StepTimer(warm=2)
    timer.step_end(1)  # warm-up: not timed, no clock read
    for step in range(2, 7):
        timer.step_end(step)
    assert (timer.t0, timer.t1, timer.steps) == (100.0, 103.0, 4)
    assert timer.seconds == 3.0  # steps 3..6: 0.5 + 1.0 + 0.25 + 1.25
    with pytest.raises(RuntimeError, match="no step after the 5 warm-up steps"):
        _ = StepTimer(warm=5).seconds


def test_step_timer_callback_reports_the_trainer_steps(monkeypatch):
    from types import SimpleNamespace

    from transformers import TrainerCallback

    ticks = iter([10.0, 12.0, 13.0])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(ticks))
    timer = StepTimer(warm=1)
    cb = timer.callback()
    assert isinstance(cb, TrainerCallback)
    for step in (1, 2, 3):
        cb.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert timer.steps == 2 and timer.seconds == 3.0


def test_trainer_args_are_valid_training_arguments(tmp_path):
    from transformers import TrainingArguments

    kw = trainer_args(tmp_path / "out", steps=7, batch=4, seed=3)
    args = TrainingArguments(**kw)
    assert (args.max_steps, args.per_device_train_batch_size, args.seed, args.learning_rate) == (7, 4, 3, 1e-4)
    assert kw["output_dir"] == str(tmp_path / "out") and kw["use_cpu"] and kw["lr_scheduler_type"] == "constant"


def test_disable_dropout_zeroes_every_dropout_layer():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1),
                                torch.nn.Sequential(torch.nn.Dropout(0.5)))
    common.disable_dropout(model)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]


def test_gkd_collator_keeps_only_what_gkd_reads():
    def collate(features):
        return {"input_ids": [f[0] for f in features], "attention_mask": [1] * len(features),
                "labels": [f[1] for f in features], "example_ids": ["x"] * len(features)}

    assert gkd_collator(collate)([(1, 2), (3, 4)]) == {"input_ids": [1, 3], "attention_mask": [1, 1],
                                                       "labels": [2, 4]}


def test_blocks_round_trip(tmp_path):
    from stillroom.inputs.blocks import Block

    blocks = [Block("w0", "to be", [5, 6]), Block("w1", "or not", [7, 8, 9])]
    path = tmp_path / "blocks.jsonl"
    write_blocks(path, blocks)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[1] == {"id": "w1", "text": "or not", "input_ids": [7, 8, 9]}
    back = read_blocks(path)
    assert [(b.example_id, b.text, b.input_ids) for b in back] == [("w0", "to be", [5, 6]),
                                                                   ("w1", "or not", [7, 8, 9])]


def test_build_pair_saves_student_and_teacher_on_one_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    sz = {"vocab": 300, "student": (1, 16, 2), "teacher": (2, 32, 4)}
    tok, texts = common.build_pair(tmp_path, sz, n_positions=64, chars=3000, chat_template="{{ messages }}")
    assert texts and all(len(t) <= 3000 for t in texts)
    for name, (layers, width, heads) in (("student", sz["student"]), ("teacher", sz["teacher"])):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_positions"]) == (layers, width, heads, 64)
        assert cfg["vocab_size"] == len(tok)
        saved = AutoTokenizer.from_pretrained(tmp_path / name)
        assert saved.chat_template == "{{ messages }}" and len(saved) == len(tok)
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")


def _cache(folder: Path, shards: list[tuple[int, int]]) -> Path:
    """A cache folder whose shard files have the given sizes, and a manifest that records them as write_cache
    does (per shard: name, bytes, tokens)."""
    folder.mkdir(parents=True)
    entries = []
    for i, (nbytes, tokens) in enumerate(shards):
        name = f"shard-{i:05d}.parquet"
        (folder / name).write_bytes(b"\0" * nbytes)
        entries.append({"name": name, "rows": 1, "tokens": tokens, "bytes": nbytes})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    return folder


def test_cache_bytes_per_token_of_a_tiny_folder(tmp_path):
    cache = _cache(tmp_path / "k", [(3000, 100), (1000, 60)])
    assert cache_bytes_per_token(cache) == 25.0  # 4,000 bytes / 160 tokens
    assert cache_bytes_per_token(str(cache)) == 25.0
    assert sum(p.stat().st_size for p in cache.glob("*.parquet")) / 160 == 25.0  # the files say the same
    assert cache_bytes_per_token(_cache(tmp_path / "empty", [(0, 0)])) == 0.0  # no tokens: no division by zero


def test_cache_bytes_per_token_of_a_written_cache(tmp_path, tiny_models):
    """On a cache write_cache made: the manifest's sizes are the files' sizes, and its own total agrees."""
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher

    rows = [(f"ex{i}", "Now is the winter of our discontent made glorious summer " * (i + 1)) for i in range(5)]
    out = tmp_path / "cache"
    s = write_cache(OnlineTeacher(str(tiny_models["gpt2-bpe-teacher"]), top_k=4), rows, out, shard_size=2,
                    progress=False)
    on_disk = sum((out / sh["name"]).stat().st_size for sh in s.manifest["shards"])
    assert cache_bytes_per_token(out) == pytest.approx(on_disk / s.tokens)
    assert cache_bytes_per_token(out) == pytest.approx(s.manifest["totals"]["bytes_per_token"])
