"""stillroom.tokenization.unbiased: crossing sets, biases and merged chunks on hand-built BPE tokenizers whose answers are
worked out by hand; on real tokenizers, a tokenizer against itself is unbiased everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from stillroom.tokenization.tokens import TokenTable
from stillroom.tokenization.unbiased import (
    BoundaryBias,
    merge_chunks,
    unbiased_boundaries,
    unbiased_chunks,
    unigram_probs,
)


def _toy(vocab: list[str], merges: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, [tuple(m.split()) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


# T knows "abc" and "bc"; S only "ab". Ids: a 0, b 1, c 2, ab 3, bc 4, abc 5.
T_VOCAB, T_MERGES = ["a", "b", "c", "ab", "bc", "abc"], ["a b", "b c", "ab c"]
S_VOCAB, S_MERGES = ["a", "b", "c", "ab"], ["a b"]


def _rule(t_vocab=T_VOCAB, t_merges=T_MERGES, validate=True, threshold=1e-4):
    t, s = _toy(t_vocab, t_merges), _toy(S_VOCAB, S_MERGES)
    tt, st = TokenTable.from_tokenizer(t), TokenTable.from_tokenizer(s)
    pt = np.full(len(t_vocab), 1 / len(t_vocab))  # every token seen, uniform: biases are counts / |V|
    ps = np.full(len(S_VOCAB), 1 / len(S_VOCAB))
    return BoundaryBias(tt, st, pt, ps, t if validate else None, s if validate else None, threshold), t, s


def test_crossing_sets_and_biases_by_hand():
    rule, t, _ = _rule()
    assert t("abc", add_special_tokens=False)["input_ids"] == [5]  # the toy tokenizer merges "abc" whole
    # after "ab": T crosses with "abc" (X = "c"; "a"+"bc" is not how T spells "abc"); S cannot cross
    assert rule.teacher.crossing(3) == {b"c": 5}
    assert rule.student.crossing(3) == {}
    assert rule.bias(3, 3) == (pytest.approx(1 / 6), 0.0)
    assert not rule.unbiased(3, 3)
    # after "c": no token starts with "c" and goes on, on either side
    assert rule.teacher.crossing(2) == {} and rule.student.crossing(2) == {}
    assert rule.bias(2, 2) == (0.0, 0.0) and rule.unbiased(2, 2)
    # after "a": T crosses with "ab" (X "b") and "abc" (X "bc"); S with "ab" (X "b"): only "bc" is T's own
    assert rule.teacher.crossing(0) == {b"b": 3, b"bc": 5}
    assert rule.student.crossing(0) == {b"b": 3}
    assert rule.bias(0, 0) == (pytest.approx(1 / 6), 0.0)
    # a threshold above 1/6 accepts it
    assert _rule(threshold=0.2)[0].unbiased(0, 0)


def test_the_tokenizer_decides_which_crossings_are_real():
    # T2 has "bc" but merges "a b" first, so "abc" is spelled "ab" + "c": after "ab", "bc" never crosses
    t2_vocab, t2_merges = ["a", "b", "c", "ab", "bc"], ["a b", "b c"]
    rule, t, _ = _rule(t2_vocab, t2_merges)
    assert t.convert_ids_to_tokens(t("abc", add_special_tokens=False)["input_ids"]) == ["ab", "c"]
    assert rule.teacher.crossing(3) == {}
    assert rule.unbiased(3, 3)
    # without the tokenizer every vocabulary token that would cross counts (a superset): "bc" after "ab"
    loose, _, _ = _rule(t2_vocab, t2_merges, validate=False)
    assert loose.teacher.crossing(3) == {b"c": 4}
    assert loose.bias(3, 3) == (pytest.approx(1 / 5), 0.0) and not loose.unbiased(3, 3)


def test_merge_chunks_by_hand():
    groups = np.array([[0, 1, 0, 1], [1, 2, 1, 3], [2, 4, 3, 4], [4, 5, 4, 5]])
    exact = np.array([True, False, True, True])
    merged, ex = merge_chunks(groups, exact, np.array([False, True, True, False]))
    assert merged.tolist() == [[0, 2, 0, 3], [2, 4, 3, 4]]  # the trailing group has no unbiased end: dropped
    assert ex.tolist() == [False, True]


def test_unbiased_chunks_of_a_toy_alignment():
    from stillroom.tokenization.align import align

    rule, t, s = _rule()
    text = "abcab"  # T: abc ab; S: ab c ab
    tid, sid = t(text, add_special_tokens=False)["input_ids"], s(text, add_special_tokens=False)["input_ids"]
    assert tid == [5, 3] and sid == [3, 2, 3]
    al = align(tid, sid, rule.teacher.table, rule.student.table)
    assert al.groups.tolist() == [[0, 1, 0, 2], [1, 2, 2, 3]]
    # boundary after (abc, c): nothing crosses either side -> unbiased; after (ab, ab): T's "abc" -> biased
    assert unbiased_boundaries(al.groups, tid, sid, rule).tolist() == [True, False]
    groups, ex = unbiased_chunks(al, rule)
    assert groups.tolist() == [[0, 1, 0, 2]] and ex.tolist() == [True]


def test_a_special_token_only_one_side_has_closes_its_own_chunk():
    rule, t, s = _rule()
    rule.student.table.is_special[1] = True  # pretend S's "b" is a special token (a BOS-like marker)
    try:
        # (teacher "", student [b]) then (abc | ab c): the special group is a boundary of its own
        groups = np.array([[0, 0, 0, 1], [0, 1, 1, 3]])
        assert unbiased_boundaries(groups, [5], [1, 3, 2], rule).tolist() == [True, True]
    finally:
        rule.student.table.is_special[1] = False


def test_unigram_probs_count_the_tokenizers_ids():
    t = _toy(T_VOCAB, T_MERGES)
    p = unigram_probs(t, ["abcab", "c"], 6)  # abc ab | c
    assert p.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 0, 1 / 3])


def test_a_real_tokenizer_against_itself_is_unbiased_everywhere(shared_tokenizer, shared):
    """Same tokenizer on both sides: the crossing sets coincide, every boundary is unbiased, and the unbiased
    chunks are exactly the (one-to-one) alignment groups."""
    from stillroom.tokenization.align import align

    tok = shared_tokenizer("gpt2")
    table = TokenTable.from_tokenizer(tok)
    text = (shared / "corpus" / "shakespeare" / "hamlet_gut.txt").read_text(encoding="utf-8")[20000:21500]
    probs = unigram_probs(tok, [text], len(table.token_bytes))
    rule = BoundaryBias(table, table, probs, probs, tok, tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    al = align(ids, ids, table, table)
    groups, ex = unbiased_chunks(al, rule)
    assert groups.tolist() == al.groups.tolist() and ex.all()
