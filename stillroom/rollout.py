"""Sample completions from a causal LM for a batch of prompts: the student's rollouts for on-policy
distillation and the teacher's outputs for sequence-level KD (``stillroom generate --data``).

One batched decoding loop: prompts are LEFT-padded so every row's next token is in the last column, the KV
cache holds the past (each step feeds one token per row), and position ids count only real tokens, so a
padded row computes what it would alone. Each step picks the next token per row

    greedy:   y = argmax_v z_v
    sampled:  y ~ softmax(z / τ) restricted to the nucleus (Holtzman et al. 2020): the most probable tokens
              whose probability mass *before* them is below top_p (the top token is always kept)

with its own ``torch.Generator`` when seeded, so a seeded call repeats exactly and never moves the global RNG
(the trainer's dropout and data order stay as they were). A row stops at the first end id (end-of-turn or EOS,
:func:`stillroom.chat.end_ids`), the batch when every row has stopped or after ``max_new_tokens``.

A completion's text is exactly the bytes its tokens spell (``stillroom.tokens.TokenTable``), decoded in the
context of its prompt (a SentencePiece completion's leading ``▁`` is a real space). A completion cut inside a
multi-byte character (``max_new_tokens`` reached, or the model stopped mid-character) is shortened to its
longest prefix of whole tokens that is valid UTF-8, and ``ended`` is False: ``ids`` and ``text`` always agree.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stillroom.errors import ConfigError


@dataclass
class Sample:
    """One completion: its token ids (with the end token when ``ended``), its text (without it)."""

    ids: list[int]
    text: str
    ended: bool


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table(tokenizer):
    """The tokenizer's :class:`~stillroom.tokens.TokenTable`, looked up once per tokenizer object."""
    from stillroom.tokens import TokenTable

    try:
        hit = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return TokenTable.from_tokenizer(tokenizer)
    if hit is None or hit[0] != len(tokenizer):  # tokens added since: rebuild
        hit = (len(tokenizer), TokenTable.from_tokenizer(tokenizer))
        _TABLES[tokenizer] = hit
    return hit[1]


def next_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` next ids: argmax, or a draw from the temperature-scaled nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        keep = (p.cumsum(-1) - p) < top_p  # the mass before this token is below top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def completion_text(table, prompt: Sequence[int], ids: list[int], ended: bool) -> tuple[list[int], str, bool]:
    """``(ids, text, ended)`` with ``text`` the bytes of ``ids`` (without the end token) decoded after the
    prompt; a cut multi-byte character drops the last tokens until the rest is valid UTF-8 (``ended`` False)."""
    body = ids[:-1] if ended else ids
    stream, off = table.pieces(list(prompt) + body)
    start = int(off[len(prompt)])
    data = stream[start:].tobytes()
    try:
        return ids, data.decode("utf-8"), ended
    except UnicodeDecodeError as e:
        ends = off[len(prompt):] - start  # byte offset after each whole token of the completion
        k = int((ends <= e.start).sum()) - 1  # the most tokens whose bytes lie before the first bad byte
        while k > 0:
            try:
                return body[:k], data[: int(ends[k])].decode("utf-8"), False
            except UnicodeDecodeError:
                k -= 1
        return [], "", False


def _cache_kwarg(model) -> str:
    """transformers >= 5.24 calls the KV cache argument ``cache``; earlier 5.x ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], stop_ids: Sequence[int], pad_id: int, *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                 generator_seed: int | None = None) -> list[list[int]]:
    """The decoding loop of :func:`sample`: each prompt's new ids, up to and including its first stop id."""
    device = next(model.parameters()).device
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for r, p in enumerate(prompts):  # left padding: every row's last real token is in the last column
        ids[r, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[r, L - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # positions count real tokens only
    gen = None
    if do_sample and generator_seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(int(generator_seed))
    cache_key = _cache_kwarg(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = None
    try:
        step_ids = ids
        for _ in range(max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{cache_key: cache})
            cache = getattr(res, "cache", None) or res.past_key_values
            nxt = next_tokens(res.logits[:, -1], temperature=temperature, top_p=top_p, do_sample=do_sample,
                              generator=gen)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
    finally:
        model.train(was_training)
    stop_set = set(stops.tolist())
    rows = []
    for row in torch.stack(out, 1).tolist():
        end = next((j for j, t in enumerate(row) if t in stop_set), None)
        rows.append(row if end is None else row[: end + 1])
    return rows


def sample(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, do_sample: bool = True, generator_seed: int | None = None,
           stop_ids: Sequence[int] | None = None) -> list[Sample]:
    """One completion per prompt (token ids), decoded batched with left padding and a KV cache.

    ``model``: a causal LM (a DDP wrapper's ``.module``); it runs in eval mode, its training flag is restored.
    ``stop_ids``: ids that end a completion (default :func:`stillroom.chat.end_ids` of ``tokenizer``).
    ``generator_seed``: seeds this call's own generator (None: the global torch RNG).
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ConfigError(f"temperature must be > 0 when sampling, got {temperature}")
    if do_sample and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ConfigError(f"prompt {empty[0]} has no tokens; every prompt needs at least one (e.g. BOS)")
    if stop_ids is None:
        from stillroom.chat import end_ids

        stop_ids = end_ids(tokenizer)
    stop_ids = list(stop_ids)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = stop_ids[0] if stop_ids else 0
    rows = generate_ids(model, prompts, stop_ids, pad, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, do_sample=do_sample, generator_seed=generator_seed)
    table, stops = _table(tokenizer), set(stop_ids)
    return [Sample(*completion_text(table, p, row, bool(row) and row[-1] in stops))
            for p, row in zip(prompts, rows, strict=True)]
