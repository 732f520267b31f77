"""bench.kd_rows: the classes of rows by another tokenizer's cuts, checked on hand-tokenized text."""

import numpy as np
import pytest
import torch

from bench import kd_rows as kr
from stillroom.tokenization.tokens import TokenTable

TEXT = "Guildenstern forsooth"
# SmolLM2: G|uild|en|st|ern| for|so|oth   Gemma-3: <bos>|Guild|en|stern|▁for|so|oth
# "uild" starts inside "Guild" (byte 1), "ern" inside "stern" (byte 10); every other token starts at a Gemma cut.
INSIDE = [True, False, False, True, False, False, False, False]


@pytest.fixture(scope="module")
def tables(shared_tokenizer):
    g, s = shared_tokenizer("gemma3"), shared_tokenizer("smollm2")
    gi, si = g(TEXT)["input_ids"], s(TEXT)["input_ids"]
    assert [s.convert_ids_to_tokens(i) for i in si] == ["G", "uild", "en", "st", "ern", "Ġfor", "so", "oth"]
    assert [g.convert_ids_to_tokens(i) for i in gi] == ["<bos>", "Guild", "en", "stern", "▁for", "so", "oth"]
    return TokenTable.from_tokenizer(g), gi, TokenTable.from_tokenizer(s), si


def test_inside_rows_by_hand(tables):
    t_table, gi, s_table, si = tables
    assert kr.inside_rows(t_table, gi, s_table, si).tolist() == INSIDE
    # the same tokenizer on both sides: every student token starts at a cut
    assert not kr.inside_rows(s_table, si, s_table, si).any()


class _Signal:
    """The teacher's tokenization of each block, as a top-k cache returns it (only ``input_ids`` is read)."""

    def __init__(self, ids):
        self.ids = ids

    def signal(self, texts, example_ids):
        return [type("Out", (), {"input_ids": torch.tensor(self.ids)})() for _ in texts]


def test_keep_mask_splits_the_rows_and_drops_padding(tables):
    t_table, gi, s_table, si = tables
    n = len(si)
    ids = torch.zeros((2, n + 2), dtype=torch.long)
    attn = torch.zeros((2, n + 2), dtype=torch.long)
    ids[:, :n] = torch.tensor(si)
    attn[:, :n] = 1  # two padding columns on the right
    batch = {"input_ids": ids, "attention_mask": attn, "text": [TEXT, TEXT], "example_id": ["a", "b"]}
    inside = kr.keep_mask("inside", batch, _Signal(gi), t_table, s_table)
    starts = kr.keep_mask("starts", batch, _Signal(gi), t_table, s_table)
    want_inside = np.array(INSIDE + [False, False])
    want_starts = np.array([not x for x in INSIDE[:-1]] + [False, False, False])  # the last token predicts nothing
    for r in range(2):
        assert inside[r].tolist() == want_inside.tolist()
        assert starts[r].tolist() == want_starts.tolist()
    assert not (inside & starts).any()


def test_kd_rows_patches_the_trainer_only_while_open(tmp_path):
    from stillroom.training.trainer import DistillTrainer

    built = DistillTrainer.fused_target
    with kr.kd_rows("all", tmp_path / "unused", "unused", "unused"):
        assert DistillTrainer.fused_target is built
    with pytest.raises(ValueError, match="not one of"):
        with kr.kd_rows("boundary", tmp_path, "x", "y"):
            pass
    assert DistillTrainer.fused_target is built
