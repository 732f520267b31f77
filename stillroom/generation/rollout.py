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
:func:`stillroom.inputs.chat.end_ids`), the batch when every row has stopped or after ``max_new_tokens``.

A completion's text is exactly the bytes its tokens spell (``stillroom.tokenization.tokens.TokenTable``) after its prompt, read
as a text of its own as :func:`stillroom.inputs.chat.completion_ids` tokenizes it (a tokenizer with a dummy prefix,
e.g. SentencePiece's ``▁``, puts a virtual space before it: the first token's leading space is that, not text), so
the text round-trips to the same tokens. A completion cut inside a
multi-byte character (``max_new_tokens`` reached, or the model stopped mid-character) is shortened to its
longest prefix of whole tokens that is valid UTF-8, and ``ended`` is False: ``ids`` and ``text`` always agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stillroom.errors import ConfigError, DataError, OutputExistsError
from stillroom.files import atomic_write, check_output_file
from stillroom.inputs.chat import load_examples, prompt_ids
from stillroom.models.loading import load_causal_lm, load_tokenizer, model_context, resolve_model
from stillroom.models.runtime import forward_accepts
from stillroom.progress import bar, stderr_console
from stillroom.tokenization.special import pad_id
from stillroom.tokenization.tokens import TokenTable


@dataclass
class Sample:
    """One completion: its token ids (with the end token when ``ended``), its text (without it)."""
    ids: list[int]
    text: str
    ended: bool


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _table(tokenizer):
    """The tokenizer's :class:`~stillroom.tokenization.tokens.TokenTable`, looked up once per tokenizer object."""
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
    return next_tokens_draw(probs, generator)


def completion_text(table, prompt: Sequence[int], ids: list[int], ended: bool) -> tuple[list[int], str, bool]:
    """``(ids, text, ended)`` with ``text`` the bytes of ``ids`` (without the end token) decoded after the
    prompt, as a text of its own: where the tokenizer adds a dummy prefix (SentencePiece ``▁``), the first
    token's leading space is that prefix, so ``chat.completion_ids(text)`` spells the same tokens again; a cut
    multi-byte character drops the last tokens until the rest is valid UTF-8 (``ended`` False)."""
    body = ids[:-1] if ended else ids
    stream, off = table.pieces(list(prompt) + body)
    start = int(off[len(prompt)])
    if body and table.prefix_space and start < len(stream) and stream[start] == 0x20 and table.lead_space[body[0]]:
        start += 1  # the virtual space a tokenizer with a dummy prefix puts before a text it tokenizes alone
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


def next_tokens_draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``probs [B, V]`` by inverse CDF: the first id whose float64 cumulative mass reaches
    u · total, u ~ U[0, 1). ``torch.multinomial`` draws an exponential per vocabulary entry (9 ms per step at
    49k ids on 2 cores, a tenth of a decoding step); this costs one cumulative sum."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return ids.squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _skinny_forward(m: torch.nn.Linear, max_rows: int):
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > max_rows or x.dtype != m.weight.dtype:
            return torch.nn.Linear.forward(m, x)
        y = (m.weight @ x.reshape(rows, -1).T).T
        y = y + m.bias if m.bias is not None else y.contiguous()
        return y.reshape(*x.shape[:-1], m.weight.shape[0])
    return forward


@contextlib.contextmanager
def skinny_linears(model, max_rows: int = 32):
    """While decoding, each step feeds one token per row, so every linear layer multiplies a few rows by a large
    weight. On CPU, PyTorch computes such ``x @ Wᵀ`` 2–5× slower than the same product as ``(W @ xᵀ)ᵀ`` (4 rows
    × SmolLM2's 49k head: 54 vs 15 ms; Gemma-3's 262k head: 406 vs 81 ms; ``bench/decode_kernels.py``), so within
    this context every ``nn.Linear`` of a CPU model takes that form for inputs of at most ``max_rows`` rows
    (same values up to float rounding). Modules whose ``forward`` is already replaced (e.g. accelerate hooks)
    are left alone."""
    patched = []
    if next(model.parameters()).device.type == "cpu":
        for m in model.modules():
            if type(m) is torch.nn.Linear and "forward" not in m.__dict__:
                m.forward = _skinny_forward(m, max_rows)
                patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


