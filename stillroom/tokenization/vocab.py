"""Vocabulary mapping: each source token id -> the target token id whose bytes are closest.

FuseLLM (arXiv 2401.10491) maps every token of one vocabulary to the token of another with the minimum
edit distance (MinED) between the token strings. stillroom does the same over the exact **bytes** each token
contributes to decoded text (from ``TokenTable``), so SentencePiece's ``<0x0A>`` and byte-level BPE's ``Ċ``
are the same byte ``0x0A`` and match exactly, and ``▁the`` matches ``Ġthe`` (both ``b" the"``).

Rule (deterministic, and the one every reference in tests and ``bench/vocab.py`` uses):
    mapping[s] = argmin_t (lev(bytes[s], bytes[t]), t)       over candidate targets t

i.e. the smallest byte Levenshtein distance (unit-cost insert/delete/substitute of one byte), ties broken by
the smallest target id. Candidate targets are the non-special target tokens with at least one byte.

The search is exact, not approximate, and avoids the |V_src| x |V_tgt| brute force:

1. distance 0: a dict from bytes to the smallest target id;
2. distance 1: every string within one edit of ``s`` is found by dict look-ups, no distance computed:
   ``t`` is ``s`` with one byte deleted, ``s`` is ``t`` with one byte deleted, or both with the byte at the
   same position deleted (a substitution);
3. the rest (distance >= 2): a lower bound prunes the targets. Bytes fall into 9 classes (space, a-z, A-Z,
   digits, other ASCII, UTF-8 continuation, 2-/3-/4-byte leads); for class counts A of ``s`` and B of ``t``

       lev(s, t) >= max(sum_c (A_c - B_c)+, sum_c (B_c - A_c)+)          (>= |len(s) - len(t)|)

   (one edit removes at most one class occurrence and adds at most one). Sources with equal class counts
   are searched together, target sets of growing bound in turn, each one multi-threaded
   ``rapidfuzz.process.cdist`` call (C++) with ``score_cutoff`` = the best distance so far; a source stops
   once its best distance is below the next bound. Targets in a set are in id order, so the first minimum
   is the smallest id. CJK sources never meet English targets this way: 8x fewer distance computations than
   the length bound alone for qwen2.5 -> llama3.

Byte strings go to rapidfuzz as latin-1 text: a 1:1 byte -> code point map, so distances are byte distances.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stillroom import files
from stillroom.files import atomic_write

FORMAT_VERSION = "1"  # bump when the rule or the file layout changes; old files are then refused
_NONE = np.iinfo(np.int64).max


# Byte classes for the lower bound of step 3: mapping bytes to classes never increases the edit distance,
# and the bag distance of the class multisets is at most the edit distance of the class strings.
_CLASS = np.full(256, 4, np.int64)  # 4: ASCII punctuation and control
_CLASS[0x20] = 0
_CLASS[ord("a"):ord("z") + 1] = 1
_CLASS[ord("A"):ord("Z") + 1] = 2
_CLASS[ord("0"):ord("9") + 1] = 3
_CLASS[0x80:0xC0] = 5  # UTF-8 continuation bytes
_CLASS[0xC0:0xE0] = 6  # lead of a 2-byte character
_CLASS[0xE0:0xF0] = 7  # lead of a 3-byte character (CJK)
_CLASS[0xF0:] = 8  # lead of a 4-byte character (emoji)
_N_CLASSES = 9


def _class_counts(strs: Sequence[bytes]) -> np.ndarray:
    """[len(strs), _N_CLASSES] int64: how many bytes of each class every string has."""
    if not strs:
        return np.zeros((0, _N_CLASSES), np.int64)
    lens = np.array([len(s) for s in strs], np.int64)
    flat = np.frombuffer(b"".join(strs), np.uint8)
    owner = np.repeat(np.arange(len(strs)), lens)
    return np.bincount(owner * _N_CLASSES + _CLASS[flat], minlength=len(strs) * _N_CLASSES).reshape(-1, _N_CLASSES)


def _unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct rows, index of each row's distinct row); a dict is much faster than np.unique(axis=0)."""
    index: dict[bytes, int] = {}
    inverse = np.array([index.setdefault(r.tobytes(), len(index)) for r in rows], np.int64)
    first = np.full(len(index), -1, np.int64)
    first[inverse[::-1]] = np.arange(len(rows))[::-1]
    return rows[first], inverse


