"""Shared fixtures: tiny local models (built once per test run) and the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stillroom.testing import SHARED_TOKENIZERS, build_fixture_models, shared_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """name -> folder: ``gpt2-bpe`` (student), ``gpt2-bpe-teacher`` (same tokenizer), ``llama-spm``."""
    return build_fixture_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` (real tokenizers + corpus); skips, saying why, only when it is absent."""
    path = shared_dir()
    if path is None:
        pytest.skip("../shared is absent (real tokenizers and corpus); set STILLROOM_SHARED to point at it")
    return path


@pytest.fixture(scope="session")
def probe_teacher(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama that knows the served-teacher probe: its folder and its f32 GGUF (stillroom.testing)."""
    from stillroom.teachers.served import PROBE
    from stillroom.testing import probe_teacher

    return probe_teacher(tmp_path_factory.mktemp("probe-teacher"), PROBE)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``train.txt`` (12,000 characters) and ``val.txt`` (1,500) from the shipped corpus, for short training runs."""
    from stillroom.testing import corpus_texts

    d = tmp_path_factory.mktemp("train-data")
    (d / "train.txt").write_text(corpus_texts("train")[0][:12000], encoding="utf-8")
    (d / "val.txt").write_text(corpus_texts("validation")[0][:1500], encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def nodrop_student(tiny_models, tmp_path_factory) -> Path:
    """The fixture student with dropout off, so training-mode losses and runs with different micro-batching
    can be recomputed and compared exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("nodrop")
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"])
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"]).save_pretrained(out)
    return out


_TOKENIZER_CACHE: dict[str, object] = {}

# Tokenizers committed under tests/data (small enough for git; see each folder's README), by name.
LOCAL_TOKENIZERS = {"smollm2": Path(__file__).resolve().parent / "data" / "smollm2-tokenizer"}


def load_shared_tokenizer(name: str):
    """AutoTokenizer for ``../shared/tokenizers/NAME`` (or ``LOCAL_TOKENIZERS[NAME]``), cached for the test
    run; skips when ``../shared`` is absent."""
    if name in LOCAL_TOKENIZERS:
        folder = LOCAL_TOKENIZERS[name]
    else:
        path = shared_dir()
        if path is None:
            pytest.skip("../shared is absent (real tokenizers and corpus); set STILLROOM_SHARED to point at it")
        folder = path / "tokenizers" / name
    if name not in _TOKENIZER_CACHE:
        from transformers import AutoTokenizer

        _TOKENIZER_CACHE[name] = AutoTokenizer.from_pretrained(folder)
    return _TOKENIZER_CACHE[name]


@pytest.fixture(scope="session")
def shared_tokenizer():
    """Call with a name from ``SHARED_TOKENIZERS``, ``"gemma3"`` (262k ids: slow to load) or ``"smollm2"``."""
    return load_shared_tokenizer


__all__ = ["LOCAL_TOKENIZERS", "SHARED_TOKENIZERS", "load_shared_tokenizer"]


def torchrun_train(tmp_path: Path, raw: dict, script: str, *overrides: str, timeout: int = 300) -> None:
    """Write ``raw`` as ``tmp_path/r.yaml`` and ``script`` as ``tmp_path/ddp.py``, then run the script under
    ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo) with the recipe and ``overrides``; it must succeed."""
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    (tmp_path / "ddp.py").write_text(script)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(tmp_path / "ddp.py"), str(recipe), *overrides],
                         capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