def _cache_kwarg(model) -> str:
    """transformers >= 5.24 calls the KV cache argument ``cache``; earlier 5.x ``past_key_values``."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


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
        with skinny_linears(model):
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


def check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float, *,
                   option: Callable[[str], str] = str) -> None:
    """The sampling settings :func:`sample` and :func:`generate_file` share, each named as the caller's user
    knows it (``option("top_p")``: a keyword, or ``--top-p`` on the command line)."""
    if max_new_tokens < 1:
        raise ConfigError(f"{option('max_new_tokens')} must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise ConfigError(f"{option('temperature')} must be > 0 when sampling, got {temperature}")
    if do_sample and not 0 < top_p <= 1:
        raise ConfigError(f"{option('top_p')} must be in (0, 1], got {top_p}")


def sample(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, do_sample: bool = True, generator_seed: int | None = None,
           stop_ids: Sequence[int] | None = None) -> list[Sample]:
    """One completion per prompt (token ids), decoded batched with left padding and a KV cache.

    ``model``: a causal LM (a DDP wrapper's ``.module``); it runs in eval mode, its training flag is restored.
    ``stop_ids``: ids that end a completion (default :func:`stillroom.inputs.chat.end_ids` of ``tokenizer``).
    ``generator_seed``: seeds this call's own generator (None: the global torch RNG).
    """
    if not prompts:
        return []
    check_sampling(max_new_tokens, do_sample, temperature, top_p)
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ConfigError(f"prompt {empty[0]} has no tokens; every prompt needs at least one (e.g. BOS)")
    if stop_ids is None:
        from stillroom.inputs.chat import end_ids

        stop_ids = end_ids(tokenizer)
    stop_ids = list(stop_ids)
    rows = generate_ids(model, prompts, stop_ids, pad_id(tokenizer), max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, do_sample=do_sample, generator_seed=generator_seed)
    table, stops = _table(tokenizer), set(stop_ids)
    return [Sample(*completion_text(table, p, row, bool(row) and row[-1] in stops))
            for p, row in zip(prompts, rows, strict=True)]


# --- sequence-level KD data: `stillroom generate --data` ------------------------------------------------------


@dataclass
class GenerateSummary:
    """What :func:`generate_file` did: records written now, already in OUT, skipped as empty, in all."""
    written: int
    done_before: int
    empty: int
    total: int
    tokens: int
    seconds: float


def meta_path(out: str | os.PathLike) -> Path:
    """The settings sidecar of a generated file: ``OUT.meta.json``."""
    return Path(f"{out}.meta.json")


def read_done(out: Path) -> set[str]:
    """The ids already in ``out``. A last line without its newline (the run was killed while writing it) is cut
    off the file; any other unreadable line is a :class:`DataError`."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    whole = raw.rfind(b"\n") + 1
    if whole < len(raw):  # a torn last line: never read, never duplicated
        with open(out, "rb+") as f:
            f.truncate(whole)
            os.fsync(f.fileno())
    done = set()
    for n, line in enumerate(raw[:whole].splitlines(), 1):
        try:
            done.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--out {out}:{n} is not a record this command wrote; pass --overwrite to start over, "
                            "or another --out") from None
    return done


