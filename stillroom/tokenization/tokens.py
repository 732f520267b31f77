"""What every token id of a tokenizer contributes to the text, as exact bytes.

Cross-tokenizer work compares two tokenizations of the same text. Comparing token *strings* fails on
encoding details (``<0x0A>`` vs ``Ċ``, byte-level pieces of ``ï`` vs ``ï``), so stillroom compares *bytes*:
a :class:`TokenTable` knows, for every id, the bytes that token adds to the decoded text.

- byte-level BPE (GPT-2, Llama 3, Qwen, DeepSeek): each piece character maps back to one byte through the
  GPT-2 byte<->unicode table (``Ġ`` -> ``b" "``, ``Ċ`` -> ``b"\\n"``);
- SentencePiece-style (``▁`` BPE with byte fallback, Unigram/Metaspace): ``▁`` -> ``b" "``, ``<0xNN>`` ->
  ``bytes([NN])``; these tokenizers add a *virtual* leading space (``prefix_space``) that is not in the text;
- WordPiece (BERT): ``##x`` -> ``b"x"`` (continues a word); a word-initial ``x`` -> ``b"x"`` with
  ``space_before`` set: the decoder puts a space before it, except at the start and before a token starting
  with ``. , ? !`` (``...`` too);
- added tokens: special ones contribute ``b""`` (markers, not text); a non-special one that is also the
  model's own piece at the same id (Gemma 3's ``▁▁``…``▁``×31, ids 138-167) is read by the family's rule
  above (``▁▁`` -> ``b"  "``), as the model produces it from spaces; any other non-special one (``<think>``,
  DeepSeek-Coder's ``õ``) is matched on the raw text, so it contributes its content in UTF-8.

Tables are cached per tokenizer content hash, so building one for a 150k vocabulary happens once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# WordPiece decoder "cleanup" replaces " ." (" ,", " ?", " !") in the text: no space before a token starting so
_NO_SPACE_BEFORE = {b".", b",", b"?", b"!"}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _walk(node: Any):
    """Every dict inside a tokenizer.json component (normalizer/pre_tokenizer/decoder may be Sequences)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a Hugging Face tokenizer (or the object itself)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"TokenTable needs a fast tokenizer (a `tokenizers` backend); got {type(tokenizer).__name__}. "
            "Load it with AutoTokenizer.from_pretrained(path) (use_fast=True, a folder with tokenizer.json)."
        )
    return backend


