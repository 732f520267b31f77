"""stillroom.scoring: the windows cover every position once, and each forward's logits stay within the budget
(hand-checked groupings; the evaluation built on them is checked against naive references in test_evaluation)."""

from __future__ import annotations

from stillroom.scoring import forward_groups, window_spans


def test_window_spans_score_every_position_once():
    for n in range(1, 40):
        for context in (2, 3, 5, 8, 64):
            for stride in range(1, context):
                spans = window_spans(n, context, stride)
                scored = [p for _, e, first in spans for p in range(first, e)]
                assert scored == list(range(1, n))
                assert all(e - s <= context and s < first for s, e, first in spans)


def test_forward_groups_keep_each_forwards_logits_within_the_budget():
    assert forward_groups([4, 4, 4, 4, 4], batch_size=2, vocab=10) == [range(0, 2), range(2, 4), range(4, 5)]
    # 3 windows of width 4 × vocab 10 = 120 logits > 100: two go together; the wider third alone
    assert forward_groups([4, 4, 3, 9], batch_size=8, vocab=10, budget=100) == [range(0, 2), range(2, 3), range(3, 4)]
    assert forward_groups([30, 2], batch_size=8, vocab=10, budget=100) == [range(0, 1), range(1, 2)]  # over, alone
    assert forward_groups([], batch_size=8, vocab=10) == []
