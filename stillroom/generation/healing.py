"""Token healing: continue a prompt that ends inside what the model would normally emit as one token.

A prompt such as ``"print('Hello, wo"`` ends mid-token: the tokenizer gives ``' wo'`` where the model, in
training, almost always saw ``' world'``, so it is at a position it never learnt. Healing (Su Jianlin, 2023)
backs off the last prompt token(s), remembers the bytes ``R`` they covered, and constrains generation so
the first generated tokens reproduce ``R``. With ``r`` the part of ``R`` not yet reproduced, a token with
bytes ``t`` is allowed iff

    r.startswith(t)  (it is a piece of r)   or   t.startswith(r)  (it finishes r and goes on)

and the distribution is renormalised over the allowed tokens (a hard constraint: other logits -> -inf)

    p_heal(t | x) = p(t | x) 1[t ok] / sum_u p(u | x) 1[u ok]

Once ``R`` is consumed generation is free. Everything works on the exact bytes of each token
(``stillroom.tokenization.tokens.TokenTable``), so byte-level BPE, SentencePiece ``▁`` with byte fallback (pieces of a
multi-byte character) and WordPiece vocabularies behave alike. Special tokens are never backed off, and the
prompt text is returned untouched (whitespace included): the output is ``prompt + continuation``.

Use it through :func:`generate`, or with ``model.generate`` directly::
    batch = prepare(tokenizer, prompts)                 # backs off, left-pads, builds the processor
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         logits_processor=[batch.processor], max_new_tokens=20)
    texts = batch.decode(out)                           # prompt + continuation, per prompt
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessor, StoppingCriteria

from stillroom.tokenization.special import pad_id
from stillroom.tokenization.tokens import TokenTable

DEFAULT_MAX_BACKOFF = 8  # tokens; healing also never removes more bytes than the longest vocabulary token


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with ``prefix`` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class PrefixIndex:
    """The vocabulary's byte strings, sorted once, answering the two queries healing needs.

    - tokens that *start with* ``r``: one contiguous range of the sorted strings (two bisections);
    - tokens that *are a prefix of* ``r``: at most ``len(r)`` dictionary look-ups.

    Built once per tokenizer (see :func:`index_for`); special tokens and tokens with no bytes are left out,
    so they are never backed off and never generated while healing.
    """

    def __init__(self, token_bytes: Sequence[bytes], is_special: Sequence[bool] | np.ndarray | None = None):
        n = len(token_bytes)
        special = np.zeros(n, dtype=bool) if is_special is None else np.asarray(is_special, dtype=bool)
        if special.shape != (n,):
            raise ValueError(f"is_special has shape {special.shape}; expected ({n},), one flag per token")
        self.token_bytes = list(token_bytes)
        usable = [i for i, b in enumerate(self.token_bytes) if b and not special[i]]
        usable.sort(key=self.token_bytes.__getitem__)
        self.keys = [self.token_bytes[i] for i in usable]  # sorted byte strings
        self.order = torch.tensor(usable, dtype=torch.long)  # id of each sorted string
        self.lengths = np.zeros(n, dtype=np.int64)  # bytes per id; 0 for specials (never consume R)
        self.lengths[usable] = [len(self.token_bytes[i]) for i in usable]
        self.exact: dict[bytes, list[int]] = {}
        for i in usable:
            self.exact.setdefault(self.token_bytes[i], []).append(i)
        self.max_len = max((len(k) for k in self.keys), default=0)
        self.vocab_size = n
        self._allowed: dict[bytes, torch.Tensor] = {}

    def extending(self, r: bytes) -> tuple[int, int]:
        """``[lo, hi)`` in sorted order: the tokens whose bytes start with ``r`` (``r`` itself included)."""
        lo = bisect_left(self.keys, r)
        succ = _successor(r)
        hi = len(self.keys) if succ is None else bisect_left(self.keys, succ, lo)
        return lo, hi

    def _completable(self, r: bytes) -> list[bool]:
        """ok[i]: some token sequence reproduces ``r[i:]`` (pieces of it, the last one possibly going on)."""
        ok = [False] * (len(r) + 1)
        ok[len(r)] = True
        for i in range(len(r) - 1, -1, -1):
            lo, hi = self.extending(r[i:])
            if hi > lo:
                ok[i] = True
                continue
            for j in range(i + 1, min(len(r), i + self.max_len + 1)):
                if ok[j] and r[i:j] in self.exact:
                    ok[i] = True
                    break
        return ok

    def allowed(self, r: bytes) -> torch.Tensor:
        """Ids (CPU, int64) of the tokens allowed when ``r`` is what is left to reproduce.

        Tokens that are a proper piece of ``r`` count only if the rest of ``r`` can still be reproduced
        afterwards, so the constraint never leads into a dead end (possible with WordPiece-like vocabularies).
        """
        hit = self._allowed.get(r)
        if hit is not None:
            return hit
        lo, hi = self.extending(r)
        ok = self._completable(r)
        parts = [self.order[lo:hi]]
        for j in range(1, min(len(r), self.max_len + 1)):
            ids = self.exact.get(r[:j])
            if ids and ok[j]:
                parts.append(torch.tensor(ids, dtype=torch.long))
        out = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        if len(self._allowed) > 4096:
            self._allowed.clear()
        self._allowed[r] = out
        return out

    def backoff(self, ids: Sequence[int], max_backoff: int = DEFAULT_MAX_BACKOFF) -> int:
        """How many trailing tokens of ``ids`` to back off.

        The largest ``k <= max_backoff`` such that the last ``k`` tokens are ordinary (not special) and their
        bytes are the start of one vocabulary token, i.e. the model could have emitted them as one token.
        ``k = 1`` is chosen only when some token strictly extends the last token (otherwise healing could not
        change anything). 0 means no healing.
        """
        best, r = 0, b""
        for k in range(1, min(max_backoff, len(ids)) + 1):
            t = ids[-k]
            if t < 0 or t >= self.vocab_size or self.lengths[t] == 0:
                break  # special (or unknown) token: never backed off, nor anything before it
            r = self.token_bytes[t] + r
            if len(r) > self.max_len:
                break  # no single token can cover these bytes, nor any longer tail
            lo, hi = self.extending(r)
            if hi - lo > (len(self.exact.get(r, ())) if k == 1 else 0):
                best = k
        return best


# One index per tokenizer: by object (cheap, no hashing per call), then by TokenTable.hash (shared content).
_BY_OBJECT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BY_HASH: dict[str, PrefixIndex] = {}


def index_for(tokenizer) -> PrefixIndex:
    """The :class:`PrefixIndex` of a Hugging Face tokenizer, built once and cached (by object and hash)."""
    try:
        hit = _BY_OBJECT.get(tokenizer)
    except TypeError:
        hit = None
    if hit is not None and hit[0] == len(tokenizer):  # tokens added since: rebuild
        return hit[1]

    table = TokenTable.from_tokenizer(tokenizer)
    index = _BY_HASH.get(table.hash)
    if index is None:
        data = table.token_bytes
        if table.kind == "wordpiece":  # word-initial tokens carry the space the decoder puts before them
            flat, starts = table.flat.tobytes(), table.starts.tolist()
            data = [flat[starts[i]:starts[i + 1]] for i in range(table.vocab_size)]
        index = _BY_HASH[table.hash] = PrefixIndex(data, table.is_special)
    try:
        _BY_OBJECT[tokenizer] = (len(tokenizer), index)
    except TypeError:
        pass
    return index


class TokenHealingLogitsProcessor(LogitsProcessor):
    """Hard healing constraint for ``model.generate(logits_processor=[...])``.

    ``removed[b]`` are the bytes backed off from prompt ``b`` (``b""``: no healing for that row);
    ``prompt_length`` is the padded prompt length handed to ``generate``. Stateless between calls (what is
    left of ``R`` is recomputed from the generated ids), so it also works with beam search, where each prompt
    occupies ``num_beams`` consecutive rows.
    """

    def __init__(self, index: PrefixIndex, removed: Sequence[bytes], prompt_length: int):
        self.index = index
        self.removed = list(removed)
        self.prompt_length = int(prompt_length)
        self.max_steps = max((len(r) for r in self.removed), default=0)  # every allowed token eats >= 1 byte

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        if step >= self.max_steps:
            return scores
        rows, n_vocab = scores.shape
        if rows % len(self.removed):
            raise ValueError(f"generate has {rows} rows for {len(self.removed)} prompts; expected a multiple")
        per = rows // len(self.removed)
        gen = input_ids[:, self.prompt_length:].cpu().numpy() if step else None
        keep = None
        for row in range(rows):
            r = self.removed[row // per]
            if not r:
                continue
            used = int(self.index.lengths[np.minimum(gen[row], self.index.vocab_size - 1)].sum()) if step else 0
            if used >= len(r):
                continue
            ids = self.index.allowed(r[used:])
            if n_vocab < self.index.vocab_size:
                ids = ids[ids < n_vocab]
            if keep is None:
                keep = torch.ones_like(scores, dtype=torch.bool)
            keep[row] = False
            keep[row, ids.to(scores.device)] = True
        return scores if keep is None else scores.masked_fill(~keep, float("-inf"))


class _RowBudget(StoppingCriteria):
    """Stops row ``b`` after ``limits[b]`` new tokens (``max_new_tokens`` plus that row's backed-off tokens)."""
    def __init__(self, prompt_length: int, limits: Sequence[int]):
        self.prompt_length = prompt_length
        self.limits = torch.tensor(list(limits), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        per = input_ids.shape[0] // len(self.limits)
        limits = self.limits.repeat_interleave(per).to(input_ids.device)
        return (input_ids.shape[1] - self.prompt_length) >= limits


_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _template(tokenizer) -> tuple[list[int], list[int]]:
    """(ids the tokenizer puts before a text, ids it appends after it), e.g. ``[BOS]``/``[]`` or ``[CLS]``/``[SEP]``."""
    try:
        hit = _TEMPLATES.get(tokenizer)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    found = ([], [])
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            found = (list(full[:i]), list(full[i + len(bare):]))
            break
    try:
        _TEMPLATES[tokenizer] = found
    except TypeError:
        pass
    return found


@dataclass
class HealedBatch:
    """Prompts made ready for ``model.generate``: healed (backed off) and left-padded.

    ``input_ids``/``attention_mask`` [B, T]; ``removed[b]`` the bytes prompt ``b`` gave up (to be regenerated);
    ``backed_off[b]`` how many tokens that was; ``processor`` the constraint to pass as ``logits_processor``
    (None when no prompt was healed).
    """

    prompts: list[str]
    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    removed: list[bytes]
    backed_off: list[int]
    index: PrefixIndex
    processor: TokenHealingLogitsProcessor | None
    eos_token_ids: set[int] = field(default_factory=set)

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]

    def decode(self, sequences: torch.Tensor, max_new_tokens: Sequence[int] | None = None) -> list[str]:
        """``prompt + continuation`` per prompt, from ``generate``'s output [B * n, T + new] (first of each n).

        The continuation is the generated bytes after the backed-off bytes, as UTF-8 (bad bytes, e.g. a
        character cut by ``max_new_tokens``, become U+FFFD). Generation stops at the first EOS id and after
        ``max_new_tokens[b]`` tokens when given. If generation ran out before reproducing the backed-off bytes,
        the continuation is empty.
        """
        per = sequences.shape[0] // len(self.prompts)
        out = []
        for b, prompt in enumerate(self.prompts):
            gen = sequences[b * per, self.prompt_length:].tolist()
            if max_new_tokens is not None:
                gen = gen[:max_new_tokens[b]]
            for j, t in enumerate(gen):
                if t in self.eos_token_ids:
                    gen = gen[:j]
                    break
            data = b"".join(self.index.token_bytes[t] for t in gen if 0 <= t < self.index.vocab_size)
            r = self.removed[b]
            if len(data) <= len(r):
                if not r.startswith(data):
                    raise ValueError(f"prompt {b}: generated bytes {data!r} do not reproduce the backed-off {r!r};"
                                     " pass batch.processor in logits_processor")
                out.append(prompt)
                continue
            if not data.startswith(r):
                raise ValueError(f"prompt {b}: generated bytes do not start with the backed-off {r!r}; "
                                 "pass batch.processor in logits_processor")
            out.append(prompt + data[len(r):].decode("utf-8", errors="replace"))
        return out


def _keeps_whitespace(prompt: str, removed: bytes) -> bool:
    """False when the prompt ends in whitespace the tokens do not carry (BERT and T5 drop it).

    Regenerating the backed-off word would then glue it to that whitespace (``"x\\n"`` -> ``"x\\nylophone"``).
    """
    tail = prompt[len(prompt.rstrip()):].encode("utf-8")
    if not tail:
        return True
    ends = removed[len(removed.rstrip()):]
    return tail.endswith(removed) if not removed.strip() else ends == tail


def prepare(tokenizer, prompts: str | Sequence[str], *, heal: bool = True,
            max_backoff: int = DEFAULT_MAX_BACKOFF, device: torch.device | str | None = None) -> HealedBatch:
    """Tokenize, back off each prompt's tail (when ``heal``) and left-pad, ready for ``model.generate``.

    Tokens the tokenizer appends after a text (BERT's ``[SEP]``) are dropped, since a prompt is continued,
    not ended; tokens it puts before (BOS, ``[CLS]``) are kept. A prompt with no tokens at all starts from the
    BOS (else EOS) token. When healing would remove every token and there is no such start token, one token is
    kept.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; pass at least one string")
    if max_backoff < 0:
        raise ValueError(f"max_backoff={max_backoff}; expected >= 0")
    index = index_for(tokenizer)
    head, _ = _template(tokenizer)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    rows, removed, backed = [], [], []
    for prompt, ids in zip(prompts, encoded, strict=True):
        ids = head + list(ids)
        k = index.backoff(ids, max_backoff) if heal else 0
        if k and not _keeps_whitespace(prompt, b"".join(index.token_bytes[t] for t in ids[len(ids) - k:])):
            k = 0
        if k == len(ids):  # nothing would be left to condition on
            if start is not None:
                ids = [start] + ids
            else:
                k = index.backoff(ids, len(ids) - 1)
        if not ids:
            if start is None:
                raise ValueError("empty prompt and the tokenizer has no BOS/EOS token to start from; "
                                 "give a non-empty prompt or set tokenizer.bos_token")
            ids = [start]
        removed.append(b"".join(index.token_bytes[t] for t in ids[len(ids) - k:]))
        backed.append(k)
        rows.append(ids[:len(ids) - k])
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, width - len(ids):] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    processor = TokenHealingLogitsProcessor(index, removed, width) if any(removed) else None
    eos = tokenizer.eos_token_id
    return HealedBatch(prompts, input_ids, attention_mask, removed, backed, index, processor,
                       {eos} if eos is not None else set())


def generate(model, tokenizer, prompts: str | Sequence[str], *, heal: bool = True, max_new_tokens: int = 32,
             do_sample: bool = False, max_backoff: int = DEFAULT_MAX_BACKOFF, **generate_kwargs) -> list[str]:
    """Continue each prompt with ``model``; returns ``prompt + continuation`` for every prompt (a list).

    With ``heal`` the prompt's tail is backed off and regenerated under the hard constraint, so the model
    continues from a token boundary it knows; the prompt text itself is returned exactly as given. Each
    prompt gets ``max_new_tokens`` tokens beyond the ones it backed off. Extra keyword arguments go to
    ``model.generate`` (``temperature``, ``top_p``, ``num_beams``, ...); greedy by default.
    """
    batch = prepare(tokenizer, prompts, heal=heal, max_backoff=max_backoff, device=model.device)
    limits = [max_new_tokens + k for k in batch.backed_off]
    processors = list(generate_kwargs.pop("logits_processor", None) or [])
    if batch.processor is not None:
        processors.insert(0, batch.processor)
    criteria = list(generate_kwargs.pop("stopping_criteria", None) or [])
    if max(limits) > min(limits):
        criteria.append(_RowBudget(batch.prompt_length, limits))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        batch.eos_token_ids |= set(config_eos if isinstance(config_eos, list) else [config_eos])
    pad = pad_id(tokenizer)
    with torch.no_grad():
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             max_new_tokens=max(limits), do_sample=do_sample, pad_token_id=pad,
                             logits_processor=processors or None, stopping_criteria=criteria or None,
                             **generate_kwargs)
    return batch.decode(out, limits)
