"""stillroom.blocks: packing against a naive reference packer, exact text, separators, padding, isolation."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from stillroom.blocks import (
    BlockCollator,
    BlockDataset,
    make_blocks,
    model_inputs,
    padding_fraction,
    position_ids,
    separator_id,
)
from stillroom.testing import corpus_texts

SEQ = 32


def _docs() -> list[tuple[str, str]]:
    text = corpus_texts("train")[0][:6000]
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return [(f"d{i}", ln) for i, ln in enumerate(lines[:120])]


def naive_pack(docs, tok, seq_len: int) -> list[list[int]]:
    """Reference: [sep] + ids of every document, concatenated, cut every seq_len tokens."""
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    stream = []
    for _, text in docs:
        stream += [sep] + tok(text, add_special_tokens=False)["input_ids"]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]


@pytest.fixture(scope="module")
def gpt2_tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])


def test_packing_matches_a_naive_packer(gpt2_tok):
    docs = _docs()
    blocks = make_blocks(docs, gpt2_tok, SEQ)
    ref = naive_pack(docs, gpt2_tok, SEQ)
    assert [b.input_ids for b in blocks] == ref  # ASCII text: every cut is clean, so blocks are exactly full
    assert all(len(b.input_ids) == SEQ for b in blocks[:-1])
    # The text is exactly recoverable and each piece's ids decode to its own characters.
    assert "".join(b.text for b in blocks) == "".join(t for _, t in docs)
    sep = separator_id(gpt2_tok)
    for b in blocks:
        bounds = [*b.starts, len(b.input_ids)]
        tbounds = [*b.text_starts, len(b.text)]
        for (s, e), (ts, te) in zip(itertools.pairwise(bounds), itertools.pairwise(tbounds), strict=True):
            ids = [i for i in b.input_ids[s:e] if i != sep]
            assert gpt2_tok.decode(ids) == b.text[ts:te]
    # Separators exactly where a document starts (not where a document continues from the last block).
    n_sep = sum(i == sep for b in blocks for i in b.input_ids)
    assert n_sep == len(docs)
    assert padding_fraction(blocks, SEQ) == pytest.approx(1 - sum(map(len, ref)) / (len(ref) * SEQ))


def test_multibyte_cuts_keep_every_token_once(shared_tokenizer):
    tok = shared_tokenizer("gpt2")  # byte-level BPE splits 東 etc. over tokens with overlapping offsets
    docs = [("ja", "東京は日本の首都です。" * 9), ("en", "Plain words after it. " * 5), ("mix", "naïve café 東 " * 7)]
    blocks = make_blocks(docs, tok, 16)
    stream = [i for blk in naive_pack(docs, tok, 16) for i in blk]
    assert [i for b in blocks for i in b.input_ids] == stream  # order kept, every token exactly once
    assert all(len(b.input_ids) <= 16 for b in blocks)
    assert "".join(b.text for b in blocks) == "".join(t for _, t in docs)
    for b in blocks:  # each block's ids are exactly its bytes (no character split between two blocks)
        assert tok.decode([i for i in b.input_ids if i != tok.eos_token_id]) == b.text


def test_no_packing_starts_every_document_in_a_new_block_and_warns_on_padding(gpt2_tok):
    docs = _docs()
    with pytest.warns(UserWarning, match=r"% of the \d+ blocks' 32 positions are padding"):
        blocks = make_blocks(docs, gpt2_tok, SEQ, pack=False)
    ref = []
    for d in docs:
        ref += [c for c in naive_pack([d], gpt2_tok, SEQ) if len(c) >= 2]  # min_tokens=2
    assert [b.input_ids for b in blocks] == ref
    assert [b.example_id for b in blocks if b.example_id.endswith("#0")] == [f"{d}#0" for d, _ in docs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = make_blocks(docs, gpt2_tok, SEQ)  # packed: only the last block is padded, no warning
    assert padding_fraction(packed, SEQ) < 1 / len(packed)
    assert padding_fraction(blocks, SEQ) > 0.5


def test_position_ids_restart_at_documents_and_padding():
    assert position_ids([0, 3, 7], 9, 12).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2]
    assert position_ids([0], 4, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", ["gpt2-bpe", "llama-spm"])
def test_packed_documents_do_not_see_each_other(tiny_models, name):
    """Logits of documents packed in one block equal those of each document run alone (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models[name])
    model = AutoModelForCausalLM.from_pretrained(tiny_models[name]).eval()
    docs = [("a", "To be, or not to be"), ("b", "that is the question."), ("c", "Whether 'tis nobler")]
    blocks = make_blocks(docs, tok, 64, warn_padding=False)
    assert len(blocks) == 1 and len(blocks[0].starts) == 3
    batch = BlockCollator(tok, 64)([BlockDataset(blocks)[0]])
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0]
        b = blocks[0]
        bounds = [*b.starts, len(b.input_ids)]
        for s, e in itertools.pairwise(bounds):
            alone = model(input_ids=torch.tensor([b.input_ids[s:e]])).logits[0]
            torch.testing.assert_close(packed[s:e], alone, atol=1e-4, rtol=1e-4)
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
    assert (leaky[bounds[1]:bounds[2]] - packed[bounds[1]:bounds[2]]).abs().max() > 1e-3  # the mask matters
