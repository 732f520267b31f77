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

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from stillroom.files import atomic_write
from stillroom.inputs.text import iter_texts
from stillroom.tokenization.special import pad_id, separator_id

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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        blocks = list(iter_blocks(rows, tokenizer, seq_len, add_bos, pack, min_tokens, warn_padding))
    for w in caught:  # re-raised here, so that they point at make_blocks' caller
        warnings.warn(w.message, w.category, stacklevel=2)
    return blocks


def iter_blocks(rows: Iterable[tuple[str, str]], tokenizer, seq_len: int, add_bos: bool = True, pack: bool = True,
                min_tokens: int = 2, warn_padding: bool = True, batch_docs: int = 64) -> Iterator[Block]:
    """:func:`make_blocks` as a generator over a document iterator (e.g. :func:`stillroom.inputs.text.iter_texts`):
    the same blocks in the same order, holding one block and ``batch_docs`` documents at a time (documents are
    tokenized ``batch_docs`` at a time: one call of the fast tokenizer instead of one per document)."""
    if seq_len < 4:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 4 tokens")
    sep = separator_id(tokenizer) if add_bos else None
    cur = Block("", "", [], [], [])
    n_blocks = n_tokens = 0
    docs = iter(rows)
    while batch := list(itertools.islice(docs, batch_docs)):
        encs = tokenizer([t for _, t in batch], add_special_tokens=False, return_offsets_mapping=True)
        for (doc_id, text), ids, offs in zip(batch, encs["input_ids"], encs["offset_mapping"], strict=True):
            ids, offsets = list(ids), [tuple(o) for o in offs]
            if not ids:
                continue
            ok = _cuttable(offsets)
            if not pack and cur.input_ids:
                if len(cur.input_ids) >= min_tokens:
                    n_blocks, n_tokens = n_blocks + 1, n_tokens + len(cur.input_ids)
                    yield cur
                cur = Block("", "", [], [], [])
            k, char, piece, first = 0, 0, 0, True
            while first or k < len(ids):
                flush = len(cur.input_ids) >= seq_len
                if not flush:
                    head = [sep] if (first and sep is not None) else []
                    room = seq_len - len(cur.input_ids) - len(head)
                    end = min(k + room, len(ids))
                    while k < end < len(ids) and not ok[end]:  # cut where two tokens' characters do not overlap
                        end -= 1
                    if end == k and not head:  # no clean cut in the room left
                        if not cur.input_ids:
                            raise ValueError(f"document {doc_id!r}: no clean token boundary within {seq_len} tokens")
                        flush = True
                if not flush:
                    char_end = len(text) if end == len(ids) else (offsets[end][0] if end > k else char)
                    if not cur.input_ids:
                        cur.example_id = f"{doc_id}#{piece}"
                    cur.starts.append(len(cur.input_ids))
                    cur.text_starts.append(len(cur.text))
                    cur.input_ids += head + ids[k:end]
                    cur.text += text[char:char_end]
                    k, char, piece, first = end, char_end, piece + 1, False
                    flush = k < len(ids) and len(cur.input_ids) < seq_len  # stopped short of a full block
                if flush:
                    if len(cur.input_ids) >= min_tokens:
                        n_blocks, n_tokens = n_blocks + 1, n_tokens + len(cur.input_ids)
                        yield cur
                    cur = Block("", "", [], [], [])
    if len(cur.input_ids) >= min_tokens:
        n_blocks, n_tokens = n_blocks + 1, n_tokens + len(cur.input_ids)
        yield cur
    if not n_blocks:
        raise ValueError("make_blocks: the data produced no blocks (all texts shorter than 2 tokens?)")
    pad = 1.0 - n_tokens / (n_blocks * seq_len)
    if warn_padding and pad > PADDING_WARN:
        fix = (f"the data holds fewer tokens than a few blocks; lower data.seq_len (now {seq_len})" if pack else
               "pack documents (data.packing: true) or read a .txt as larger documents "
               "(data.documents: file or paragraph)")
        warnings.warn(f"{pad:.0%} of the {n_blocks} blocks' {seq_len} positions are padding; {fix}", stacklevel=2)


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


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Iterable dataset of the blocks of a DATA path packed on the fly (:func:`~stillroom.inputs.text.iter_texts` →
    :func:`iter_blocks`): memory stays flat whatever the corpus size; every pass re-reads the data.

    Sharded by rank: rank r of ``world_size`` gets blocks ``i % world_size == r`` of the stream (and, inside a
    DataLoader with workers, worker w of W gets every W-th of those), so across ranks every block comes exactly
    once per pass. Every rank reads and packs the whole stream (a block's boundaries depend on all documents
    before it) and keeps its share. ``max_blocks`` caps the stream before it is sharded. ``rank`` /
    ``world_size`` default to ``torch.distributed`` (else one process)."""

    def __init__(self, path, tokenizer, seq_len: int, *, text_field: str = "text", documents: str = "file",
                 add_bos: bool = True, pack: bool = True, max_blocks: int | None = None, rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        self.path, self.tokenizer, self.seq_len = path, tokenizer, seq_len
        self.text_field, self.documents, self.add_bos, self.pack = text_field, documents, add_bos, pack
        self.max_blocks = max_blocks

    def blocks(self) -> Iterator[Block]:
        """The whole stream (all ranks' blocks), capped at ``max_blocks``."""
        rows = iter_texts(self.path, self.text_field, self.documents)
        return itertools.islice(iter_blocks(rows, self.tokenizer, self.seq_len, self.add_bos, self.pack,
                                            warn_padding=False), self.max_blocks)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        step, first = self.world_size * n_workers, self.rank + self.world_size * worker
        for b in itertools.islice(self.blocks(), first, None, step):
            yield {"input_ids": b.input_ids, "text": b.text, "example_id": b.example_id, "starts": b.starts}


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
        pad = pad_id(tokenizer)
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


def export_blocks(blocks: Iterable[Block], path) -> int:
    """Write blocks as JSONL ``{"id", "text"}`` (what ``stillroom cache --data`` reads), atomically (a crash
    leaves no partial file and no temporary behind); returns the count. ``blocks`` may be a generator
    (:func:`iter_blocks`): each block is written as it arrives."""
    import json

    n = 0

    def write(tmp) -> None:
        nonlocal n
        with open(tmp, "w", encoding="utf-8") as f:
            for b in blocks:
                f.write(json.dumps({"id": b.example_id, "text": b.text}) + "\n")
                n += 1

    atomic_write(path, write)
    return n


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
