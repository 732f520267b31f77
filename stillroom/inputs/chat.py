"""Prompt/completion and chat data: records, each model's own rendering of them, and completion-only batches.

**Records** (JSONL, one object per line; blank lines allowed; ``id`` optional, else ``"<file stem>:<line>"``):

- ``{"prompt": str, "completion": str}`` — plain text; the prompt is tokenized like any text (with the
  tokenizer's special tokens, e.g. BOS);
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` — a conversation. If the last
  message is the assistant's it is the completion; the messages before it are the prompt, rendered by the
  model's *own* chat template with the generation prompt (``<|im_start|>assistant\\n`` …). A tokenizer
  without a chat template gets :data:`FALLBACK_TEMPLATE` (``role:\\ncontent\\n\\n`` turns after BOS; said once).

**Tokens.** Prompt and completion are tokenized separately (:func:`prompt_ids`, :func:`completion_ids`), so the
boundary between them is a token boundary for every tokenizer; the completion ends with the model's
end-of-turn token (the token its chat template puts after an assistant turn, e.g. ``<|im_end|>`` or
``<end_of_turn>``; else EOS). Labels are the completion tokens (end token included); prompt tokens and
padding are ``-100``, so the loss, and every teacher signal the loss uses, covers completion tokens only.

**Length.** A row is at most ``max_len`` tokens. The prompt keeps its last tokens (truncated from the left);
the completion keeps at most ``max_len - min(len(prompt), max_len // 2)`` tokens, so the prompt always keeps at
least half the window (or all of it, when shorter). A cut completion loses its end token (``ended=False``)
and is trimmed back to whole UTF-8 characters; ``completion`` in the batch is then the text the kept tokens
spell.

**Teachers with another tokenizer** render the prompt with their own template and tokenize the completion text
themselves. Their completion region is aligned to the student's by viewing each side as
``[marker] + completion ids`` (:func:`region_ids`, :func:`region_output`): the marker is a special token, so
the first row of each view is the one that predicts the first completion token — exactly the shape of two
texts that start with BOS, which :func:`stillroom.tokenization.project.student_targets` (byte alignment, projection, CE
spread) already handles. Its result goes back to the student rows from ``prompt_len - 1`` on (:func:`place`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stillroom.errors import ConfigError, DataError, MissingPathError
from stillroom.inputs.text import json_lines, numbered_lines
from stillroom.tokenization.special import pad_id
from stillroom.tokenization.tokens import TokenTable

ROLES = ("system", "user", "assistant")

# stillroom's plain chat template, for tokenizers that ship none: BOS, then "role:\ncontent\n\n" per turn, then
# "assistant:\n" as the generation prompt. A completion ends with EOS (the template has no end-of-turn token).
FALLBACK_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ':\n' + message['content'] + '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Example:
    """One prompt/completion or chat record. Exactly one of ``prompt`` / ``messages`` is set; ``completion`` is
    None for prompt-only records (generation, on-policy)."""

    example_id: str
    prompt: str | None
    messages: tuple[dict, ...] | None  # the conversation BEFORE the final assistant turn
    completion: str | None
    ended: bool = True  # False: the completion was cut (``"ended": false`` in generated data), no end token


# --- records ------------------------------------------------------------------------------------------------


def load_examples(path: str | os.PathLike, *, need_completion: bool = True) -> list[Example]:
    """Read a JSONL file of ``{"prompt", "completion"}`` or ``{"messages"}`` records (see the module docstring).

    ``need_completion=False`` also accepts prompt-only records (no ``completion``; a conversation whose last
    message is not the assistant's). Every bad record raises :class:`DataError` naming ``file:line``, the field
    and the fix."""

    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"DATA {path} does not exist; pass a .jsonl file of prompt/completion or chat records")
    if path.is_dir() or path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"DATA {path}: prompt/completion and chat data must be a .jsonl file (one record per "
                        "line: {\"prompt\", \"completion\"} or {\"messages\": [...]})")
    out: list[Example] = []
    seen: set[str] = set()
    for n, rec in json_lines(path, numbered_lines(path)):
        ex = _example(rec, f"{path}:{n}", f"{path.stem}:{n}", need_completion)
        if ex.example_id in seen:
            raise DataError(f"DATA {path}:{n}: id {ex.example_id!r} is used twice; ids must be unique")
        seen.add(ex.example_id)
        out.append(ex)
    if not out:
        raise DataError(f"DATA {path} holds no records; add one JSON object per line")
    return out


def _text_field(rec: dict, key: str, where: str, fix: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"DATA {where}: field {key!r} must be a string, got {type(v).__name__}; {fix}")
    if not v.strip():
        raise DataError(f"DATA {where}: field {key!r} is empty; fill it or drop the record")
    return v


def _example(rec, where: str, default_id: str, need_completion: bool) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"DATA {where}: a record must be a JSON object, got {type(rec).__name__}; write "
                        "{\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}")
    ex_id = default_id if rec.get("id") is None else str(rec["id"])
    ended = rec.get("ended", True)
    if not isinstance(ended, bool):
        raise DataError(f"DATA {where}: field 'ended' must be true or false, got {ended!r:.40}; it says whether "
                        "the completion finished (false: it was cut, so it gets no end token)")
    if "messages" in rec:
        if "prompt" in rec or "completion" in rec:
            raise DataError(f"DATA {where}: record has both 'messages' and 'prompt'/'completion'; keep one form")
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"DATA {where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} "
                            "objects")
        checked = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"DATA {where}: field 'messages'[{i}] must be an object with 'role' and "
                                f"'content', got {m!r:.80}")
            if m["role"] not in ROLES:
                raise DataError(f"DATA {where}: field 'messages'[{i}].role is {m['role']!r}; roles must be one of "
                                f"{', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"DATA {where}: field 'messages'[{i}].content must be a string, got "
                                f"{type(m['content']).__name__}")
            checked.append({"role": m["role"], "content": m["content"]})
        completion = None
        if checked[-1]["role"] == "assistant":
            completion = checked.pop()["content"]
            if not completion.strip():
                raise DataError(f"DATA {where}: field 'messages'[{len(msgs) - 1}].content (the assistant's "
                                "completion) is empty; fill it or drop the record")
        elif need_completion:
            raise DataError(f"DATA {where}: field 'messages': the last message is from {checked[-1]['role']!r}, "
                            "but training needs a completion; end the conversation with an assistant message")
        if not checked:
            raise DataError(f"DATA {where}: field 'messages' holds only the assistant's turn; add the user "
                            "message it answers")
        return Example(ex_id, None, tuple(checked), completion, ended)
    if "prompt" not in rec:
        raise DataError(f"DATA {where}: record has no 'prompt' or 'messages' field (fields: {sorted(rec)}); "
                        "write {\"prompt\": ..., \"completion\": ...} or {\"messages\": [...]}")
    prompt = _text_field(rec, "prompt", where, "write the prompt text")
    if "completion" not in rec:
        if need_completion:
            raise DataError(f"DATA {where}: record has no 'completion' field; training needs one (add "
                            "\"completion\": \"...\")")
        return Example(ex_id, prompt, None, None)
    return Example(ex_id, prompt, None, _text_field(rec, "completion", where, "write the completion text"), ended)


# --- each model's own rendering -----------------------------------------------------------------------------

_TOLD: set[str] = set()  # tokenizers already told that they use the fallback template
_END: dict[int, tuple[Any, str, int | None]] = {}  # id(tokenizer) -> (tokenizer, template, end-of-turn id)


def _own_template(tokenizer) -> str | None:
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, dict):  # several named templates: the default one
        tmpl = tmpl.get("default")
    return tmpl or None


def chat_template(tokenizer) -> str:
    """The tokenizer's chat template, or :data:`FALLBACK_TEMPLATE` (said once per tokenizer on stderr)."""
    tmpl = _own_template(tokenizer)
    if tmpl:
        return tmpl
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _TOLD:
        _TOLD.add(name)
        print(f"stillroom: {name} has no chat template; using stillroom's plain fallback (\"role:\\ncontent\\n\\n\" "
              "turns, see docs/training.md)", file=sys.stderr)
    return FALLBACK_TEMPLATE


def prompt_ids(tokenizer, ex: Example) -> list[int]:
    """The model's own rendering of the prompt, ending exactly where the completion begins: chat records through
    its chat template with the generation prompt, plain prompts tokenized with its special tokens (BOS)."""
    if ex.messages is not None:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(list(ex.messages), chat_template=chat_template(tokenizer),
                                                 add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # e.g. "roles must alternate user/assistant", "system role not supported"
            name = getattr(tokenizer, "name_or_path", "") or "the model"
            raise DataError(f"example {ex.example_id}: the chat template of {name} refuses its messages "
                            f"({e}); fix the record (roles, order) for this model") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
    if not ids:
        raise DataError(f"example {ex.example_id}: its prompt renders to no tokens; give it some text")
    return ids


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template puts right after an assistant turn's content when it is a special (added)
    token (``<|im_end|>``, ``<end_of_turn>``); else EOS; None when the tokenizer has neither."""
    tmpl = _own_template(tokenizer) or FALLBACK_TEMPLATE
    hit = _END.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer and hit[1] == tmpl:
        return hit[2]
    sentinel = "stillroom-end-probe"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}],
                                         chat_template=tmpl, tokenize=False)
    end = tokenizer.eos_token_id
    at = text.rfind(sentinel)
    if at >= 0:
        after = text[at + len(sentinel):].lstrip(" ")
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special = set(tokenizer.all_special_ids) | {i for i, a in added.items() if getattr(a, "special", False)}
        if ids and ids[0] in special:
            end = ids[0]
    _END[id(tokenizer)] = (tokenizer, tmpl, end)
    return end


def completion_ids(tokenizer, completion: str, *, end: bool = True) -> list[int]:
    """The completion tokenized on its own (no special tokens), plus the end-of-turn token when ``end``."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    e = end_of_turn_id(tokenizer) if end else None
    return ids + [e] if e is not None else ids


def end_ids(tokenizer) -> list[int]:
    """Token ids that end a completion (end-of-turn, then EOS), for generation."""
    out = [i for i in (end_of_turn_id(tokenizer), tokenizer.eos_token_id) if i is not None]
    return list(dict.fromkeys(out))


# --- completion-only batches --------------------------------------------------------------------------------


def marker_id(table) -> int:
    """A special, added token of ``table`` that is not the unknown token: the region views' first token."""
    ok = table.is_special & table.is_added
    if table.unk_id is not None:
        ok[table.unk_id] = False
    hits = np.flatnonzero(ok)
    if hits.size == 0:
        raise ConfigError(f"tokenizer {table.name or '?'} has no special token; completion data needs one "
                          "(e.g. an EOS) to mark where the completion starts")
    return int(hits[0])


def whole_chars(table, ids: list[int]) -> tuple[list[int], str]:
    """``ids`` (a completion's first tokens) cut back to whole UTF-8 characters, and the text they spell."""
    ids = list(ids)
    marker = marker_id(table)
    while ids:
        try:
            return ids, table.decode_bytes([marker] + ids).decode("utf-8")
        except UnicodeDecodeError:
            ids.pop()
    return ids, ""


def encode_example(tokenizer, ex: Example, max_len: int, table=None) -> dict[str, Any]:
    """One row: ``prompt_ids``, ``completion_ids``, ``completion`` (text), ``ended``, ``example``, cut to
    ``max_len`` tokens as the module docstring says."""
    if ex.completion is None:
        raise DataError(f"example {ex.example_id}: has no completion; training needs one")
    p = prompt_ids(tokenizer, ex)
    c = completion_ids(tokenizer, ex.completion, end=ex.ended)
    ended = ex.ended and end_of_turn_id(tokenizer) is not None
    text = ex.completion
    budget = max_len - min(len(p), max_len // 2)
    if len(c) > budget:
        from stillroom.tokenization.tokens import TokenTable

        c, text = whole_chars(table or TokenTable.from_tokenizer(tokenizer), c[:budget])
        ended = False
        if not c:
            raise DataError(f"example {ex.example_id}: no whole character of its completion fits in "
                            f"{max_len} tokens; raise data.seq_len")
    p = p[-(max_len - len(c)):]
    return {"prompt_ids": p, "completion_ids": c, "completion": text, "ended": ended, "example": ex}


def collate_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Rows (``prompt_ids``, ``completion_ids``, ``completion``, ``ended``, ``example``) -> the batch format
    of completion data: right-padded ``input_ids``/``attention_mask``, ``labels`` = completion ids (else -100),
    ``prompt_len``, and the row lists ``completion``, ``ended``, ``example``, ``example_id``, ``text``."""
    T = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    plen = torch.zeros(B, dtype=torch.long)
    for r, row in enumerate(rows):
        p, c = row["prompt_ids"], row["completion_ids"]
        n = len(p) + len(c)
        ids[r, :n] = torch.as_tensor(list(p) + list(c), dtype=torch.long)
        mask[r, :n] = 1
        labels[r, len(p):n] = ids[r, len(p):n]
        plen[r] = len(p)
    comp = [row["completion"] for row in rows]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_len": plen, "completion": comp,
            "ended": [bool(row["ended"]) for row in rows], "example": [row["example"] for row in rows],
            "example_id": [row["example"].example_id for row in rows], "text": list(comp)}


class CompletionCollator:
    """Examples -> one completion-only batch (:func:`collate_rows`), each row at most ``max_len`` tokens,
    padded to the batch's longest row."""

    def __init__(self, tokenizer, max_len: int):
        pad = pad_id(tokenizer)
        self.tokenizer, self.max_len, self.pad_id = tokenizer, int(max_len), 0 if pad is None else pad
        self._table = None

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        if self._table is None:
            self._table = TokenTable.from_tokenizer(self.tokenizer)
        return collate_rows([encode_example(self.tokenizer, ex, self.max_len, self._table) for ex in examples],
                            self.pad_id)


class ExampleDataset(torch.utils.data.Dataset):
    """A list of :class:`Example` as a map-style dataset (the collator tokenizes)."""
    def __init__(self, examples: list[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


# --- teacher side: the completion region of each tokenization -----------------------------------------------


# --- recipes ------------------------------------------------------------------------------------------------


class PromptCollator:
    """Examples (completions optional, ignored) -> a batch of prompts with empty completions, for λ = 1 where
    every batch is replaced by the student's samples. Prompts keep their last ``max_len − max_new_tokens``."""

    def __init__(self, tokenizer, max_len: int, max_new_tokens: int):
        self.tokenizer, self.max_len, self.keep = tokenizer, int(max_len), int(max_len) - int(max_new_tokens)
        self.pad_id = pad_id(tokenizer)

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        rows = [{"prompt_ids": prompt_ids(self.tokenizer, ex)[-self.keep:], "completion_ids": [],
                 "completion": "", "ended": False, "example": ex} for ex in examples]
        return collate_rows(rows, self.pad_id)
