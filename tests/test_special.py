"""stillroom.tokenization.special: one rule for the pad id and the document separator, hand-checked."""

from __future__ import annotations

from types import SimpleNamespace

from stillroom.tokenization.special import pad_id, separator_id


def _tok(pad=None, eos=None, bos=None):
    return SimpleNamespace(pad_token_id=pad, eos_token_id=eos, bos_token_id=bos)


def test_pad_id_falls_back_pad_eos_bos_zero():
    assert pad_id(_tok(pad=3, eos=2, bos=1)) == 3
    assert pad_id(_tok(eos=2, bos=1)) == 2
    assert pad_id(_tok(bos=1)) == 1
    assert pad_id(_tok()) == 0
    assert pad_id(_tok(pad=0, eos=2)) == 0  # id 0 is an id, not "missing"


def test_separator_is_bos_else_eos_else_none():
    assert separator_id(_tok(eos=2, bos=1)) == 1
    assert separator_id(_tok(eos=2)) == 2
    assert separator_id(_tok()) is None


def test_batches_pad_with_the_one_rule(tiny_models):
    """The text and completion collators and the online teacher pad with pad_id."""
    from transformers import AutoTokenizer

    from stillroom.inputs import BlockCollator, CompletionCollator

    tok = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    tok.pad_token = None  # no pad token: the rule takes EOS
    assert tok.pad_token_id is None and tok.eos_token_id is not None and pad_id(tok) == tok.eos_token_id
    blocks = BlockCollator(tok, 16)
    from stillroom.inputs import BlockDataset
    from stillroom.inputs.blocks import make_blocks

    batch = blocks([BlockDataset(make_blocks([("a", "To be, or not")], tok, 16, pack=False))[0]])
    n = int(batch["attention_mask"].sum())
    assert (batch["input_ids"][0, n:] == pad_id(tok)).all() and n < 16
    from stillroom.inputs.chat import Example

    rows = CompletionCollator(tok, 32)([Example("e", "To be", None, ", or not")])
    m = int(rows["attention_mask"][0].sum())
    assert (rows["input_ids"][0, m:] == pad_id(tok)).all()
