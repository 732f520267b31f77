"""stillroom.training.plan.make_plan: what `train --check` knows before any model loads — accepting what works."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from stillroom.errors import ConfigError
from stillroom.teachers.cache import write_cache
from stillroom.teachers.online import OnlineTeacher
from stillroom.training.plan import make_plan
from stillroom.training.recipe import load_recipe


def _recipe(tiny_models, tmp_path, **extra) -> dict:
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question.\n"
                                        "Whether 'tis nobler in the mind to suffer.\n" * 3)
    raw = {"student": str(tiny_models["gpt2-bpe"]), "teachers": [{"path": str(tiny_models["llama-spm"])}],
           "data": {"train": str(tmp_path / "train.txt"), "seq_len": 16}, "loss": {"ce_weight": 0.5},
           "train": {"output_dir": str(tmp_path / "run")}}
    raw.update(extra)
    return raw


def test_cache_over_the_exported_blocks_passes_and_other_texts_fail(tiny_models, tmp_path):
    from stillroom.training.data import export_training_blocks

    r = load_recipe(_recipe(tiny_models, tmp_path))
    toks = make_plan(r)
    assert len(toks.teacher_tokenizers) == 1 and len(toks.student_tokenizer) > 2
    blocks = tmp_path / "blocks.jsonl"
    n = export_training_blocks(r, blocks)
    teacher = OnlineTeacher(str(tiny_models["llama-spm"]), top_k=4)
    write_cache(teacher, blocks, tmp_path / "cache", progress=False)
    make_plan(load_recipe(_recipe(tiny_models, tmp_path), [f"teachers.0.cache={tmp_path / 'cache'}"]))
    lines = blocks.read_text().splitlines()
    (tmp_path / "fewer.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one block short
    write_cache(teacher, tmp_path / "fewer.jsonl", tmp_path / "cache2", progress=False)
    with pytest.raises(ConfigError, match=rf"teachers.0.cache: .* built over other texts \(1 of {n} training"):
        make_plan(load_recipe(_recipe(tiny_models, tmp_path), [f"teachers.0.cache={tmp_path / 'cache2'}"]))


def test_context_and_loggers(tiny_models, tmp_path):
    raw = _recipe(tiny_models, tmp_path)
    make_plan(load_recipe(raw, ["data.seq_len=512"]))  # the tiny GPT-2's n_positions: allowed
    with pytest.raises(ConfigError, match=r"data.seq_len: got 513, but the student's context is 512"):
        make_plan(load_recipe(raw, ["data.seq_len=513"]))
    scratch = {**raw, "student": {"tokenizer": raw["student"], "config": {"model_type": "gpt2", "n_positions": 256}}}
    with pytest.raises(ConfigError, match=r"data.seq_len: got 300, .* context is 256"):  # a from-scratch config
        make_plan(load_recipe(scratch, ["data.seq_len=300"]))
    absent = [n for n, m in (("wandb", "wandb"), ("mlflow", "mlflow")) if importlib.util.find_spec(m) is None]
    for name in absent:
        with pytest.raises(ConfigError, match=rf"train.report_to: '{name}' needs the {name} package"):
            make_plan(load_recipe(raw, [f"train.report_to=[{name}]"]))


def test_streaming_recipe_checks_its_first_document_and_the_cache_over_streamed_blocks(tiny_models, tmp_path):
    from stillroom.errors import DataError
    from stillroom.training.data import export_training_blocks

    stream = ["data.streaming=true", "train.max_steps=2"]
    r = load_recipe(_recipe(tiny_models, tmp_path), stream)
    make_plan(r)
    blocks = tmp_path / "blocks.jsonl"
    n = export_training_blocks(r, blocks)
    teacher = OnlineTeacher(str(tiny_models["llama-spm"]), top_k=4)
    write_cache(teacher, blocks, tmp_path / "cache", progress=False)
    make_plan(load_recipe(_recipe(tiny_models, tmp_path), [*stream, f"teachers.0.cache={tmp_path / 'cache'}"]))
    lines = blocks.read_text().splitlines()
    (tmp_path / "fewer.jsonl").write_text("\n".join(lines[1:]) + "\n")  # the first block missing
    write_cache(teacher, tmp_path / "fewer.jsonl", tmp_path / "cache2", progress=False)
    with pytest.raises(ConfigError, match=rf"built over other texts \(1 of {n} training blocks, e.g. 'train#0'"):
        make_plan(load_recipe(_recipe(tiny_models, tmp_path), [*stream, f"teachers.0.cache={tmp_path / 'cache2'}"]))
    raw = _recipe(tiny_models, tmp_path)
    (tmp_path / "train.txt").write_bytes(b"caf\xe9\n")  # the first document is not UTF-8
    with pytest.raises(DataError, match=r"train.txt: line 1 is not UTF-8 \(byte 0xe9\)"):
        make_plan(load_recipe(raw, stream))


def test_speed_switches_refused_or_warned_naming_the_key(tiny_models, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    from stillroom.models import precision
    from stillroom.training import switches

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STILLROOM_DTYPE", raising=False)
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 0.02)  # a CPU without native bf16
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))
    raw = _recipe(tiny_models, tmp_path)
    assert make_plan(load_recipe(raw)).warnings == []  # the defaults: nothing to say
    with pytest.raises(ConfigError, match=r"^train.precision: fp16 is for GPUs"):
        make_plan(load_recipe(raw, ["train.precision=fp16"]))
    (slow,) = make_plan(load_recipe(raw, ["train.precision=bf16"])).warnings  # allowed: the user asked
    assert slow.startswith("train.precision: bf16 on this CPU") and "50.0x slower than fp32" in slow
    (slow,) = make_plan(load_recipe(raw, ["teachers.0.dtype=bfloat16"])).warnings
    assert slow.startswith("teachers.0.dtype: bf16") and slow.endswith("set teachers.0.dtype=auto to let stillroom pick")
    with pytest.raises(Exception, match=r"teachers.0.dtype: got 'fp8'"):
        load_recipe(raw, ["teachers.0.dtype=fp8"])
    (note,) = make_plan(load_recipe(raw, ["train.compile=true"])).warnings
    assert note.startswith("train.compile: on CPU")
    make_plan(load_recipe(raw, ["train.gradient_checkpointing=true"]))  # GPT-2 supports it
    monkeypatch.setattr(GPT2LMHeadModel, "supports_gradient_checkpointing", False)
    assert switches.student_class(GPT2LMHeadModel.config_class()) is GPT2LMHeadModel
    with pytest.raises(ConfigError, match=r"^train.gradient_checkpointing: the student \(GPT2LMHeadModel\) does "
                                          r"not support it .* set train.gradient_checkpointing=false$"):
        make_plan(load_recipe(raw, ["train.gradient_checkpointing=true"]))
    monkeypatch.setattr(switches.shutil, "which", lambda name: None)  # no C++ compiler for inductor
    with pytest.raises(ConfigError, match=r"train.compile: torch.compile on CPU needs a C\+\+ compiler"):
        make_plan(load_recipe(raw, ["train.compile=true"]))


def test_missing_tensorboard_names_the_extra_to_install(tiny_models, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: 'tensorboard' needs the tensorboard package, which is "
                                          r"not installed; pip install 'stillroom\[tensorboard\]', or remove"):
        make_plan(load_recipe(_recipe(tiny_models, tmp_path), ["train.report_to=[tensorboard]"]))


def test_unknown_scratch_model_type_fails_in_the_check(tiny_models, tmp_path):
    raw = _recipe(tiny_models, tmp_path)
    raw["student"] = {"tokenizer": raw["student"], "config": {"model_type": "gpt9"}}
    with pytest.raises(ConfigError, match=r"student.config.model_type: 'gpt9' is not a model type transformers knows"):
        make_plan(load_recipe(raw))
