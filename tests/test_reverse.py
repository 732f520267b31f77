"""The student → teacher re-tokenization map (stillroom.tokenization.reverse) on real tokenizer pairs, checked
against each student token's own bytes and against the teacher tokenizer called token by token."""

from __future__ import annotations

import pytest
import torch

from stillroom.tokenization.reverse import piece_weights, reverse_map
from stillroom.tokenization.tokens import TokenTable


def _rows(m) -> dict[int, list[tuple[int, float]]]:
    cols = torch.repeat_interleave(torch.arange(m.ptr.numel() - 1), m.ptr.diff())
    out: dict[int, list[tuple[int, float]]] = {}
    for s, t, w in zip(m.rows.tolist(), cols.tolist(), m.weights.tolist(), strict=True):
        out.setdefault(s, []).append((t, w))
    return out


@pytest.mark.parametrize("student,teacher,whole", [("smollm2", "gemma3", 0.9), ("llama3", "mistral-spm", 0.2)])
def test_every_row_spells_its_student_token_with_decaying_weights(student, teacher, whole, shared_tokenizer):
    """``whole``: the share of student tokens the teacher spells as one token (a 262k vocabulary holds nearly all of
    a 49k one; a 32k SentencePiece vocabulary few of a 128k one)."""
    s_tok, t_tok = shared_tokenizer(student), shared_tokenizer(teacher)
    st, tt = TokenTable.from_tokenizer(s_tok), TokenTable.from_tokenizer(t_tok)
    m = reverse_map(st, tt, t_tok)
    rows = _rows(m)
    assert len(rows) == m.mapped > 0.95 * sum(1 for b in st.token_bytes if b)
    single = 0
    for s, entries in rows.items():
        entries.sort(key=lambda e: -e[1])  # the first piece has the largest weight
        assert sum(w for _, w in entries) == pytest.approx(1.0, abs=1e-5)
        spelled = b"".join(tt.token_bytes[t] for t, _ in entries)
        if len(entries) < 4:  # pieces past the fourth are cut
            assert spelled == st.token_bytes[s], (s, st.token_bytes[s], spelled)
        want = piece_weights(len(entries), 0.1)
        assert [w for _, w in entries] == pytest.approx(list(want), abs=1e-6)
        single += len(entries) == 1
    assert single > whole * len(rows)
    assert not any(st.is_special[s] for s in rows)


def test_the_teacher_tokenizer_called_token_by_token_agrees(shared_tokenizer):
    """For a sample of student tokens whose text is whole UTF-8, the map's pieces are the teacher tokenizer's own
    tokenization of that text, asked one token at a time."""
    s_tok, t_tok = shared_tokenizer("smollm2"), shared_tokenizer("gemma3")
    st, tt = TokenTable.from_tokenizer(s_tok), TokenTable.from_tokenizer(t_tok)
    rows = _rows(reverse_map(st, tt, t_tok, decay=0.5))
    checked = split = 0
    for s in range(0, len(st.token_bytes), 97):
        try:
            text = st.token_bytes[s].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text or st.is_special[s]:
            continue
        ids = t_tok.encode(text, add_special_tokens=False)[:4]
        got = [t for t, _ in sorted(rows[s], key=lambda e: -e[1])]
        assert got == ids, (s, text)
        checked += 1
        split += len(ids) > 1
    assert checked > 400 and split > 5


def test_hand_checked_pieces(shared_tokenizer):
    s_tok, t_tok = shared_tokenizer("smollm2"), shared_tokenizer("gemma3")
    st, tt = TokenTable.from_tokenizer(s_tok), TokenTable.from_tokenizer(t_tok)
    rows = _rows(reverse_map(st, tt, t_tok))
    the = s_tok.convert_tokens_to_ids("Ġthe")
    assert rows[the] == [(t_tok.convert_tokens_to_ids("▁the"), 1.0)]  # an exact match is pinned
    # a byte-level token that is not whole UTF-8 (the first two bytes of "—") goes to Gemma's byte tokens
    partial = next(i for i, b in enumerate(st.token_bytes) if b == "—".encode()[:2])
    got = sorted(rows[partial], key=lambda e: -e[1])
    assert [tt.token_bytes[t] for t, _ in got] == [b"\xe2", b"\x80"]
    assert [w for _, w in got] == pytest.approx([1 / 1.1, 0.1 / 1.1])


def test_bad_settings_are_refused(shared_tokenizer):
    tok = shared_tokenizer("smollm2")
    t = TokenTable.from_tokenizer(tok)
    with pytest.raises(ValueError, match="pieces"):
        reverse_map(t, t, tok, pieces=0)
