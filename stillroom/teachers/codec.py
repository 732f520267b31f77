"""How the teacher cache stores one example: compact, lossless in the ids, measured in the log-probs.

Per example row (V = teacher vocabulary, b = ceil(log2 V)):

- ``input_ids`` and ``topk_ids``: bit-packed, b bits each;
- top-k log-probs: sorted descending, quantised as codes of the gap to the row's top-1 on a grid of
  ``step = 16 / 2**m`` nats (m = 8 by default: step 1/16, gaps beyond 16 nats, a probability ratio below
  1e-7, clip): ``c_j = round((l_1 - l_j) / step)``. The codes rise along the row and ``c_1 = 0``, so only the
  k - 1 differences ``c_{j+1} - c_j`` are stored, one byte each; they are small, and the Parquet column's
  zstd compression entropy-codes them to ~3 bits. On disk an entry (id + code) takes b/8 + ~0.4 bytes
  (<= 3 bytes up to 2^18 ids). Decoding needs no top-1 value: the kept mass is known from the tail, so
  ``l_1 = log(1 - tail) - log sum_j exp(-c_j * step)`` and ``l_j = l_1 - c_j * step``;
- ``tail``: 16-bit code of logit(tail) on a uniform grid over [-20, 20] (relative error ~6e-4 on both the
  tail and the kept mass);
- ``gold_ce``: float16.

Parquet column statistics and dictionaries are off: the min/max statistics of a binary column are whole rows.

The writer (:func:`stillroom.teachers.cache.write_cache`) measures the encoding's error with :func:`topk_kl`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from stillroom.targets import TeacherOutput

TAIL_LOGIT_RANGE = 20.0
_TAIL_LEVELS = 65535


def id_bits(vocab_size: int) -> int:
    """Bits per token id: ceil(log2 V)."""
    return max(1, math.ceil(math.log2(max(2, vocab_size))))


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integers into ``bits`` bits each (little-endian bit order)."""
    v = np.ascontiguousarray(values).reshape(-1).astype(np.uint64)
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    if bits in (8, 16, 32):
        return v.astype({8: "<u1", 16: "<u2", 32: "<u4"}[bits]).tobytes()
    shifts = np.arange(bits, dtype=np.uint64)
    out = []
    for s in range(0, v.size, 1 << 16):  # chunks of a multiple of 8 values end on a byte boundary
        bitmat = ((v[s:s + (1 << 16), None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_bits(buf: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`; returns int64 ``[count]``."""
    if bits in (8, 16, 32):
        return np.frombuffer(buf, dtype={8: "<u1", 16: "<u2", 32: "<u4"}[bits], count=count).astype(np.int64)
    raw = np.frombuffer(buf, dtype=np.uint8)
    flat = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits).astype(np.int64)
    return flat @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def logprob_step(bits: int) -> float:
    return 16.0 / (1 << bits)


def encode_logprobs(logprobs: np.ndarray, bits: int) -> np.ndarray:
    """[T, k] sorted-descending log-probs -> integer codes of the gap to the top-1 (see module docstring)."""
    gap = logprobs[:, :1].astype(np.float64) - logprobs.astype(np.float64)
    return np.clip(np.rint(gap / logprob_step(bits)), 0, (1 << bits) - 1).astype(np.int64)


def decode_logprobs(codes: np.ndarray, tail: np.ndarray, bits: int) -> np.ndarray:
    """Codes [T, k] + tail [T] -> log-probs [T, k] whose mass is exactly ``1 - tail``."""
    gap = codes.astype(np.float64) * logprob_step(bits)
    lse = np.log(np.exp(-gap).sum(-1))
    top = np.log1p(-np.minimum(tail.astype(np.float64), 1 - 1e-12)) - lse
    return (top[:, None] - gap).astype(np.float32)


def encode_tail(tail: np.ndarray) -> np.ndarray:
    t = np.clip(tail.astype(np.float64), 1e-30, 1 - 1e-16)
    logit = np.clip(np.log(t) - np.log1p(-t), -TAIL_LOGIT_RANGE, TAIL_LOGIT_RANGE)
    return np.rint((logit + TAIL_LOGIT_RANGE) / (2 * TAIL_LOGIT_RANGE) * _TAIL_LEVELS).astype(np.int64)


def decode_tail(codes: np.ndarray) -> np.ndarray:
    logit = codes.astype(np.float64) / _TAIL_LEVELS * (2 * TAIL_LOGIT_RANGE) - TAIL_LOGIT_RANGE
    return (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)


def topk_kl(exact_lp: np.ndarray, exact_tail: np.ndarray, dec_lp: np.ndarray, dec_tail: np.ndarray) -> np.ndarray:
    """Per-token KL(p ‖ q) over the k + 1 bins (top-k entries plus the tail), in nats; [T]."""
    p = np.concatenate([np.exp(exact_lp.astype(np.float64)), exact_tail.astype(np.float64)[:, None]], -1)
    q = np.concatenate([np.exp(dec_lp.astype(np.float64)), dec_tail.astype(np.float64)[:, None]], -1)
    p = p / p.sum(-1, keepdims=True)
    q = np.maximum(q / q.sum(-1, keepdims=True), 1e-300)
    terms = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(q)), 0.0)
    return terms.sum(-1)


@dataclass
class Encoding:
    """How a cache stores one example (all fields derive from V and k)."""

    vocab_size: int
    top_k: int
    id_bits: int
    logprob_bits: int

    @classmethod
    def for_vocab(cls, vocab_size: int, top_k: int, logprob_bits: int | None = None) -> Encoding:
        bits = 8 if logprob_bits is None else int(logprob_bits)
        if not 2 <= bits <= 8:
            raise ValueError(f"logprob_bits must be in [2, 8], got {bits}")
        return cls(vocab_size, top_k, id_bits(vocab_size), bits)

    def encode(self, out: TeacherOutput) -> dict:
        lp = out.topk_logprobs.numpy()
        tail = out.tail.numpy()
        return {
            "id": out.example_id,
            "n_tokens": len(out),
            "input_ids": pack_bits(out.input_ids.numpy(), self.id_bits),
            "topk_ids": pack_bits(out.topk_ids.numpy(), self.id_bits),
            "topk_codes": np.diff(encode_logprobs(lp, self.logprob_bits), axis=1).astype(np.uint8).tobytes(),
            "tail": pack_bits(encode_tail(tail), 16),
            "gold_ce": out.gold_ce.numpy().astype("<f2").tobytes(),
        }

    def decode(self, row: dict) -> TeacherOutput:
        t, k = int(row["n_tokens"]), self.top_k
        tail = decode_tail(unpack_bits(row["tail"], 16, t))
        steps = np.frombuffer(row["topk_codes"], dtype=np.uint8, count=t * (k - 1)).reshape(t, k - 1)
        codes = np.concatenate([np.zeros((t, 1), np.int64), np.cumsum(steps, axis=1, dtype=np.int64)], axis=1)
        return TeacherOutput(
            example_id=row["id"],
            input_ids=torch.from_numpy(unpack_bits(row["input_ids"], self.id_bits, t)),
            topk_ids=torch.from_numpy(unpack_bits(row["topk_ids"], self.id_bits, t * k).reshape(t, k)),
            topk_logprobs=torch.from_numpy(decode_logprobs(codes, tail, self.logprob_bits)),
            tail=torch.from_numpy(tail),
            gold_ce=torch.from_numpy(np.frombuffer(row["gold_ce"], dtype="<f2").astype(np.float32)),
        )