def min_edit_distance_map(
    src: Sequence[bytes],
    tgt: Sequence[bytes],
    *,
    candidates: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    workers: int = -1,
    max_cells: int = 1 << 25,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact MinED over bytes: for each ``src[i]`` the target id ``t`` minimising ``(lev(src[i], tgt[t]), t)``.

    ``candidates`` (bool ``[len(tgt)]``, default all) restricts which targets may be chosen; empty target byte
    strings are never chosen. ``progress(n)`` is called with the number of source entries finished since its
    last call. ``workers`` is rapidfuzz's thread count (-1: all cores); ``max_cells`` bounds one distance
    block (source rows x target columns, one byte each). Returns ``(mapping int64 [len(src)],
    distance int32 [len(src)])``.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    n_src = len(src)
    src = [bytes(s) for s in src]
    tgt = [bytes(t) for t in tgt]
    mask = np.ones(len(tgt), bool) if candidates is None else np.asarray(candidates, bool)
    if mask.shape != (len(tgt),):
        raise ValueError(f"candidates must be a bool mask of shape ({len(tgt)},), got {mask.shape}")
    cand = [i for i in range(len(tgt)) if mask[i] and tgt[i]]
    if not cand:
        raise ValueError("no candidate target tokens: every target is special, masked out or has no bytes")
    mapping = np.full(n_src, -1, np.int64)
    distance = np.full(n_src, -1, np.int32)
    tick = progress or (lambda n: None)

    # 1. distance 0 and the look-up tables for distance 1. Ids are inserted in descending order so that
    # the value left for a key is its smallest target id.
    rev = cand[::-1]
    full = {tgt[i]: i for i in rev}
    del_any = {tgt[i][:p] + tgt[i][p + 1:]: i for i in rev for p in range(len(tgt[i]))}  # one byte deleted
    del_pos = {(tgt[i][:p] + tgt[i][p + 1:], p): i for i in rev for p in range(len(tgt[i]))}  # ... at p

    # Work on distinct source strings; copy results to duplicates at the end.
    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(src):
        groups.setdefault(s, []).append(i)
    best: dict[bytes, tuple[int, int]] = {}
    rest: list[bytes] = []
    n_done = 0
    for s, rows in groups.items():
        hit = full.get(s)
        if hit is not None:
            best[s] = (0, hit)
            n_done += len(rows)
            continue
        # 2. distance 1: t = s minus one byte, s = t minus one byte, or both minus the byte at p (substitution).
        hit = del_any.get(s, _NONE)
        for p in range(len(s)):
            v = s[:p] + s[p + 1:]
            hit = min(hit, full.get(v, _NONE), del_pos.get((v, p), _NONE))
        if hit != _NONE:
            best[s] = (1, hit)
            n_done += len(rows)
        else:
            rest.append(s)
    del full, del_any, del_pos
    tick(n_done)

    # 3. distance >= 2: search targets in order of a lower bound on the distance (see _class_counts).
    cand_ids = np.array(cand, np.int64)
    t_str = np.array([tgt[i].decode("latin-1") for i in cand], dtype=object)
    t_sig, t_group = _unique_rows(_class_counts([tgt[i] for i in cand]))
    s_sig, s_group = _unique_rows(_class_counts(rest))
    for g in range(len(s_sig)):
        members = np.flatnonzero(s_group == g)
        query = [rest[k].decode("latin-1") for k in members]
        diff = t_sig - s_sig[g]
        bound = np.maximum(np.clip(diff, 0, None).sum(1), np.clip(-diff, 0, None).sum(1))  # per target group
        t_bound = bound[t_group]  # per candidate, in id order
        b_dist = np.full(len(members), np.iinfo(np.int32).max, np.int64)
        b_id = np.full(len(members), _NONE, np.int64)
        for d in np.unique(bound).tolist():
            active = np.flatnonzero(b_dist >= d)  # lev >= d for these targets: only a tie or better matters
            if len(active) == 0:
                break
            cols = np.flatnonzero(t_bound == d)  # ascending id: the first minimum is the smallest id
            choices = t_str[cols].tolist()
            rows = max(1, max_cells // len(cols))
            for c0 in range(0, len(active), rows):
                sel = active[c0:c0 + rows]
                cutoff = int(b_dist[sel].max())
                dtype = np.uint8 if cutoff < 255 else np.int32
                block = process.cdist([query[k] for k in sel], choices, scorer=Levenshtein.distance,
                                      score_cutoff=None if cutoff >= 1 << 30 else cutoff, dtype=dtype,
                                      workers=workers)
                arg = block.argmin(axis=1)
                dist = block[np.arange(len(sel)), arg].astype(np.int64)
                ids = cand_ids[cols[arg]]
                better = (dist < b_dist[sel]) | ((dist == b_dist[sel]) & (ids < b_id[sel]))
                b_dist[sel[better]] = dist[better]
                b_id[sel[better]] = ids[better]
        for k, i in enumerate(members):
            best[rest[i]] = (int(b_dist[k]), int(b_id[k]))
        tick(sum(len(groups[rest[i]]) for i in members))

    for s, rows in groups.items():
        dist_s, id_s = best[s]
        mapping[rows] = id_s
        distance[rows] = dist_s
    return mapping, distance


# ---------------------------------------------------------------------------------------------------------
# Special tokens carry no bytes. They map to the target special token with the same string, else to the one
# with the same role (begin/end of text, unknown, padding), else nowhere (``valid`` False).
_ROLES = {
    "bos": ("s", "bos", "begin_of_text", "beginoftext", "begin_of_sentence", "beginofsentence", "startoftext",
            "start_of_text", "cls"),
    "eos": ("/s", "eos", "end_of_text", "endoftext", "end_of_sentence", "endofsentence", "eot_id", "sep"),
    "unk": ("unk",),
    "pad": ("pad", "pad_token", "finetune_right_pad_id"),
}


def _role(token: str) -> str | None:
    """'bos' / 'eos' / 'unk' / 'pad' for the usual spellings (``<s>``, ``<|endoftext|>``, ``[UNK]``, ...)."""
    key = token.strip().lower().replace("｜", "|").replace("▁", "_").strip("<>[]|").strip()
    for role, names in _ROLES.items():
        if key in names:
            return role
    return None


def _special_targets(src_table, tgt_table) -> tuple[np.ndarray, np.ndarray]:
    """For every source special id: (target id or -1, same string?)."""
    tgt_special = np.flatnonzero(tgt_table.is_special)
    by_string: dict[str, int] = {}
    by_role: dict[str, int] = {}
    for i in tgt_special.tolist():
        s = tgt_table.token_strings[i]
        if s:
            by_string.setdefault(s, i)
            r = _role(s)
            if r is not None:
                by_role.setdefault(r, i)
    if tgt_table.unk_id is not None:
        by_role.setdefault("unk", int(tgt_table.unk_id))
    src_special = np.flatnonzero(src_table.is_special)
    out = np.full(len(src_special), -1, np.int64)
    same = np.zeros(len(src_special), bool)
    for k, i in enumerate(src_special.tolist()):
        s = src_table.token_strings[i]
        if s in by_string:
            out[k], same[k] = by_string[s], True
            continue
        r = _role(s) if s else None
        if r is None and src_table.unk_id is not None and i == src_table.unk_id:
            r = "unk"
        if r in by_role:
            out[k] = by_role[r]
    return out, same


@dataclass(eq=False)
class VocabMap:
    """Source vocabulary -> target vocabulary, built once per pair of tokenizers (see the module docstring).

    ``mapping[s]`` is always a valid target id; ``valid[s]`` is False where the source token has no sensible
    counterpart (a special token with no special of the same string or role in the target, or a token with
    no bytes) — there ``mapping`` holds a stand-in (the target's unknown token, else its first special, else
    its MinED for ``b""``) and :attr:`masked_mapping` holds -1, which ``align.project`` moves to the tail.
    ``distance`` is the byte edit distance (-1 for special tokens), ``exact`` marks equal bytes (or a special
    token with the same string).
    """

    mapping: np.ndarray  # int64 [V_src]
    distance: np.ndarray  # int32 [V_src]
    exact: np.ndarray  # bool [V_src]
    valid: np.ndarray  # bool [V_src]
    src_hash: str
    tgt_hash: str
    src_vocab_size: int
    tgt_vocab_size: int
    src_name: str = ""
    tgt_name: str = ""

    @property
    def masked_mapping(self) -> np.ndarray:
        """``mapping`` with -1 where ``valid`` is False."""
        return np.where(self.valid, self.mapping, -1)

    def __len__(self) -> int:
        return len(self.mapping)

    def __call__(self, ids) -> np.ndarray:
        """Target ids for source ``ids`` (any int array shape)."""
        return self.mapping[np.asarray(ids, np.int64)]

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, src_table, tgt_table, *, progress: bool | Callable[[int], None] = True,
              workers: int = -1) -> VocabMap:
        """Map every id of ``src_table`` onto ``tgt_table`` (both ``stillroom.tokenization.tokens.TokenTable``).

        Ordinary tokens: exact bytes, else MinED over bytes among the target's non-special tokens (ties: the
        smallest target id). Special tokens: see :func:`_special_targets`. ``progress``: True shows a Rich
        progress bar, a callable is called with the number of source ids finished.
        """
        src_bytes = list(src_table.token_bytes)
        if len(src_bytes) != src_table.vocab_size or len(tgt_table.token_bytes) != tgt_table.vocab_size:
            raise ValueError("VocabMap.build: token_bytes and vocab_size disagree in a TokenTable")
        src_special = np.asarray(src_table.is_special, bool)
        tgt_special = np.asarray(tgt_table.is_special, bool)
        ordinary = np.flatnonzero(~src_special & np.array([len(b) > 0 for b in src_bytes], bool))

        if progress is True:
            from rich.console import Console

            from stillroom.progress import bar as progress_bar

            bar = progress_bar(console=Console(), transient=True)
            with bar:
                task = bar.add_task(f"vocab map {src_table.name or 'source'} -> {tgt_table.name or 'target'}",
                                    total=len(ordinary))
                mapping, distance = min_edit_distance_map([src_bytes[i] for i in ordinary], tgt_table.token_bytes,
                                                          candidates=~tgt_special, workers=workers,
                                                          progress=lambda n: bar.advance(task, n))
        else:
            mapping, distance = min_edit_distance_map([src_bytes[i] for i in ordinary], tgt_table.token_bytes,
                                                      candidates=~tgt_special, workers=workers,
                                                      progress=progress or None)

        V = src_table.vocab_size
        out = cls(mapping=np.full(V, -1, np.int64), distance=np.full(V, -1, np.int32), exact=np.zeros(V, bool),
                  valid=np.zeros(V, bool), src_hash=src_table.hash, tgt_hash=tgt_table.hash,
                  src_vocab_size=V, tgt_vocab_size=tgt_table.vocab_size, src_name=src_table.name,
                  tgt_name=tgt_table.name)
        out.mapping[ordinary] = mapping
        out.distance[ordinary] = distance
        out.exact[ordinary] = distance == 0
        out.valid[ordinary] = True
        special = np.flatnonzero(src_special)
        s_map, s_same = _special_targets(src_table, tgt_table)
        out.mapping[special] = s_map
        out.exact[special] = s_same
        out.valid[special] = s_map >= 0
        # stand-in for the rest (unmatched specials, tokens without bytes): keeps every id usable as an index
        stand_in = tgt_table.unk_id if tgt_table.unk_id is not None else (
            int(np.flatnonzero(tgt_special)[0]) if tgt_special.any() else
            int(min_edit_distance_map([b""], tgt_table.token_bytes, candidates=~tgt_special)[0][0]))
        out.mapping[out.mapping < 0] = stand_in
        return out

    # ------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Coverage summary: counts, exact share and mean/max byte distance over ordinary (non-special) tokens."""
        ordinary = self.distance >= 0
        n = int(ordinary.sum())
        d = self.distance[ordinary]
        specials = ~ordinary
        return {
            "source_vocab": self.src_vocab_size,
            "target_vocab": self.tgt_vocab_size,
            "ordinary": n,
            "exact": int((d == 0).sum()),
            "exact_pct": 100.0 * float((d == 0).mean()) if n else 0.0,
            "mean_distance": float(d.mean()) if n else 0.0,
            "mean_distance_inexact": float(d[d > 0].mean()) if (d > 0).any() else 0.0,
            "max_distance": int(d.max()) if n else 0,
            "distance_1": int((d == 1).sum()),
            "distance_2": int((d == 2).sum()),
            "distance_3_plus": int((d >= 3).sum()),
            "special": int(specials.sum()),
            "special_mapped": int((specials & self.valid).sum()),
            "unmapped": int((~self.valid).sum()),
        }

    # ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (no pickle) holding the arrays and both tokenizers' hashes."""
        from safetensors.numpy import save_file


        path = Path(path)
        meta = {"format": "stillroom.vocab_map", "version": FORMAT_VERSION, "src_hash": self.src_hash,
                "tgt_hash": self.tgt_hash, "src_vocab_size": str(self.src_vocab_size),
                "tgt_vocab_size": str(self.tgt_vocab_size), "src_name": self.src_name, "tgt_name": self.tgt_name}
        tensors = {"mapping": self.mapping.astype(np.int64), "distance": self.distance.astype(np.int32),
                   "exact": self.exact.astype(np.uint8), "valid": self.valid.astype(np.uint8)}
        # atomic: a reader never sees half a file, and a failed write leaves no temporary file behind
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, src_table=None, tgt_table=None) -> VocabMap:
        """Read a file written by :meth:`save`; with tables given, refuse a map built for other tokenizers."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no vocabulary map at {path}; build one with `stillroom vocab-map`")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "stillroom.vocab_map" or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a stillroom vocabulary map of format version {FORMAT_VERSION} "
                             f"(found {meta.get('format')!r} version {meta.get('version')!r}); rebuild it")
        for side, table in (("src", src_table), ("tgt", tgt_table)):
            if table is not None and meta.get(f"{side}_hash") != table.hash:
                what = "source" if side == "src" else "target"
                raise ValueError(
                    f"{path} was built for {what} tokenizer {meta.get(f'{side}_name') or '?'} (hash "
                    f"{meta.get(f'{side}_hash')}), not {table.name or 'this one'} (hash {table.hash}); rebuild it with "
                    "VocabMap.build(src_table, tgt_table) or `stillroom vocab-map`")
        return cls(mapping=arrays["mapping"].astype(np.int64), distance=arrays["distance"].astype(np.int32),
                   exact=arrays["exact"].astype(bool), valid=arrays["valid"].astype(bool),
                   src_hash=meta["src_hash"], tgt_hash=meta["tgt_hash"],
                   src_vocab_size=int(meta["src_vocab_size"]), tgt_vocab_size=int(meta["tgt_vocab_size"]),
                   src_name=meta.get("src_name", ""), tgt_name=meta.get("tgt_name", ""))

    @classmethod
    def cached(cls, src_table, tgt_table, cache_dir: str | os.PathLike | None = None, *,
               progress: bool | Callable[[int], None] = False) -> VocabMap:
        """Load the map for this pair of tokenizers from ``cache_dir``, building and saving it the first time.

        ``cache_dir`` defaults to ``$STILLROOM_CACHE/vocab`` or ``~/.cache/stillroom/vocab``; files are named by
        both tokenizer hashes. Also memoised in-process.
        """
        key = (src_table.hash, tgt_table.hash)
        if cache_dir is None and key in _MEMO:
            return _MEMO[key]
        root = Path(cache_dir) if cache_dir is not None else files.cache_dir("vocab")
        path = root / f"vocab-{src_table.hash}-{tgt_table.hash}.safetensors"
        if path.is_file():
            try:
                vmap = cls.load(path, src_table, tgt_table)
            except ValueError:  # an older format: rebuild
                vmap = cls.build(src_table, tgt_table, progress=progress)
                vmap.save(path)
        else:
            vmap = cls.build(src_table, tgt_table, progress=progress)
            vmap.save(path)
        if cache_dir is None:
            _MEMO[key] = vmap
        return vmap


_MEMO: dict[tuple[str, str], VocabMap] = {}


_PREFIX_MAPS: dict[tuple[str, str], np.ndarray] = {}


def prefix_map(src_table, tgt_table) -> np.ndarray:
    """For every source id, the longest ordinary target token whose bytes are a prefix of the source token's
    bytes (-1 for special tokens, tokens with no bytes, or no such target token); int64 ``[V_src]``.

    This is the map for moving *next-token* mass: a teacher that puts probability on token ``c`` says the
    text continues with ``bytes(c)``, and whatever the student emits next is a prefix of those bytes, so the
    student token that starts ``bytes(c)`` is the right recipient (greedy longest match standing in for the
    student tokenizer's first token of ``bytes(c)``). Exact tokens map to themselves; MinED instead picks the
    most *similar* string, which for a token the student lacks is often another word. Cached per pair.
    """
    key = (src_table.hash, tgt_table.hash)
    if key in _PREFIX_MAPS:
        return _PREFIX_MAPS[key]
    first = first_token(tgt_table)
    src_special = np.asarray(src_table.is_special, bool)
    out = np.full(src_table.vocab_size, -1, dtype=np.int64)
    for i, b in enumerate(src_table.token_bytes):
        if b and not src_special[i]:
            out[i] = first(b)
    _PREFIX_MAPS[key] = out
    return out


_FIRST: dict[str, Callable[[bytes], int]] = {}


def first_token(table) -> Callable[[bytes], int]:
    """``f(data) ->`` the longest ordinary token of ``table`` whose bytes ``data`` starts with (the smallest id
    among tokens with the same bytes), -1 when none: greedy longest match standing in for the tokenizer's first
    token of ``data``. Built once per table."""
    if table.hash in _FIRST:
        return _FIRST[table.hash]
    special = np.asarray(table.is_special, bool)
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(table.token_bytes):
        if b and not special[i] and b not in by_bytes:
            by_bytes[b] = i
    longest = max((len(b) for b in by_bytes), default=0)

    def first(data: bytes) -> int:
        for n in range(min(len(data), longest), 0, -1):
            t = by_bytes.get(data[:n])
            if t is not None:
                return t
        return -1

    _FIRST[table.hash] = first
    return first
