"""TokenTable over every id of every real tokenizer we have (the 8 in ../shared/tokenizers and SmolLM2's).

Three independent references:
1. a per-family rule written here from the tokenizer.json file alone (not calling TokenTable): byte-level BPE
   through GPT-2's byte<->character table (built below), SentencePiece ``▁`` -> space and ``<0xNN>`` -> that
   byte, WordPiece ``##`` -> continuation; special tokens are markers (no bytes), an unknown token has none,
   a non-special added token that is not the model's piece at its id is matched on the raw text;
2. the tokenizer's own decoder on ``[anchor, id]`` for every id, with its known mistakes listed by id;
3. texts that tokenize to contain each non-special added token round-trip byte-exactly.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from stillroom.testing import SHARED_TOKENIZERS, shared_dir
from stillroom.tokenization.tokens import TokenTable
from tests.conftest import LOCAL_TOKENIZERS

ALL_TOKENIZERS = (*SHARED_TOKENIZERS, "gemma3", "smollm2")

FAMILY = {"gpt2": "byte_level", "llama3": "byte_level", "qwen2.5": "byte_level", "deepseek-coder": "byte_level",
          "smollm2": "byte_level", "mistral-spm": "sentencepiece", "gemma3": "sentencepiece",
          "t5-unigram-1k": "sentencepiece", "bert-uncased": "wordpiece"}
LOSSY = {"t5-unigram-1k", "bert-uncased"}  # unknown characters / lowercasing: text does not round-trip

# How many ids of each kind the rule finds, checked by hand against each tokenizer.json. Everything that is not
# an ordinary model piece is one of:
#   special    -- a marker (BOS, EOS, <pad>, chat tags): no bytes; the decoder skips it too. DeepSeek-Coder's
#                 <pad> (32018) is not special in tokenizer.json, but tokenizer_config.json names it pad_token
#   unknown    -- the model's unk piece when it is not an added token: it stands for text it lost
#   text_added -- a non-special added token that is not the model's piece at its id (<think>, DeepSeek's õ):
#                 matched on the raw text before normalisation, so it contributes its content in UTF-8
#   piece_added -- a non-special added token that is also the model's piece at the same id (Gemma's ▁▁ runs,
#                 <unusedN>, \n and \t runs): the model produces it from text, so the family rule applies
EXPECTED_KINDS = {
    "gpt2": {"special": 1},
    "llama3": {"special": 252, "text_added": 4},
    "qwen2.5": {"special": 14, "text_added": 8},
    "deepseek-coder": {"special": 3, "text_added": 19},
    "mistral-spm": {"special": 3},
    "t5-unigram-1k": {"special": 104},
    "bert-uncased": {"special": 5},
    "gemma3": {"special": 9, "piece_added": 6406},
    "smollm2": {"special": 17},
}

# The tokenizer's own decoder is wrong for these ids (peer check 2), and only these:
DECODER_WRONG = {
    # DeepSeek-Coder's added tokens 32000-32012 are Latin-1 letters (õ ÷ Á ý À ÿ ø ú þ ü ù ö û) matched on
    # the text; its ByteLevel decoder maps the character back to the one byte it stands for in GPT-2's table
    # (õ -> 0xF5), which alone is not UTF-8, and prints U+FFFD. The text "õ" is what the id stands for.
    "deepseek-coder": set(range(32000, 32013)),
}


def gpt2_char_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the 188 printable Latin-1 bytes stand for themselves, the other 68
    (controls, space, DEL, NBSP, soft hyphen) were moved, in byte order, to U+0100 onwards."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    moved = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(0x100 + k): b for k, b in enumerate(moved)})
    return table


C2B = gpt2_char_to_byte()


def test_gpt2_table_hand_checked():
    assert len(C2B) == 256 and sorted(C2B.values()) == list(range(256))
    assert C2B["Ġ"] == 0x20 and C2B["Ċ"] == 0x0A and C2B["ĉ"] == 0x09 and C2B["ł"] == 0xA0 and C2B["Ń"] == 0xAD
    assert C2B["A"] == 0x41 and C2B["ÿ"] == 0xFF


def tokenizer_files(name: str) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) of a tokenizer folder, as plain JSON."""
    folder = LOCAL_TOKENIZERS.get(name)
    if folder is None:
        root = shared_dir()
        if root is None:
            pytest.skip("../shared is absent (real tokenizers and corpus); set STILLROOM_SHARED to point at it")
        folder = root / "tokenizers" / name
    return tuple(json.loads((folder / f).read_text(encoding="utf-8")) for f in ("tokenizer.json", "tokenizer_config.json"))


def piece_bytes(family: str, piece: str, byte_fallback: bool) -> tuple[bytes, bool]:
    """(bytes, space before) of one model piece by its family's rule."""
    if family == "byte_level":
        return bytes(C2B[c] for c in piece), False
    if family == "sentencepiece":
        if byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)]), False
        return piece.replace("▁", " ").encode(), False
    if piece.startswith("##"):  # WordPiece: continues the word
        return piece[2:].encode(), False
    return piece.encode(), piece[:1] not in ".,?!"  # word start; the decoder's cleanup glues . , ? ! on


