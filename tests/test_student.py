"""The student a recipe asks for: the kind is explicit (pretrained, re-initialised, cut, from scratch), the old
ambiguous ``student`` + ``student_config`` pair is refused, and a cut student (from a folder or a GGUF file)
trains end to end and saves as a normal model whose card says where it came from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stillroom.models.student import build_student, describe_student, student_tokenizer
from stillroom.testing import write_tiny_llama_gguf
from stillroom.training.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from stillroom.testing import corpus_texts

    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(corpus_texts("train")[0][:20_000], encoding="utf-8")
    return p


def _raw(student, data_file, out, teachers=(), **train) -> dict:
    return {"student": student, "teachers": [{"path": str(t)} for t in teachers],
            "data": {"train": str(data_file), "seq_len": 32, "max_blocks": 8},
            "loss": {"ce_weight": 0.5 if teachers else 1.0},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 2, "logging_steps": 1,
                      "progress": False, "plot": False, **train}}


def test_student_kind_is_explicit(tiny_models, data_file, tmp_path):
    folder = str(tiny_models["gpt2-bpe"])
    r = load_recipe(_raw(folder, data_file, tmp_path))
    assert r.student.kind == "pretrained" and r.student.path == folder  # a plain string still means pretrained
    assert load_recipe(_raw({"path": folder, "reinit": True}, data_file, tmp_path)).student.kind == "reinit"
    cut = load_recipe(_raw({"init_from": folder, "layers": [1]}, data_file, tmp_path)).student
    assert cut.kind == "cut" and cut.source == folder
    scratch = {"tokenizer": folder, "config": {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}}
    assert load_recipe(_raw(scratch, data_file, tmp_path)).student.kind == "scratch"
    # student_config: null (an override clearing it) is harmless
    assert load_recipe({**_raw(folder, data_file, tmp_path), "student_config": None}).student.kind == "pretrained"


@pytest.mark.parametrize("student, extra, match", [
    ("S", {"student_config": {"model_type": "gpt2"}}, r"student_config: .*student: \{tokenizer: DIR, config"),
    ("S", {"from_scratch": True}, r"reinit: true"),
    ({"path": "S", "init_from": "S", "layers": [0]}, {}, r"exactly one of .*got path, init_from"),
    ({"init_from": "S"}, {}, r"init_from needs layers"),
    ({"path": "S", "layers": [0]}, {}, r"layers goes with init_from"),
    ({"tokenizer": "S"}, {}, r"config goes with tokenizer"),
    ({"init_from": "/nowhere", "layers": [0]}, {}, r"student.init_from: /nowhere does not exist.*\.gguf"),
])
def test_ambiguous_or_incomplete_students_are_refused(tiny_models, data_file, tmp_path, student, extra, match):
    folder = str(tiny_models["gpt2-bpe"])
    student = student.replace("S", folder) if isinstance(student, str) else {
        k: (v.replace("S", folder) if v == "S" else v) for k, v in student.items()}
    with pytest.raises(RecipeError, match=match):
        load_recipe({**_raw(student, data_file, tmp_path), **extra})


def test_built_students_keep_or_replace_weights_as_asked(tiny_models, data_file, tmp_path):
    folder = tiny_models["gpt2-bpe-teacher"]  # 3 layers
    saved = load_file(folder / "model.safetensors")
    spec = load_recipe(_raw(str(folder), data_file, tmp_path)).student
    tok = student_tokenizer(spec)
    pretrained = build_student(spec, tok).state_dict()
    assert all(torch.equal(pretrained[k], v) for k, v in saved.items())  # the pretrained weights are used
    assert "pretrained student" in describe_student(spec)

    spec = load_recipe(_raw({"init_from": str(folder), "layers": [0, 2]}, data_file, tmp_path)).student
    cut = build_student(spec, tok)
    assert cut.config.n_layer == 2
    cut_sd = cut.state_dict()
    for new, old in ((0, 0), (1, 2)):  # kept layers, renumbered: compare with the file's tensors by name
        for k, v in saved.items():
            if k.startswith(f"transformer.h.{old}."):
                assert torch.equal(cut_sd[k.replace(f".h.{old}.", f".h.{new}.")], v)
    for k in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        assert torch.equal(cut_sd[k], saved[k])
    assert "cut from" in describe_student(spec, cut) and "[0, 2]" in describe_student(spec, cut)

    spec = load_recipe(_raw({"path": str(folder), "reinit": True}, data_file, tmp_path)).student
    fresh = build_student(spec, tok).state_dict()
    assert not torch.equal(fresh["transformer.h.0.attn.c_attn.weight"], saved["transformer.h.0.attn.c_attn.weight"])


def test_train_a_student_cut_from_a_teacher(tiny_models, data_file, tmp_path):
    from stillroom.training.run import train

    teacher = tiny_models["gpt2-bpe-teacher"]
    out = tmp_path / "cut-run"
    result = train(_raw({"init_from": str(teacher), "layers": [0, 2]}, data_file, out, teachers=[teacher]))
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.n_layer == 2 and back.config.n_embd == 96
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history if "loss" in h)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"cut from `{teacher}`: its decoder layers [0, 2]" in card


def test_train_from_a_gguf_file(data_file, tmp_path, monkeypatch):
    from stillroom.training.run import train

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(gguf_path)
    out = tmp_path / "gguf-run"
    # the GGUF file is both the model the student is cut from and the (same-tokenizer) teacher
    result = train(_raw({"init_from": str(gguf_path), "layers": [1]}, data_file, out, teachers=[gguf_path]))
    assert any("loss" in h for h in result.history)
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.model_type == "llama" and back.config.num_hidden_layers == 1
    assert (out / "tokenizer.json").is_file() and len(list((tmp_path / "cache" / "models").glob("gguf-*"))) == 1
