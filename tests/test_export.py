"""stillroom.models.export: a student written as GGUF reads back through transformers' own GGUF loader with the
same logits and the same tokenization; dtypes, refusals and the one-line errors."""

from __future__ import annotations

import pytest
import torch

from stillroom.errors import ConfigError, OutputExistsError
from stillroom.models.export import export_gguf
from stillroom.testing import corpus_texts, save_pair, tiny_llama, train_byte_bpe

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind"


@pytest.fixture(scope="module")
def llama_student(tmp_path_factory):
    """A tiny Llama (GQA: 4 heads, 2 KV heads; untied head) with a byte-level BPE tokenizer and a chat template."""
    tok = train_byte_bpe([t[:50_000] for t in corpus_texts("train")], vocab_size=400)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = tiny_llama(len(tok), n_layer=2, hidden=64, n_head=4, intermediate=96)
    model.config.num_key_value_heads = 2
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(model.config).eval()
    return save_pair(model, tok, tmp_path_factory.mktemp("student") / "llama-student")


@pytest.fixture(scope="module")
def qwen2_student(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases, GQA, untied head) with a byte-level BPE tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_byte_bpe([t[:50_000] for t in corpus_texts("train")], vocab_size=400)
    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, rope_theta=1e6)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases a random init leaves at zero would hide a wrong layout
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return save_pair(model, tok, tmp_path_factory.mktemp("qwen2") / "qwen2-student")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_exported_student_runs_in_llama_cpp_as_in_transformers(llama_student, qwen2_student, tmp_path, family):
    """The round trip through the real engine: llama.cpp (llama-cpp-python) reads the f32 file, tokenizes as the
    Hugging Face tokenizer and gives transformers' logits (f32 KV cache: kernels alone differ)."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = llama_student if family == "llama" else qwen2_student
    out = export_gguf(folder, tmp_path / f"{family}.gguf", dtype="f32", progress=False)
    ref, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    llm = Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    for text in (TEXT, "Ünïcödé — “quotes” 123 4567\n\tend"):
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([ids])).logits[0]
        got = torch.tensor(llm.scores[: len(ids)])
        assert (got - want).abs().max() < 1e-3, float((got - want).abs().max())
    if family == "qwen2":  # and transformers' own GGUF loader reads it back
        model, _ = _reload(out)
        ids = torch.tensor([tok(TEXT)["input_ids"]])
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-4)


def _reload(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize(("dtype", "atol"), [("f32", 1e-5), ("f16", 2e-2), ("q8_0", 1e-1)])
def test_exported_student_reads_back_with_the_same_logits_and_tokens(llama_student, tmp_path, dtype, atol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(llama_student, tmp_path / f"s-{dtype}.gguf", dtype=dtype, progress=False)
    model, tok = _reload(out)
    ref = AutoModelForCausalLM.from_pretrained(llama_student).eval()
    ref_tok = AutoTokenizer.from_pretrained(llama_student)
    ids = ref_tok(TEXT, return_tensors="pt").input_ids
    assert tok(TEXT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        a, b = model(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=atol, rtol=0), float((a - b).abs().max())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > (0.999 if dtype == "f32" else 0.9)
    assert tok.chat_template == ref_tok.chat_template


def test_sizes_shrink_with_the_dtype(llama_student, tmp_path):
    sizes = {d: export_gguf(llama_student, tmp_path / f"{d}.gguf", dtype=d, progress=False).stat().st_size
             for d in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_refusals_are_one_line_naming_the_option(llama_student, tiny_models, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("yours")
    with pytest.raises(OutputExistsError, match="--gguf"):
        export_gguf(llama_student, out, progress=False)
    assert out.read_text() == "yours"  # never a user's file changed
    with pytest.raises(ConfigError, match="--dtype 'q4'"):
        export_gguf(llama_student, tmp_path / "y.gguf", dtype="q4", progress=False)
    with pytest.raises(ConfigError, match=r"export supports llama, qwen2 .* 'gpt2'"):
        export_gguf(tiny_models["gpt2-bpe"], tmp_path / "z.gguf", progress=False)
    assert not (tmp_path / "z.gguf").exists()


def test_cli_export_writes_the_file_and_refuses_in_one_line(llama_student, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    out = tmp_path / "s.gguf"
    r = CliRunner().invoke(app, ["export", "--model", str(llama_student), "--gguf", str(out), "--dtype", "q8_0",
                                 "--no-progress"])
    assert r.exit_code == 0 and out.is_file() and "q8_0" in r.stdout, r.output
    r = CliRunner().invoke(app, ["export", "--model", str(llama_student), "--gguf", str(out)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--overwrite" in r.stderr
    r = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "nope"), "--gguf", str(tmp_path / "n.gguf")])
    assert r.exit_code != 0 and r.stderr.startswith("error: --model") and r.stderr.count("\n") == 1


@pytest.mark.parametrize(("name", "pre"), [("gpt2", "gpt-2"), ("llama3", "llama-bpe"), ("qwen2.5", "qwen2"),
                                           ("deepseek-coder", None)])
def test_the_pre_tokenizer_is_named_as_llama_cpp_knows_it_or_refused(shared, name, pre):
    """llama.cpp splits text by a named regex: a tokenizer is written with the name of the one it uses, and one
    whose split llama.cpp does not know is refused rather than tokenized differently there."""
    import json

    from stillroom.models.export import _pre_name

    spec = json.loads((shared / "tokenizers" / name / "tokenizer.json").read_text(encoding="utf-8"))
    if pre is None:
        with pytest.raises(ConfigError, match="pre-tokenizer is none llama.cpp knows"):
            _pre_name(spec)
    else:
        assert _pre_name(spec) == pre
