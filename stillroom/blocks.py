"""Documents → fixed-length token blocks for training: packing, the dataset and the collator.

**Packing** (the default, as TRL's ``packing``): each document is tokenized once as running text, a separator
token is put before it (the tokenizer's BOS, else its EOS, as GPT-2 does between documents), and the stream of
all documents is cut into blocks of exactly ``seq_len`` tokens; only the last block is padded. A document longer
than the room left in a block continues in the next one. Without packing every document starts a new block
(the last block of each document is padded), which is ~90% padding on line-per-example verse.

**Document boundaries.** Each block carries where its documents start (``starts``, token indices). The
collator turns them into ``position_ids`` that restart at 0 at every document and passes no attention mask:
transformers 5 then builds a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so
no token attends to another document. Measured on CPU (transformers 5.24, sdpa and eager, GPT-2, Llama,
Qwen2, Gemma-3): logits of two packed documents equal those of each document alone to 1e-7, whereas with a 2D
all-ones mask the second document differs by 0.1–0.6 (it sees the first). The padding after the last
document is one more segment, with label -100.

**Text.** A block's ``text`` is the exact concatenation of the pieces of the documents it holds (every byte of
every document lies in exactly one block, in order; ``text_starts`` gives where each piece begins), so
teachers with another tokenizer re-tokenize and align the same bytes. A document is cut only between two
tokens whose character spans do not overlap, so the student's ids for a piece cover exactly its characters.
Block ids are ``"<document id>#<piece>"`` of the piece that starts the block: stable keys for the teacher cache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

PADDING_WARN = 0.5  # warn when more than this fraction of the block positions is padding


@dataclass
class Block:
    """One training sequence: its raw text (what teachers re-tokenize) and the student's ids for it.

    ``starts``: token indices where a document (its separator, or a continued piece) begins; ``text_starts``:
    the matching character offsets in ``text``."""

    example_id: str
    text: str
    input_ids: list[int]
    starts: list[int] = field(default_factory=lambda: [0])
    text_starts: list[int] = field(default_factory=lambda: [0])


def separator_id(tokenizer) -> int | None:
    """The token put before each document: BOS when the tokenizer has one, else EOS, else none."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _cuttable(offsets: list[tuple[int, int]]) -> list[bool]:
    """``ok[k]``: a piece may start at token k (its characters do not overlap token k-1's, e.g. one character
    split over several byte-level tokens)."""
    return [k == 0 or offsets[k][0] >= offsets[k - 1][1] for k in range(len(offsets))]


def make_blocks(rows: list[tuple[str, str]], tokenizer, seq_len: int, add_bos: bool = True, pack: bool = True,
                min_tokens: int = 2, warn_padding: bool = True) -> list[Block]:
    """Documents ``[(id, text)]`` → blocks of at most ``seq_len`` student tokens (see the module docstring).

    ``add_bos``: put :func:`separator_id` before every document. ``pack``: fill blocks across documents; off,
    every document starts a new block. Blocks with fewer than ``min_tokens`` tokens are dropped.
    """
    if seq_len < 4:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 4 tokens")
    sep = separator_id(tokenizer) if add_bos else None
    blocks: list[Block] = []
    cur = Block("", "", [], [], [])

    def flush() -> None:
        nonlocal cur
        if len(cur.input_ids) >= min_tokens:
            blocks.append(cur)
        cur = Block("", "", [], [], [])

    for doc_id, text in rows:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if not ids:
            continue
        ok = _cuttable(offsets)
        if not pack and cur.input_ids:
            flush()
        k, char, piece, first = 0, 0, 0, True
        while first or k < len(ids):
            if len(cur.input_ids) >= seq_len:
                flush()
            head = [sep] if (first and sep is not None) else []
            room = seq_len - len(cur.input_ids) - len(head)
            end = min(k + room, len(ids))
            while k < end < len(ids) and not ok[end]:  # cut where the characters of two tokens do not overlap
                end -= 1
            if end == k and not head:  # no clean cut in the room left
                if not cur.input_ids:
                    raise ValueError(f"document {doc_id!r}: no clean token boundary within {seq_len} tokens")
                flush()
                continue
            char_end = len(text) if end == len(ids) else (offsets[end][0] if end > k else char)
            if not cur.input_ids:
                cur.example_id = f"{doc_id}#{piece}"
            cur.starts.append(len(cur.input_ids))
            cur.text_starts.append(len(cur.text))
            cur.input_ids += head + ids[k:end]
            cur.text += text[char:char_end]
            k, char, piece, first = end, char_end, piece + 1, False
            if k < len(ids) and len(cur.input_ids) < seq_len:  # stopped short of a full block: end it here
                flush()
    flush()
    if not blocks:
        raise ValueError("make_blocks: the data produced no blocks (all texts shorter than 2 tokens?)")
    if warn_padding:
        pad = padding_fraction(blocks, seq_len)
        if pad > PADDING_WARN:
            fix = (f"the data holds fewer tokens than a few blocks; lower data.seq_len (now {seq_len})" if pack else
                   "pack documents (data.packing: true) or read a .txt as larger documents "
                   "(data.documents: file or paragraph)")
            warnings.warn(f"{pad:.0%} of the {len(blocks)} blocks' {seq_len} positions are padding; {fix}",
                          stacklevel=2)
    return blocks