def _check_meta(out: Path, settings: dict, overwrite: bool) -> dict:
    """The sidecar to continue with: a fresh one, or the existing one when its settings are these."""
    meta = meta_path(out)
    fresh = {"format": "stillroom.generate", "settings": settings, "empty": []}
    if overwrite:
        out.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        return fresh
    if not meta.exists():
        if out.exists():
            raise OutputExistsError(f"--out {out} already exists and stillroom did not write it (no {meta.name}); "
                                    "choose another path or pass --overwrite to replace it")
        return fresh
    try:
        old = json.loads(meta.read_text(encoding="utf-8"))
        assert old["format"] == "stillroom.generate" and isinstance(old["settings"], dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise OutputExistsError(f"--out {out}: {meta} is not a stillroom generate record; pass --overwrite to "
                                "start over") from None
    diff = [f"{k} {old['settings'].get(k)!r} vs {v!r}" for k, v in settings.items() if old["settings"].get(k) != v]
    if diff:
        raise OutputExistsError(f"--out {out} was written with other settings ({'; '.join(diff)}: before vs now); "
                                "rerun with the earlier settings to resume, or pass --overwrite to start over")
    return old


def generate_file(model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                  max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  batch_size: int = 8, seed: int = 0, overwrite: bool = False, device: str | None = None,
                  progress: bool = True) -> GenerateSummary:
    """Complete every prompt of ``data`` (:func:`stillroom.inputs.chat.load_examples`, completions optional and
    ignored) with ``model``, each rendered by the model's own template (:func:`stillroom.inputs.chat.prompt_ids`), and
    append one JSONL record per example to ``out``: ``{"id", "prompt", "completion", "ended"}`` or ``{"id",
    "messages" (ending with the generated assistant turn), "ended"}`` — prompt/completion or chat training data
    for sequence-level KD (Kim & Rush 2016).

    Resumable: lines are appended, flushed and fsynced batch by batch; a rerun skips the ids already in ``out``
    (a torn last line is dropped). Batches are fixed by position in ``data`` and batch ``k`` samples with seed
    ``seed + k``, so a resumed file equals an uninterrupted one. ``out.meta.json`` keeps the settings (another
    run with other settings is refused unless ``overwrite``) and the ids whose completion came out empty
    (the model ended at once): those are not written, as training data needs a completion.
    """

    out = check_output_file(out, "--out", overwrite=True)  # a folder is refused here; files by the sidecar
    check_sampling(max_new_tokens, do_sample, temperature, top_p, option=lambda k: "--" + k.replace("_", "-"))
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    examples = load_examples(data, need_completion=False)
    folder = resolve_model(model, "--model")
    settings = {"model": str(Path(folder).resolve()), "data": str(Path(data).resolve()),
                "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature if do_sample
                else None, "top_p": top_p if do_sample else None, "seed": seed, "batch_size": batch_size}
    meta = _check_meta(out, settings, overwrite)
    tok = load_tokenizer(folder, "--model")
    prompts = [prompt_ids(tok, ex) for ex in examples]
    from transformers import AutoConfig

    context = model_context(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    if context is not None:
        long = next((i for i, p in enumerate(prompts) if len(p) + max_new_tokens > context), None)
        if long is not None:
            raise DataError(f"DATA {data}: example {examples[long].example_id!r} renders to {len(prompts[long])} "
                            f"prompt tokens; with --max-new-tokens {max_new_tokens} that exceeds the model's "
                            f"context of {context}; shorten the prompt or lower --max-new-tokens")
    lm = load_causal_lm(folder, "--model", tokenizer=tok, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(meta_path(out), json.dumps(meta, indent=1))
    done = read_done(out) | set(meta["empty"])
    before = sum(ex.example_id in done for ex in examples)
    written = tokens = 0
    t0 = time.perf_counter()
    shown = _bar(progress, len(examples), before)
    try:
        with open(out, "ab") as f:
            for k, start in enumerate(range(0, len(examples), batch_size)):
                rows = list(range(start, min(start + batch_size, len(examples))))
                if all(examples[i].example_id in done for i in rows):
                    continue
                samples = sample(lm, tok, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, do_sample=do_sample, generator_seed=seed + k)
                empty = []
                for i, s in zip(rows, samples, strict=True):
                    ex = examples[i]
                    if ex.example_id in done:
                        continue
                    if not s.text.strip():
                        empty.append(ex.example_id)
                        continue
                    f.write((json.dumps(_record(ex, s), ensure_ascii=False) + "\n").encode("utf-8"))
                    f.flush()
                    written += 1
                    tokens += len(s.ids)
                os.fsync(f.fileno())
                if empty:
                    meta["empty"] += empty
                    atomic_write(meta_path(out), json.dumps(meta, indent=1))
                done.update(examples[i].example_id for i in rows)
                if shown is not None:
                    shown[0].update(shown[1], completed=sum(ex.example_id in done for ex in examples))
    finally:
        if shown is not None:
            shown[0].stop()
    return GenerateSummary(written, before, len(meta["empty"]), len(examples), tokens, time.perf_counter() - t0)


def _record(ex, s: Sample) -> dict:
    if ex.messages is not None:
        return {"id": ex.example_id, "messages": [*ex.messages, {"role": "assistant", "content": s.text}],
                "ended": s.ended}
    return {"id": ex.example_id, "prompt": ex.prompt, "completion": s.text, "ended": s.ended}


def _bar(progress: bool, total: int, completed: int):
    """A Rich bar over records on a terminal (None otherwise: the caller prints one closing line)."""
    if not progress:
        return None
    console = stderr_console()
    if not console.is_terminal:
        return None
    progress = bar(console=console, eta=True)
    progress.start()
    return progress, progress.add_task("generating", total=total, completed=completed)
