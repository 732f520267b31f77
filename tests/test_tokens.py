"""TokenTable: every id's bytes, checked against the tokenizers themselves (the independent reference)."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from stillroom.testing import SHARED_TOKENIZERS
from stillroom.tokenization.tokens import TokenTable

ADVERSARIAL = [
    "",
    "Hello, world!",
    " leading space",
    "trailing spaces   ",
    "runs    of     spaces",
    "tabs\tand\r\nwindows\r\nlines\n\n\n",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "CJK 東京は日本の首都です。",
    "combining: e\u0301 a\u0308 n\u0303",
    "naïve café résumé",
    "digits 1850 3.14159 1,000,000 007",
    "\n leading newline",
    "   ",
    "x",
    "mixed\u00a0nbsp and zero\u200bwidth",
]

# Tokenizers whose encode -> decode is lossless on text without special-token strings.
ROUND_TRIP = ("gpt2", "llama3", "qwen2.5", "deepseek-coder", "mistral-spm")

VOCAB_SIZES = {"gpt2": 50257, "llama3": 128256, "qwen2.5": 151665, "deepseek-coder": 32022,
               "mistral-spm": 32000, "t5-unigram-1k": 1101, "bert-uncased": 30522}


def passages(shared, n: int = 6, size: int = 600) -> list[str]:
    """A few corpus passages from different places of the shared corpus."""
    texts = [(shared / "corpus" / "botchan.txt").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((shared / "corpus" / "shakespeare").glob("*.txt"))[:3]]
    out = []
    for i in range(n):
        t = texts[i % len(texts)]
        start = (len(t) // (n + 1)) * (i + 1)
        out.append(t[start:start + size])
    return out


@pytest.fixture(scope="module")
def samples(shared):
    return passages(shared) + ADVERSARIAL


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_decode_bytes_round_trips(name, shared_tokenizer, samples):
    tok = shared_tokenizer(name)
    table = TokenTable.from_tokenizer(tok)
    for text in samples:
        ids = tok(text).input_ids
        expected = unicodedata.normalize("NFC", text) if name == "qwen2.5" else text  # qwen normalises NFC
        assert table.decode_bytes(ids) == expected.encode("utf-8"), (name, text)
        # and agrees with the tokenizer's own decoder
        assert table.decode(ids) == tok.decode(ids, skip_special_tokens=True), (name, text)


@pytest.mark.parametrize("name", SHARED_TOKENIZERS)
def test_vocab_size_and_specials(name, shared_tokenizer):
    tok = shared_tokenizer(name)
    table = TokenTable.from_tokenizer(tok)
    assert table.vocab_size == len(tok) == VOCAB_SIZES[name]
    assert len(table.token_bytes) == len(table.token_strings) == table.is_special.shape[0] == len(tok)
    for sid in tok.all_special_ids:
        assert table.is_special[sid] and table.token_bytes[sid] == b""
    assert TokenTable.from_tokenizer(tok) is table  # cached by content hash


def test_byte_level_pieces(shared_tokenizer):
    tok = shared_tokenizer("gpt2")
    t = TokenTable.from_tokenizer(tok)
    assert t.token_bytes[tok.convert_tokens_to_ids("Ċ")] == b"\n"
    assert t.token_bytes[tok.convert_tokens_to_ids("Ġthe")] == b" the"
    assert not t.prefix_space and t.kind == "byte_level"
    # a multi-byte character split over tokens: pieces are partial UTF-8, their concatenation is exact
    ids = tok(" 東").input_ids
    assert len(ids) > 1 and b"".join(t.token_bytes[i] for i in ids) == " 東".encode()


def test_llama3_added_tokens(shared_tokenizer):
    tok = shared_tokenizer("llama3")
    t = TokenTable.from_tokenizer(tok)
    think = tok.convert_tokens_to_ids("<think>")
    assert not t.is_special[think] and t.token_bytes[think] == b"<think>"
    ids = tok("a <think>b</think>").input_ids
    assert think in ids and t.decode_bytes(ids) == b"a <think>b</think>"
    bos = tok.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")
    assert t.is_special[bos] and t.token_bytes[bos] == b""


def test_sentencepiece_pieces(shared_tokenizer):
    tok = shared_tokenizer("mistral-spm")
    t = TokenTable.from_tokenizer(tok)
    assert t.kind == "sentencepiece" and t.prefix_space and t.prefix_scheme == "always"
    assert t.token_bytes[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert t.token_bytes[tok.convert_tokens_to_ids("▁Hello")] == b" Hello"
    assert t.unk_id == 0 and t.is_special[0]
    ids = tok("Hello").input_ids
    assert ids[0] == tok.bos_token_id
    stream, offsets = t.pieces(ids)
    assert stream.tobytes() == b"Hello" and offsets.tolist() == [0, 0, 5]  # virtual space dropped


def test_unigram_and_wordpiece_are_lossy_but_match_their_decoders(shared_tokenizer):
    t5 = shared_tokenizer("t5-unigram-1k")
    table = TokenTable.from_tokenizer(t5)
    assert table.kind == "sentencepiece" and table.prefix_space
    for text in ["Hello world", "the master said so", "I was  a boy"]:
        ids = t5(text).input_ids
        assert table.decode(ids) == t5.decode(ids, skip_special_tokens=True)
    bert = shared_tokenizer("bert-uncased")
    table = TokenTable.from_tokenizer(bert)
    assert table.kind == "wordpiece" and not table.prefix_space
    s_id = bert.convert_tokens_to_ids("##s")
    assert table.token_bytes[s_id] == b"s" and not table.space_before[s_id]
    assert table.space_before[bert.convert_tokens_to_ids("hello")]
    for text in ["Hello, world. How are you?", "Naïve CAFÉ owners!", "unbelievably tokenized words"]:
        ids = bert(text).input_ids
        assert table.decode(ids) == bert.decode(ids, skip_special_tokens=True)


def test_fixture_tokenizers_round_trip(tiny_models):
    from transformers import AutoTokenizer

    for name in ("gpt2-bpe", "llama-spm"):
        tok = AutoTokenizer.from_pretrained(tiny_models[name])
        t = TokenTable.from_tokenizer(tok)
        assert t.vocab_size == len(tok)
        for text in ADVERSARIAL:
            ids = tok(text).input_ids
            assert t.decode_bytes(ids) == text.encode(), (name, text)
    assert TokenTable.from_tokenizer(AutoTokenizer.from_pretrained(tiny_models["llama-spm"])).kind == "sentencepiece"


def test_pieces_offsets_are_consistent(shared_tokenizer):
    tok = shared_tokenizer("mistral-spm")
    t = TokenTable.from_tokenizer(tok)
    ids = tok("one\ntwo  three").input_ids
    stream, offsets = t.pieces(ids)
    assert offsets[0] == 0 and offsets[-1] == len(stream) and np.all(np.diff(offsets) >= 0)
    naive = b"".join(t.token_bytes[i] for i in ids)
    assert naive == b" " + stream.tobytes()  # only the virtual leading space differs


def test_bad_input(shared_tokenizer):
    t = TokenTable.from_tokenizer(shared_tokenizer("gpt2"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        t.decode_bytes([0, 50257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        t.decode_bytes([-1])
    with pytest.raises(ValueError, match="1-D"):
        t.decode_bytes([[1, 2]])
    with pytest.raises(TypeError, match="fast tokenizer"):
        TokenTable.from_tokenizer(object())
    assert t.decode_bytes([]) == b""