def padding_fraction(blocks: list[Block], seq_len: int) -> float:
    """Fraction of the ``len(blocks) * seq_len`` positions that hold no token."""
    return 1.0 - sum(len(b.input_ids) for b in blocks) / max(1, len(blocks) * seq_len)


class BlockDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Block` s (raw text travels with the ids, for the teachers)."""

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.blocks[i]
        return {"input_ids": b.input_ids, "text": b.text, "example_id": b.example_id, "starts": b.starts}


def position_ids(starts: list[int], n: int, seq_len: int) -> torch.Tensor:
    """``[seq_len]`` positions restarting at 0 at every document start and at the padding after ``n`` tokens."""
    pos = torch.arange(seq_len)
    seg_start = torch.zeros(seq_len, dtype=torch.long)
    for s in sorted(set(starts) | {n}):
        if s < seq_len:
            seg_start[s:] = s
    return pos - seg_start


class BlockCollator:
    """Pads every block to ``seq_len`` (fixed shapes); labels are the ids with padding set to -100.

    ``isolate_documents``: add ``position_ids`` that restart at every document, so models whose masks come from
    transformers' ``masking_utils`` attend within documents only (see the module docstring)."""

    def __init__(self, tokenizer, seq_len: int, isolate_documents: bool = True):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.seq_len, self.isolate = seq_len, isolate_documents

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(features)
        ids = torch.full((n, self.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, self.seq_len), dtype=torch.long)
        pos = torch.zeros((n, self.seq_len), dtype=torch.long)
        for r, f in enumerate(features):
            x = torch.as_tensor(f["input_ids"][: self.seq_len], dtype=torch.long)
            ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
            pos[r] = position_ids(f.get("starts", [0]), len(x), self.seq_len)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "text": [f["text"] for f in features], "example_id": [f["example_id"] for f in features]}
        if self.isolate:
            out["position_ids"] = pos
        return out


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What a causal LM is called with for a collated batch: ``position_ids`` without a mask when documents are
    isolated (the mask is then built from the positions, see the module docstring), else the 2D mask."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def export_blocks(blocks: list[Block], path) -> int:
    """Write blocks as JSONL ``{"id", "text"}`` (what ``stillroom cache --data`` reads), atomically (a crash
    leaves no partial file and no temporary behind); returns the count."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for b in blocks:
                f.write(json.dumps({"id": b.example_id, "text": b.text}) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return len(blocks)


def cap_documents(docs: list[str], tokenizer, max_tokens: int) -> list[str]:
    """The leading documents of ``docs`` holding at most ``max_tokens`` tokens, the last one cut at a token
    boundary (its characters up to the first token that does not fit): a time cap for evaluation."""
    out, left = [], max_tokens
    for doc in docs:
        if left <= 0:
            break
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= left:
            out.append(doc)
            left -= len(offsets)
            continue
        cut = offsets[left][0]
        if cut > 0:
            out.append(doc[:cut])
        break
    return out
