"""Which special token fills which role: one rule each, used everywhere a batch is padded or a document begins.

- :func:`pad_id`: the tokenizer's pad token, else EOS, else BOS, else 0. Padded positions are always masked
  (attention mask, labels −100, cut at the first stop id), so the id only has to be a valid embedding row.
- :func:`separator_id`: the token put before each document: BOS, else EOS, else none.
"""

from __future__ import annotations


def pad_id(tokenizer) -> int:
    """The id that fills padded positions (see the module docstring)."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def separator_id(tokenizer) -> int | None:
    """The token put before each document: BOS when the tokenizer has one, else EOS, else none."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None
