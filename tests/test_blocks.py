"""stillroom.inputs.blocks: packing against a naive reference packer, exact text, separators, padding, isolation."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from stillroom.inputs.blocks import (
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


# --- streaming ------------------------------------------------------------------------------------------------


def _fields(blocks):
    return [(b.example_id, b.text, b.input_ids, b.starts, b.text_starts) for b in blocks]


@pytest.mark.parametrize(("documents", "seq", "pack", "add_bos"), [
    ("paragraph", 32, True, True), ("line", 16, True, False), ("paragraph", 24, False, True), ("file", 64, True, True)])
def test_streamed_blocks_equal_make_blocks(shared, shared_tokenizer, tmp_path, documents, seq, pack, add_bos):
    import shutil

    from stillroom.inputs.blocks import iter_blocks
    from stillroom.inputs.text import iter_texts, load_texts

    tok = shared_tokenizer("gpt2")
    for f in sorted((shared / "corpus" / "shakespeare").glob("*.txt"))[:2]:  # two plays, as a folder DATA
        shutil.copy(f, tmp_path / f.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = make_blocks(load_texts(tmp_path, documents=documents), tok, seq, add_bos, pack)
        for batch_docs in (1, 7, 64):  # one tokenizer call per document, or batched
            got = iter_blocks(iter_texts(tmp_path, documents=documents), tok, seq, add_bos, pack,
                              batch_docs=batch_docs)
            assert _fields(got) == _fields(ref)


def test_streamed_multibyte_blocks_equal_make_blocks(shared_tokenizer, tmp_path):
    from stillroom.inputs.blocks import iter_blocks
    from stillroom.inputs.text import iter_texts, load_texts

    tok = shared_tokenizer("gpt2")
    p = tmp_path / "mixed.txt"
    p.write_text("\n\n".join(f"東京 {i} — naïve 🙂 café " * (i % 5 + 1) for i in range(60)), encoding="utf-8")
    ref = make_blocks(load_texts(p, documents="paragraph"), tok, 12)
    assert _fields(iter_blocks(iter_texts(p, documents="paragraph"), tok, 12, batch_docs=5)) == _fields(ref)


def test_streaming_dataset_shards_by_rank_disjoint_and_complete(gpt2_tok, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from stillroom.inputs.blocks import StreamingBlocks
    from stillroom.inputs.text import load_texts

    p = tmp_path / "c.txt"
    p.write_text("\n".join(t for _, t in _docs()), encoding="utf-8")
    ref = [b.example_id for b in make_blocks(load_texts(p, documents="line"), gpt2_tok, SEQ)]
    assert len(ref) > 20
    for world, cap in ((2, None), (3, None), (2, 11)):
        want = ref[:cap] if cap else ref
        shares = [[x["example_id"] for x in StreamingBlocks(p, gpt2_tok, SEQ, documents="line", max_blocks=cap,
                                                             rank=r, world_size=world)] for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(want)  # every block once across ranks...
        assert all(set(a).isdisjoint(b) for a, b in itertools.combinations(shares, 2))  # ...and on one rank only
        for r in range(world):  # by hand: rank r takes blocks r, r + world, ...
            assert shares[r] == want[r::world]
    # two data-loader workers on rank 1 of 2 split that rank's share again
    ds = StreamingBlocks(p, gpt2_tok, SEQ, documents="line", rank=1, world_size=2)
    got = []
    for w in range(2):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda w=w: SimpleNamespace(num_workers=2, id=w))
        got.append([x["example_id"] for x in ds])
    assert got == [ref[1::4], ref[3::4]]
    with pytest.raises(ValueError, match="rank=2"):
        StreamingBlocks(p, gpt2_tok, SEQ, rank=2, world_size=2)
    # a batch of streamed blocks collates as the in-memory dataset's does
    collate = BlockCollator(gpt2_tok, SEQ)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    one = next(iter(torch.utils.data.DataLoader(StreamingBlocks(p, gpt2_tok, SEQ, documents="line"), batch_size=4,
                                                collate_fn=collate)))
    two = collate([BlockDataset(make_blocks(load_texts(p, documents="line"), gpt2_tok, SEQ))[i] for i in range(4)])
    assert torch.equal(one["input_ids"], two["input_ids"]) and torch.equal(one["position_ids"], two["position_ids"])
    assert one["example_id"] == two["example_id"]


def test_export_blocks_streams_a_generator(gpt2_tok, tmp_path):
    import json

    from stillroom.inputs.blocks import export_blocks, iter_blocks

    docs = _docs()
    n = export_blocks(iter_blocks(iter(docs), gpt2_tok, SEQ), tmp_path / "b.jsonl")
    ref = make_blocks(docs, gpt2_tok, SEQ)
    lines = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == len(ref) == len(lines)
    assert lines == [{"id": b.example_id, "text": b.text} for b in ref]
