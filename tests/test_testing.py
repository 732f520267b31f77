"""The fixtures themselves: tiny models reload offline, tokenizers behave like their real families."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillroom.testing import SHARED_TOKENIZERS, corpus_texts


def test_corpus_splits_are_disjoint_whole_works():
    train, val, test = corpus_texts("train"), corpus_texts("validation"), corpus_texts("test")
    assert len(train) >= 4 and len(val) >= 1 and len(test) >= 1
    assert not ({t[:200] for t in train} & ({t[:200] for t in val} | {t[:200] for t in test}))


def test_tiny_models_reload_and_run(tiny_models):
    for name, path in tiny_models.items():
        assert (path / "model.safetensors").exists(), name
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        ids = tok("To be, or not to be", return_tensors="pt")["input_ids"]
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
        assert model.config.vocab_size == len(tok)
        assert torch.isfinite(logits).all()


def test_teachers_differ_from_student(tiny_models):
    student = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe-teacher"])
    assert teacher.config.n_embd != student.config.n_embd
    s_tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    x_tok = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    assert s_tok.get_vocab() != x_tok.get_vocab()


def test_fixture_tokenizers_round_trip_like_their_families(tiny_models):
    text = "Hello  world,\n\tnaïve 東京 1850!"
    bpe = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    spm = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    assert bpe.decode(bpe(text)["input_ids"]) == text
    ids = spm(text)["input_ids"]
    assert ids[0] == spm.bos_token_id
    pieces = spm.convert_ids_to_tokens(ids)
    assert "<0x09>" in pieces and "<0xE6>" in pieces  # byte fallback, as Llama-2/Mistral
    assert any(p.startswith("▁") for p in pieces)
    assert spm.decode(ids, skip_special_tokens=True) == text


def test_shared_tokenizers_load(shared_tokenizer):
    for name in SHARED_TOKENIZERS:
        tok = shared_tokenizer(name)
        assert len(tok) > 1000, name