@dataclass(eq=False)
class TokenTable:
    """id -> bytes for one tokenizer; see the module docstring for the rules per tokenizer family.

    ``token_bytes[i]`` is what token ``i`` contributes (``b""`` for special tokens); ``space_before[i]`` marks
    WordPiece word-initial tokens that the decoder separates with a space; ``prefix_space`` says the
    tokenizer adds a virtual space at the start of each text segment (SentencePiece ``Prepend``/``Metaspace``,
    byte-level ``add_prefix_space``), which :meth:`pieces` removes again.
    """

    token_bytes: list[bytes]
    token_strings: list[str]  # the raw vocabulary pieces ("Ġthe", "▁the", "##s", "<0x0A>"), for FuseLLM-style DTW
    is_special: np.ndarray  # bool [V]
    is_added: np.ndarray  # bool [V]: added tokens (special or not) split the text before normalisation
    space_before: np.ndarray  # bool [V]
    prefix_space: bool
    prefix_scheme: str  # "always" (every segment between added tokens) | "first" (text start only) | "never"
    unk_id: int | None
    kind: str  # "byte_level" | "sentencepiece" | "wordpiece" | "plain"
    hash: str
    vocab_size: int
    name: str = ""
    # Flat byte store for vectorised streams: token i's stream bytes are flat[starts[i]:starts[i + 1]],
    # where the stream form includes the WordPiece space (b" x") so offsets can be computed with numpy.
    flat: np.ndarray = field(repr=False, default=None)
    starts: np.ndarray = field(repr=False, default=None)
    lengths: np.ndarray = field(repr=False, default=None)
    lead_space: np.ndarray = field(repr=False, default=None)  # bool [V]: stream bytes start with b" "

    _cache: ClassVar[dict[str, TokenTable]] = {}  # content hash -> table

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenTable:
        """Build (or fetch from the cache) the table of a Hugging Face fast tokenizer or ``tokenizers.Tokenizer``."""
        backend = _backend(tokenizer)
        spec = backend.to_str()
        size = max(len(tokenizer) if hasattr(tokenizer, "__len__") else 0, backend.get_vocab_size(with_added_tokens=True))
        digest = hashlib.sha256(spec.encode("utf-8") + str(size).encode()).hexdigest()[:16]
        cached = TokenTable._cache.get(digest)
        if cached is not None:
            return cached
        table = cls._build(backend, json.loads(spec), size, digest, getattr(tokenizer, "name_or_path", "") or "")
        TokenTable._cache[digest] = table
        return table

    @classmethod
    def _build(cls, backend, spec: dict, size: int, digest: str, name: str) -> TokenTable:
        model = spec.get("model") or {}
        mtype = model.get("type", "")
        components = [spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")]
        nodes = [n for c in components for n in _walk(c)]
        byte_level = any(n.get("type") == "ByteLevel" for n in nodes)
        metaspace = [n for n in nodes if n.get("type") == "Metaspace"]
        prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in nodes)
        uses_meta = bool(metaspace) or prepend or any(
            n.get("type") == "Replace" and n.get("content") == "▁" or
            (n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == "▁") for n in nodes)
        byte_fallback = bool(model.get("byte_fallback"))

        if mtype == "WordPiece":
            kind = "wordpiece"
        elif byte_level:
            kind = "byte_level"
        elif uses_meta or mtype == "Unigram":
            kind = "sentencepiece"
        else:
            kind = "plain"

        prefix_scheme = "never"
        if kind == "sentencepiece":
            if prepend:
                prefix_scheme = "always"
            for n in metaspace:
                scheme = n.get("prepend_scheme", "always" if n.get("add_prefix_space", True) else "never")
                if scheme in ("always", "first") and prefix_scheme == "never":
                    prefix_scheme = scheme
        elif kind == "byte_level":
            pre = [n for n in _walk(spec.get("pre_tokenizer")) if n.get("type") == "ByteLevel"]
            if any(n.get("add_prefix_space") for n in pre):
                prefix_scheme = "always"
        elif kind == "wordpiece":
            prefix_scheme = "always"  # the stream form puts b" " before word-initial tokens; drop it at the start

        added = {int(a["id"]): a for a in spec.get("added_tokens") or []}
        unk_id = None
        if mtype == "Unigram" and model.get("unk_id") is not None:
            unk_id = int(model["unk_id"])
        elif model.get("unk_token") is not None:
            unk_id = backend.token_to_id(model["unk_token"])
        cont_prefix = model.get("continuing_subword_prefix") or ("##" if kind == "wordpiece" else "")

        token_bytes: list[bytes] = []
        token_strings: list[str] = []
        stream: list[bytes] = []
        is_special = np.zeros(size, dtype=bool)
        is_added = np.zeros(size, dtype=bool)
        space_before = np.zeros(size, dtype=bool)
        for i in range(size):
            piece = backend.id_to_token(i)
            if i in added:
                a = added[i]
                is_added[i] = True
                if a.get("special", False):
                    is_special[i] = True
                    token_strings.append(a["content"])
                    token_bytes.append(b"")
                    stream.append(b"")
                    continue
                if backend.model.id_to_token(i) != a["content"]:  # only matched on the text: its content
                    token_strings.append(a["content"])
                    b = a["content"].encode("utf-8")
                    token_bytes.append(b)
                    stream.append(b)
                    continue
                # also a piece of the model's own vocabulary (Gemma's "▁▁" runs): read it like any piece below
                piece = a["content"]
            if piece is None:  # a hole in the id space: nothing to decode, treat as special
                is_special[i] = True
                token_strings.append("")
                token_bytes.append(b"")
                stream.append(b"")
                continue
            token_strings.append(piece)
            if kind == "byte_level":
                if all(c in _UNICODE_TO_BYTE for c in piece):
                    b = bytes(_UNICODE_TO_BYTE[c] for c in piece)
                else:  # not a byte-level piece (should not happen in the model vocabulary): keep its UTF-8
                    b = piece.encode("utf-8")
                token_bytes.append(b)
                stream.append(b)
            elif kind == "sentencepiece":
                m = _BYTE_TOKEN.match(piece) if byte_fallback else None
                b = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode("utf-8")
                token_bytes.append(b)
                stream.append(b)
            elif kind == "wordpiece":
                if cont_prefix and piece.startswith(cont_prefix):
                    b = piece[len(cont_prefix):].encode("utf-8")
                    token_bytes.append(b)
                    stream.append(b)
                else:
                    b = piece.encode("utf-8")
                    token_bytes.append(b)
                    space_before[i] = b[:1] not in _NO_SPACE_BEFORE
                    stream.append(b" " + b if space_before[i] else b)
            else:
                if cont_prefix and piece.startswith(cont_prefix):
                    piece = piece[len(cont_prefix):]
                b = piece.encode("utf-8")
                token_bytes.append(b)
                stream.append(b)
        if unk_id is not None and 0 <= unk_id < size:
            is_special[unk_id] = True
            token_bytes[unk_id] = b""
            stream[unk_id] = b""

        lengths = np.fromiter((len(b) for b in stream), dtype=np.int64, count=size)
        starts = np.zeros(size + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        flat = np.frombuffer(b"".join(stream), dtype=np.uint8).copy()
        lead_space = np.zeros(size, dtype=bool)
        nonempty = lengths > 0
        lead_space[nonempty] = flat[starts[:-1][nonempty]] == 0x20
        return cls(token_bytes=token_bytes, token_strings=token_strings, is_special=is_special, is_added=is_added,
                   space_before=space_before, prefix_space=prefix_scheme != "never" and kind != "wordpiece",
                   prefix_scheme=prefix_scheme, unk_id=unk_id, kind=kind, hash=digest, vocab_size=size, name=name,
                   flat=flat, starts=starts, lengths=lengths, lead_space=lead_space)

    # ------------------------------------------------------------------------------------------------
    def check_ids(self, ids, what: str = "ids") -> np.ndarray:
        """``ids`` as an int64 numpy vector, or a ValueError naming the bad ids and the vocabulary size."""
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"{what}: expected a 1-D sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            return arr.astype(np.int64)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{what}: token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise ValueError(
                f"{what}: ids {arr[bad][:5].tolist()} are outside the vocabulary of {self.name or 'this tokenizer'} "
                f"(size {self.vocab_size}); were they produced by a different tokenizer?"
            )
        return arr

    def pieces(self, ids, *, checked: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The byte stream of ``ids`` and each token's offset into it: ``(uint8 [N], int64 [T + 1])``.

        Token ``t`` covers ``stream[offsets[t]:offsets[t + 1]]``. Context-dependent bytes are resolved here:
        the virtual leading space of a text segment (sequence start, or after an added token) is dropped,
        and WordPiece word-initial tokens get their separating space except at a segment start.
        Vectorised: no Python loop over tokens. ``checked=True`` skips validation (ids from :meth:`check_ids`).
        """
        if not checked:
            ids = self.check_ids(ids)
        start = self.starts[ids]
        length = self.lengths[ids]
        if ids.size and self.prefix_scheme != "never":
            seg_start = np.ones(ids.size, dtype=bool)
            seg_start[1:] = self.is_added[ids[:-1]]
            if self.prefix_scheme == "first":  # only the text's first segment (specials before it are template)
                seg_start[1:] &= np.logical_and.accumulate(self.is_special[ids[:-1]])
            drop = seg_start & self.lead_space[ids] & ~self.is_added[ids]
            start = start + drop
            length = length - drop
        offsets = np.empty(ids.size + 1, dtype=np.int64)
        offsets[0] = 0
        np.cumsum(length, out=offsets[1:])
        total = int(offsets[-1])
        # gather: byte k of the stream comes from flat[start[t] + (k - offsets[t])] for the token t holding k
        src = np.repeat(start - offsets[:-1], length)
        src += np.arange(total, dtype=np.int64)
        return self.flat[src], offsets

    def decode_bytes(self, ids) -> bytes:
        """The text bytes ``ids`` stand for (special tokens contribute nothing; virtual spaces removed)."""
        return self.pieces(ids)[0].tobytes()

    def decode(self, ids) -> str:
        """:meth:`decode_bytes` as a string (invalid UTF-8, e.g. a cut multi-byte character, is replaced)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers produce the same ids for every text: equal content hashes (``TokenTable.hash``)."""
    return a is b or TokenTable.from_tokenizer(a).hash == TokenTable.from_tokenizer(b).hash
