"""Tokenization: what a token *is* in bytes, and how two tokenizations of one text line up.

Contract: ids in, arrays out; no model, no training. Depends on numpy, torch (projection) and the data contracts
(:mod:`stillroom.targets`) only.

- ``tokens``: :class:`TokenTable` — every id's exact bytes, for every tokenizer family;
- ``align``: :func:`align` — groups of tokens spelling the same bytes (exact, or FuseLLM's DTW);
- ``vocab``: :class:`VocabMap` (exact / MinED) and :func:`prefix_map` — one vocabulary onto another;
- ``project``: :func:`project`, :func:`student_targets` — a teacher's top-k moved onto the student's positions;
- ``reverse``: :func:`reverse_map` — the other way: each student token re-tokenized by a teacher (X-Token's map);
- ``unbiased``: ALM's unbiased chunk boundaries;
- ``special``: which special token pads a batch (:func:`pad_id`) or starts a document (:func:`separator_id`).

``align`` and ``project`` share their modules' names, so import them from there (or ``from stillroom import
align, project``).
"""

from stillroom.exports import lazy

_EXPORTS = {
    "TokenTable": "stillroom.tokenization.tokens",
    "same_tokenizer": "stillroom.tokenization.tokens",
    "Alignment": "stillroom.tokenization.align",
    "VocabMap": "stillroom.tokenization.vocab",
    "min_edit_distance_map": "stillroom.tokenization.vocab",
    "prefix_map": "stillroom.tokenization.vocab",
    "student_targets": "stillroom.tokenization.project",
    "ReverseMap": "stillroom.tokenization.reverse",
    "reverse_map": "stillroom.tokenization.reverse",
    "BoundaryBias": "stillroom.tokenization.unbiased",
    "unbiased_chunks": "stillroom.tokenization.unbiased",
    "unigram_probs": "stillroom.tokenization.unbiased",
    "pad_id": "stillroom.tokenization.special",
    "separator_id": "stillroom.tokenization.special",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
