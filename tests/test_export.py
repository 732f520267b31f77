"""stillroom.models.export (with gguf_arch and gguf_vocab): a student of each family written as GGUF runs in the
real llama.cpp with transformers' logits and tokens, and reads back through transformers' own GGUF loader;
dtypes, refusals and the one-line errors."""

from __future__ import annotations

import pytest
import torch

from stillroom.errors import ConfigError, OutputExistsError
from stillroom.models.export import export_gguf
from stillroom.testing import corpus_texts, save_pair, tiny_gpt2, tiny_llama, train_byte_bpe

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


def _gemma3(tok, path, seed: int, **shape):
    """A tiny Gemma 3 with RMSNorm weights drawn away from 0 (a 1 + w slip shows) saved with ``tok``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, max_position_embeddings=512,
                              pad_token_id=tok.pad_token_id or 0, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, **shape)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return save_pair(model, tok, path)


@pytest.fixture(scope="module")
def gemma3_student(shared, tmp_path_factory):
    """A tiny Gemma 3 with the real Gemma 3 tokenizer (262,144 ids, SentencePiece-style), a window of 8 tokens
    and its own layer pattern (sliding, global, sliding; query scale 1/sqrt(head_dim = 16)): what llama.cpp must
    read from the file rather than assume (its defaults are every 6th layer global)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared / "tokenizers" / "gemma3")
    return _gemma3(tok, tmp_path_factory.mktemp("gemma3") / "gemma3-student", 3, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.fixture(scope="module")
def gemma3_cut_student(gemma3_student, tmp_path_factory):
    """A student cut from the tiny Gemma 3 (its layers 1 and 2: global then sliding, a pattern no default has)."""
    from transformers import AutoTokenizer

    from stillroom.models.cut import cut_from

    model = cut_from(gemma3_student, [1, 2])
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    return save_pair(model, AutoTokenizer.from_pretrained(gemma3_student),
                     tmp_path_factory.mktemp("gemma3cut") / "gemma3-cut")


@pytest.fixture(scope="module")
def gemma3_plain(tiny_models, tmp_path_factory):
    """A tiny Gemma 3 in the shape transformers' GGUF loader assumes (every 6th layer global, query scale 1/16):
    2 sliding layers of window 8, head_dim 256; the fixture's SentencePiece-style tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    return _gemma3(tok, tmp_path_factory.mktemp("gemma3p") / "gemma3-plain", 4, num_hidden_layers=2,
                   num_attention_heads=1, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=8, layer_types=["sliding_attention"] * 2)


@pytest.fixture(scope="module")
def gpt2_student(tiny_models, tmp_path_factory):
    """A tiny GPT-2 (fused qkv in Conv1D layout, learned positions, tied head) with the byte-level BPE fixture."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    model = tiny_gpt2(len(tok), n_positions=1024, seed=5)  # 1024: transformers' GGUF loader assumes GPT-2's own
    with torch.no_grad():  # biases a random init leaves at zero would hide a wrong layout
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return save_pair(model, tok, tmp_path_factory.mktemp("gpt2") / "gpt2-student")


FAMILIES = ["llama", "qwen2", "gemma3", "gemma3_cut", "gpt2", "llama-spm"]


@pytest.fixture
def student(request, tiny_models):
    name = request.param
    return tiny_models["llama-spm"] if name == "llama-spm" else request.getfixturevalue(f"{name}_student")


@pytest.mark.parametrize("student", FAMILIES, indirect=True)
def test_exported_student_runs_in_llama_cpp_as_in_transformers(student, tmp_path):
    """The round trip through the real engine: llama.cpp (llama-cpp-python) reads the f32 file, tokenizes as the
    Hugging Face tokenizer (byte-level and SentencePiece-style, on a page of the corpus too) and gives
    transformers' logits (f32 KV cache: kernels alone differ; measured ≤ 4e-4), past Gemma's 8-token window."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(student, tmp_path / "s.gguf", dtype="f32", progress=False)
    ref, tok = AutoModelForCausalLM.from_pretrained(student).eval(), AutoTokenizer.from_pretrained(student)
    llm = Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    page = corpus_texts("validation")[0][:3000]
    assert llm.tokenize(page.encode(), add_bos=False, special=False) == tok(page, add_special_tokens=False)["input_ids"]
    for text in (TEXT, "Ünïcödé — “quotes” 123 4567\n\tend  two  spaces"):
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), special=False) == ids  # BOS added (or not) as the HF tokenizer does
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([ids])).logits[0]
        got = torch.tensor(llm.scores[: len(ids)])
        assert (got - want).abs().max() < 1e-3, float((got - want).abs().max())


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "gemma3"])
def test_transformers_gguf_loader_reads_the_export_back(name, qwen2_student, gpt2_student, gemma3_plain, tmp_path):
    """transformers' own GGUF loader rebuilds the same model from the file (f32: the same logits)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = {"qwen2": qwen2_student, "gpt2": gpt2_student, "gemma3": gemma3_plain}[name]
    out = export_gguf(folder, tmp_path / f"{name}.gguf", dtype="f32", progress=False)
    ref, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
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
    mistral = _mistral(tiny_models, tmp_path)
    with pytest.raises(ConfigError, match=r"export supports llama, qwen2, gemma3_text, gpt2 .* 'mistral'"):
        export_gguf(mistral, tmp_path / "z.gguf", progress=False)
    assert not (tmp_path / "z.gguf").exists()


def _mistral(tiny_models, tmp_path):
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)
    return save_pair(MistralForCausalLM(config), tok, tmp_path / "mistral")