def rule_table(name: str) -> tuple[list[bytes], list[bool], dict[int, str]]:
    """Expected bytes and space-before per id from tokenizer.json alone, and the kind of each id that is not an
    ordinary model piece (see ``EXPECTED_KINDS``)."""
    spec, config = tokenizer_files(name)
    # transformers also makes special the added tokens that tokenizer_config.json names (pad_token: "<pad>")
    named = {v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    named |= set(config.get("additional_special_tokens") or []) | set(config.get("extra_special_tokens") or [])
    family, model = FAMILY[name], spec["model"]
    vocab = model["vocab"]
    pieces = dict(enumerate(p for p, _ in vocab)) if isinstance(vocab, list) else {i: p for p, i in vocab.items()}
    added = {a["id"]: a for a in spec["added_tokens"]}
    size = max(max(pieces), max(added)) + 1
    unk = model.get("unk_id") if isinstance(vocab, list) else vocab.get(model.get("unk_token"))
    out, space, kinds = [b""] * size, [False] * size, {}
    for i in range(size):
        a = added.get(i)
        if a is not None and (a["special"] or a["content"] in named):
            kinds[i] = "special"
        elif a is not None and pieces.get(i) != a["content"]:
            kinds[i], out[i] = "text_added", a["content"].encode()
        elif i == unk:
            kinds[i] = "unknown"
        else:
            if a is not None:
                kinds[i] = "piece_added"
            out[i], space[i] = piece_bytes(family, pieces[i], bool(model.get("byte_fallback")))
    return out, space, kinds


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_every_id_matches_the_family_rule(name, shared_tokenizer):
    tok = shared_tokenizer(name)
    table = TokenTable.from_tokenizer(tok)
    want, space, kinds = rule_table(name)
    assert table.vocab_size == len(want) == len(tok)
    assert dict(Counter(kinds.values())) == EXPECTED_KINDS[name]
    bad = [(i, table.token_strings[i], table.token_bytes[i], want[i]) for i in range(len(want))
           if table.token_bytes[i] != want[i]]
    assert not bad, f"{name}: {len(bad)} ids differ from the rule, e.g. {bad[:5]}"
    assert table.space_before.tolist() == space
    assert {i for i, k in kinds.items() if k in ("special", "unknown")} == set(table.is_special.nonzero()[0].tolist())


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_every_id_matches_the_tokenizers_decoder(name, shared_tokenizer):
    """``decode([anchor, id])`` against the anchor's text plus the id's bytes: the anchor ("a") keeps decoders
    from treating the id as the text start (SentencePiece strips a leading space there, WordPiece keeps ##);
    bytes that are not UTF-8 on their own (byte-level pieces of a character) become U+FFFD on both sides."""
    tok = shared_tokenizer(name)
    table = TokenTable.from_tokenizer(tok)
    (anchor,) = tok("a", add_special_tokens=False)["input_ids"]
    assert table.decode_bytes([anchor]) == b"a"
    got = tok.backend_tokenizer.decode_batch([[anchor, i] for i in range(len(tok))], skip_special_tokens=True)
    flat, starts = table.flat.tobytes(), table.starts.tolist()  # stream bytes: WordPiece's space included
    wrong = {i for i in range(len(tok)) if got[i] != (b"a" + flat[starts[i]:starts[i + 1]]).decode("utf-8", "replace")}
    assert wrong == DECODER_WRONG.get(name, set()), sorted(wrong)[:10]


def added_texts(text: str) -> list[str]:
    return [text, "a" + text + "b", "x = 1\n" + text + "y", "The answer is" + text + "."]


@pytest.mark.parametrize("name", ALL_TOKENIZERS)
def test_added_tokens_round_trip_in_text(name, shared_tokenizer):
    """Every non-special added token: texts made of what it stands for (its bytes by the rule above) tokenize
    to contain it, and decode back byte-exactly."""
    tok = shared_tokenizer(name)
    table = TokenTable.from_tokenizer(tok)
    want, _, kinds = rule_table(name)
    ids = [i for i, k in kinds.items() if k in ("text_added", "piece_added")]
    assert len(ids) == sum(n for k, n in EXPECTED_KINDS[name].items() if k.endswith("_added"))
    if not ids:
        return
    texts = [added_texts(want[i].decode("utf-8")) for i in ids]
    encoded = tok([t for group in texts for t in group], add_special_tokens=False)["input_ids"]
    missing = []
    for n, (i, group) in enumerate(zip(ids, texts, strict=True)):
        runs = encoded[n * len(group):(n + 1) * len(group)]
        if not any(i in r for r in runs):
            missing.append((i, want[i]))
        if name not in LOSSY:
            for text, r in zip(group, runs, strict=True):
                assert table.decode_bytes(r) == text.encode(), (name, i, text)
    assert not missing, f"{name}: no text tokenized to contain {missing[:5]}"


def test_gemma_space_runs_are_spaces(shared_tokenizer):
    """The issue's reproduction: ids 138-167 are runs of 2-31 spaces, and prompts ending in them decode exactly."""
    tok = shared_tokenizer("gemma3")
    table = TokenTable.from_tokenizer(tok)
    assert table.token_bytes[138] == b"  " and tok.decode([138]) == "  "
    for i in range(138, 168):
        assert table.token_strings[i] == "▁" * (i - 136) and table.token_bytes[i] == b" " * (i - 136)
        assert tok("a" + " " * (i - 136) + "b", add_special_tokens=False)["input_ids"][1] == i
    for text in ["if x:\n    ", "The answer is  ", "def f():\n        return  1\n\n\t\tx", "  " * 20]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert any(138 <= i < 168 for i in ids) and table.decode_bytes(ids) == text.encode()


def test_deepseek_text_added_token_keeps_its_content(shared_tokenizer):
    tok = shared_tokenizer("deepseek-coder")
    table = TokenTable.from_tokenizer(tok)
    ids = tok("naõ b", add_special_tokens=False)["input_ids"]
    assert 32000 in ids and table.token_bytes[32000] == "õ".encode()
    assert table.decode_bytes(ids) == "naõ b".encode() and "\ufffd" in tok.decode(ids)  # the decoder's mistake