def test_configs_llama_cpp_would_compute_differently_are_refused_naming_the_field(tiny_models):
    from transformers import Gemma3TextConfig, GPT2Config

    from stillroom.models.gguf_arch import family

    gemma = Gemma3TextConfig(vocab_size=10, hidden_size=64, head_dim=16, query_pre_attn_scalar=64)
    with pytest.raises(ConfigError, match=r"query_pre_attn_scalar = 64 \(llama.cpp uses 16\)"):
        family("gemma3_text", gemma)
    with pytest.raises(ConfigError, match="activation_function = 'relu'"):
        family("gpt2", GPT2Config(activation_function="relu"))
    assert family("gpt2", GPT2Config()).arch == "gpt2"


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

    from stillroom.models.gguf_vocab import pre_name as _pre_name

    spec = json.loads((shared / "tokenizers" / name / "tokenizer.json").read_text(encoding="utf-8"))
    if pre is None:
        with pytest.raises(ConfigError, match="pre-tokenizer is none llama.cpp knows"):
            _pre_name(spec)
    else:
        assert _pre_name(spec) == pre


def test_spm_scores_order_merges_as_hugging_face_ranks_them():
    """Hand-checked: the token first made by merge r scores −r (``ab`` by merge 0, ``abc`` by merge 1 — not by
    the later ``a`` + ``bc``); a normal token no merge makes scores below every merge; control −1000, bytes 0."""
    from stillroom.models.gguf_vocab import BYTE, CONTROL, NORMAL, spm_scores

    spec = {"model": {"merges": [["a", "b"], ["ab", "c"], ["b", "c"], ["a", "bc"]]}}
    tokens = ["<s>", "<0x41>", "a", "b", "c", "ab", "abc", "bc", "zz"]
    kinds = [CONTROL, BYTE, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL, NORMAL]
    assert spm_scores(spec, tokens, kinds) == [-1000.0, 0.0, -4.0, -4.0, -4.0, 0.0, -1.0, -2.0, -4.0]


@pytest.mark.parametrize("name", ["gemma3", "mistral-spm"])
def test_real_sentencepiece_style_tokenizers_tokenize_the_same_in_llama_cpp(shared, name, tmp_path):
    """The real Gemma 3 and Mistral-style tokenizers written as a vocabulary-only GGUF: llama.cpp's own
    tokenizer gives the Hugging Face ids on a page of every corpus work (scores from merge ranks; Mistral's
    leading space from its ``Prepend``)."""
    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from stillroom.models.gguf_vocab import read_spec, write_tokenizer

    folder = shared / "tokenizers" / name
    tok = AutoTokenizer.from_pretrained(folder)
    kind, spec = read_spec(folder)
    assert kind == "spm_bpe"
    path = tmp_path / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    write_tokenizer(w, tok, kind, spec, len(tok))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    texts = [t[i:i + 1500] for t in corpus_texts("train") + corpus_texts("validation") for i in (0, 20_000)]
    texts.append("Ünïcödé — “quotes” 123 4567\n\tend  two  spaces 🙂 日本語")
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tok(text, add_special_tokens=False)["input_ids"], text[:80]
