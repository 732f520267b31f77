"""Evaluate causal language models so that models with *different tokenizers* are comparable.

Headline metric, **bits per byte** (tokenizer-independent)::
    bpb = sum_t -log2 p(x_t | x_<t) / len(text.encode("utf-8"))

summed over every token of every text and divided by every byte of every text. Also reported: per-token
perplexity ``exp(total NLL in nats / tokens)`` (only comparable between models that share a tokenizer).

How each text is scored:

- It is tokenized without special tokens, so the tokens cover exactly the text's bytes.
- The first token is scored too: when the tokenizer has a BOS token the model reads BOS first and every text
  token is predicted from it. Without a BOS token the first token is charged ``log2(V)`` bits (a uniform guess
  over the vocabulary of ``V`` tokens) and the rest are predicted by the model; every byte is still counted.
- Texts longer than the context are scored with a sliding window (no truncation): windows of ``context``
  positions start every ``stride`` positions; each token is scored exactly once, in the first window that
  reaches it, so after the first window every token sees at least ``context - stride`` positions of context.

Given a teacher, the student is also compared with it on the positions where the two tokenizations agree
1-to-1 (one student token and one teacher token covering the same bytes, found with ``stillroom.tokenization.align``): at such
a position both models predict the same piece of text from the same preceding text. The teacher's
distribution is moved onto the student vocabulary with a ``stillroom.tokenization.vocab.VocabMap`` (probabilities of teacher
tokens that map to the same student token are summed; identity when the tokenizers are the same) and we report

    top-1 agreement = mean[argmax p_T' == argmax p_S]
    KL(T || S)      = mean sum_v p_T'(v) (log p_T'(v) - log p_S(v))      (nats per aligned position)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from stillroom.errors import ConfigError, DataError
from stillroom.inputs.chat import CompletionCollator
from stillroom.inputs.text import load_texts
from stillroom.models.loading import check_device, load_causal_lm, load_tokenizer, model_context
from stillroom.models.runtime import freeze_teacher
from stillroom.progress import bar as progress_bar
from stillroom.progress import stderr_console
from stillroom.scoring import forward_groups, score_windows, vocab_size, window_nll, window_spans
from stillroom.tokenization.align import align
from stillroom.tokenization.tokens import TokenTable, same_tokenizer
from stillroom.tokenization.vocab import VocabMap

LOG2E = 1.0 / math.log(2.0)
MAX_DEFAULT_CONTEXT = 2048  # default window cap, so long-context models do not get [1, 128k, V] logits


# --- results ------------------------------------------------------------------------------------------------
@dataclass
class TeacherMetrics:
    """Agreement of the student with one teacher on 1-to-1 aligned positions."""
    teacher: str
    aligned: int  # scored positions where one student token and one teacher token cover the same bytes
    positions: int  # all scored student positions (aligned / positions = coverage)
    top1_agreement: float
    kl_nats: float  # mean KL(teacher' || student) per aligned position, teacher' = teacher moved to student vocab


@dataclass
class EvalReport:
    """What :func:`evaluate` measured for one model on one set of texts."""
    model: str
    bits_per_byte: float
    token_perplexity: float
    nll_bits: float  # total over all texts
    tokens: int
    bytes: int
    texts: int
    context: int
    stride: int
    first_token: str  # "bos" (conditioned on BOS) or "uniform" (charged log2(V) bits)
    teachers: list[TeacherMetrics] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- loading ------------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", what: str = "model"):
    """``(model, tokenizer)`` from a Hugging Face folder (safetensors, no remote code), float32, frozen (eval
    mode, no gradients, fused activations: :func:`stillroom.models.runtime.freeze_teacher`)."""

    tokenizer = load_tokenizer(path, what)  # refuses folders without weights or tokenizer, or that do not fit
    model = load_causal_lm(path, what, tokenizer=tokenizer, device=check_device(device))
    return freeze_teacher(model), tokenizer


def load_eval_texts(data: str | os.PathLike, documents: str = "file") -> list[str]:
    """The documents of DATA (text file, folder of .txt, JSONL with ``text``, datasets folder) via
    ``stillroom.inputs.text``; ``documents`` says what a document of a plain .txt is (as ``data.documents`` does for
    training, so both score the same documents)."""

    return [text for _, text in load_texts(data, documents=documents)]


# --- tokens -------------------------------------------------------------------------------------------------
def _start_id(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sequence(tokenizer, text: str) -> tuple[torch.Tensor, int]:
    """``(seq, offset)``: the ids fed to the model and where text token 0 sits in it (1 after BOS, else 0)."""
    ids = _text_ids(tokenizer, text)
    bos = _start_id(tokenizer)
    if bos is not None:
        return torch.tensor([bos] + ids, dtype=torch.long), 1
    return torch.tensor(ids, dtype=torch.long), 0


# --- teacher comparison -------------------------------------------------------------------------------------
@dataclass
class _TeacherState:
    name: str
    model: object
    tokenizer: object
    mapping: torch.Tensor | None  # teacher id -> student id; None when the tokenizers are the same
    aligned: int = 0
    agree: int = 0
    kl: float = 0.0


def aligned_pairs(student_ids: Sequence[int], teacher_ids: Sequence[int], student_table, teacher_table) -> np.ndarray:
    """``[P, 2]`` (student index, teacher index) of 1-to-1 exactly aligned tokens, in order."""
    al = align(np.asarray(student_ids, dtype=np.int64), np.asarray(teacher_ids, dtype=np.int64),
               student_table, teacher_table, mode="exact")
    g = np.asarray(al.groups)
    keep = np.asarray(al.exact, dtype=bool) & (g[:, 1] - g[:, 0] == 1) & (g[:, 3] - g[:, 2] == 1)
    return np.stack([g[keep, 0], g[keep, 2]], axis=1).astype(np.int64)


def _teacher_state(name: str, model, tokenizer, student_tokenizer) -> _TeacherState:
    if same_tokenizer(tokenizer, student_tokenizer):
        return _TeacherState(name, model, tokenizer, None)

    vmap = VocabMap.cached(TokenTable.from_tokenizer(tokenizer), TokenTable.from_tokenizer(student_tokenizer))
    return _TeacherState(name, model, tokenizer, torch.as_tensor(np.asarray(vmap.mapping), dtype=torch.long))


def _to_student_vocab(teacher_logprobs: torch.Tensor, mapping: torch.Tensor | None, v_student: int) -> torch.Tensor:
    """Teacher log-probs ``[N, V_t]`` -> log-probs over the student vocabulary ``[N, v_student]``.

    p_T'(v) = sum over teacher ids u with mapping[u] == v of p_T(u); teacher logits beyond the mapping (padded
    embedding rows) are dropped and the rest renormalised.
    """
    if mapping is None:
        out = teacher_logprobs[:, :v_student]
    else:
        probs = teacher_logprobs[:, :len(mapping)].exp()
        out = torch.zeros(len(probs), v_student, dtype=probs.dtype)
        out.index_add_(1, mapping[:probs.shape[1]], probs)
        out = out.log()
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


class _Rows:
    """Pulls window log-probs from a generator on demand and hands out the rows of chosen positions."""
    def __init__(self, windows: Iterator[tuple[int, torch.Tensor]], offset: int, on_window=None):
        self.windows, self.offset, self.on_window = windows, offset, on_window
        self.rows: dict[int, torch.Tensor] = {}
        self.reached = 0  # text tokens < reached have been scored

    def pull(self, wanted: set[int]) -> bool:
        try:
            first, logprobs = next(self.windows)
        except StopIteration:
            return False
        if self.on_window is not None:
            self.on_window(first, logprobs)
        k0 = first - self.offset  # text token index of row 0
        for r in range(logprobs.shape[0]):
            if k0 + r in wanted:
                self.rows[k0 + r] = logprobs[r]
        self.reached = k0 + logprobs.shape[0]
        return True

    def get(self, k: int, wanted: set[int]) -> torch.Tensor | None:
        while k not in self.rows and self.reached <= k:
            if not self.pull(wanted):
                break
        return self.rows.pop(k, None)

    def drain(self) -> None:
        while self.pull(set()):
            pass


# --- the evaluation -----------------------------------------------------------------------------------------
def evaluate(model, tokenizer, texts: Sequence[str], *, name: str = "model", teachers: Sequence = (),
             context: int | None = None, stride: int | None = None, batch_size: int = 8,
             device: str | torch.device = "cpu", progress: bool = False) -> EvalReport:
    """Bits per byte, token perplexity and (per teacher) top-1 agreement and KL of ``model`` on ``texts``.

    ``teachers``: ``(name, model, tokenizer)`` triples. ``context`` defaults to the model's maximum length
    (at most ``MAX_DEFAULT_CONTEXT``), ``stride`` to half of it. Models are used as given (put them in eval mode and on ``device`` first).
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    if not texts:
        raise ValueError("texts is empty: nothing to evaluate")
    limit = model_context(model)
    if context is not None and (context < 2 or (limit is not None and context > limit)):
        raise ConfigError(f"context (--context) must be in [2, {limit or '...'}] for {name}, got {context}")
    context = context if context is not None else min(model_context(model, default=1024), MAX_DEFAULT_CONTEXT)
    stride = stride if stride is not None else max(1, context // 2)
    if not 1 <= stride < context:
        raise ConfigError(f"stride (--stride) must be in [1, {context - 1}] (below the context), got {stride}")
    first_token = "bos" if _start_id(tokenizer) is not None else "uniform"
    states = [_teacher_state(n, m, t, tokenizer) for n, m, t in teachers]
    total_nats, n_tokens, n_bytes, positions = 0.0, 0, 0, 0
    work: list[tuple[str, torch.Tensor, int]] = []  # (text, seq, offset) of the non-empty texts
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings; got {type(text).__name__}")
        n_bytes += len(text.encode("utf-8"))
        seq, offset = _sequence(tokenizer, text)
        n_text = len(seq) - offset
        if n_text == 0:
            continue
        n_tokens += n_text
        positions += n_text - (1 - offset)
        if offset == 0:  # no BOS: the first token is a uniform guess over the vocabulary
            total_nats += math.log(len(tokenizer))
        work.append((text, seq, offset))
    if n_tokens == 0:  # zero tokens scored is an error, never a result (bits/byte 0.0 would look perfect)
        raise DataError(f"{name}: its tokenizer gives no tokens for any of the {len(texts)} text(s); check that the "
                        "model folder holds its real tokenizer")

    bar = task = console = None
    t0 = time.perf_counter()
    if progress:  # a live bar on a terminal; one closing line otherwise (a log gets no blank lines)
        console = stderr_console()
        if console.is_terminal:
            bar = progress_bar(console=console, transient=True)
            bar.start()
    try:
        if not states:  # windows of all texts batched together
            jobs = [(seq, span) for _, seq, _ in work for span in window_spans(len(seq), context, stride)]
            if bar is not None:
                task = bar.add_task(f"eval {name}", total=len(jobs))
            for g in forward_groups([e - s for _, (s, e, _) in jobs], batch_size, vocab_size(model)):
                total_nats += window_nll(model, jobs[g.start:g.stop], device)
                if bar is not None:
                    bar.advance(task, len(g))
        else:  # text by text, the student and each teacher in lockstep
            if bar is not None:
                task = bar.add_task(f"eval {name}", total=len(work))
            for text, seq, offset in work:
                def add_nll(first: int, logprobs: torch.Tensor, seq=seq) -> None:
                    nonlocal total_nats
                    targets = seq[first:first + logprobs.shape[0]]
                    total_nats -= logprobs.gather(1, targets[:, None]).sum().item()

                def windows(seq=seq):
                    return score_windows(model, seq, context=context, stride=stride, batch_size=batch_size,
                                         device=device)

                # The first pass over the student's windows also sums the NLL; each further teacher re-runs the
                # student (keeping only about one window of rows in memory at a time).
                student = _Rows(windows(), offset, on_window=add_nll)
                for idx, st in enumerate(states):
                    rows = student if idx == 0 else _Rows(windows(), offset)
                    _compare(st, rows, tokenizer, text, seq[offset:].tolist(), offset, context, stride,
                             batch_size, device)
                student.drain()
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    if console is not None:
        console.print(f"eval {name}: {n_tokens:,} tokens in {time.perf_counter() - t0:.1f} s", highlight=False,
                      soft_wrap=True)
    nll_bits = total_nats * LOG2E
    return EvalReport(
        model=name,
        bits_per_byte=nll_bits / max(1, n_bytes),
        token_perplexity=math.exp(total_nats / max(1, n_tokens)),
        nll_bits=nll_bits,
        tokens=n_tokens,
        bytes=n_bytes,
        texts=len(texts),
        context=context,
        stride=stride,
        first_token=first_token,
        teachers=[TeacherMetrics(st.name, st.aligned, positions, st.agree / max(1, st.aligned),
                                 st.kl / max(1, st.aligned)) for st in states],
    )


def _compare(st: _TeacherState, student: _Rows, student_tokenizer, text: str, student_ids: list[int], s_offset: int,
             context: int, stride: int, batch_size: int, device) -> None:
    """Accumulate top-1 agreement and KL of one teacher against the student over one text.

    The student's windows are consumed lazily (and only once, shared with the NLL accumulation); the rows kept in
    memory at any time are about one window's worth per model.
    """
    t_seq, t_offset = _sequence(st.tokenizer, text)
    teacher_ids = t_seq[t_offset:].tolist()
    if st.mapping is None:
        pairs = np.stack([np.arange(len(student_ids))] * 2, axis=1)
    else:
        from stillroom.tokenization.tokens import TokenTable

        pairs = aligned_pairs(student_ids, teacher_ids, TokenTable.from_tokenizer(student_tokenizer),
                              TokenTable.from_tokenizer(st.tokenizer))
    # Only positions both models predict (a text's first token has no prediction without BOS).
    pairs = pairs[(pairs[:, 0] >= 1 - s_offset) & (pairs[:, 1] >= 1 - t_offset)]
    if len(pairs) == 0:
        return
    t_ctx = model_context(st.model, default=1024)
    teacher = _Rows(score_windows(st.model, t_seq, context=min(context, t_ctx), stride=min(stride, t_ctx - 1),
                                  batch_size=batch_size, device=device), t_offset)
    s_wanted, t_wanted = set(pairs[:, 0].tolist()), set(pairs[:, 1].tolist())
    s_buf: list[torch.Tensor] = []
    t_buf: list[torch.Tensor] = []
    for n, (j, i) in enumerate(pairs.tolist()):
        s_row, t_row = student.get(j, s_wanted), teacher.get(i, t_wanted)
        if s_row is None or t_row is None:
            raise RuntimeError(f"internal: no scores for aligned pair (student {j}, teacher {i})")
        s_buf.append(s_row)
        t_buf.append(t_row)
        if len(s_buf) == 256 or n == len(pairs) - 1:
            _accumulate(st, torch.stack(s_buf), torch.stack(t_buf))
            s_buf, t_buf = [], []


def _accumulate(st: _TeacherState, s_lp: torch.Tensor, t_lp: torch.Tensor) -> None:
    """Add a block of aligned rows (student ``[N, V_s]``, teacher ``[N, V_t]`` log-probs) to the sums."""
    t_lp = _to_student_vocab(t_lp, st.mapping, s_lp.shape[1])
    st.aligned += len(s_lp)
    st.agree += int((t_lp.argmax(-1) == s_lp.argmax(-1)).sum().item())
    s_lp = s_lp[:, :t_lp.shape[1]]
    p = t_lp.exp()
    st.kl += torch.where(p > 0, p * (t_lp - s_lp), torch.zeros_like(p)).sum().item()

@torch.no_grad()
def completion_sums(model, tokenizer, examples: Sequence, *, max_len: int, batch_size: int = 8,
                    device: str | torch.device = "cpu") -> tuple[float, int, int]:
    """``(Σ bits, tokens, bytes)`` of the completions of :class:`stillroom.inputs.chat.Example` s: each row as training
    sees it (``stillroom.inputs.chat.CompletionCollator(tokenizer, max_len)``: the model's own prompt rendering, the
    completion and its end token), scored on the completion tokens only (end token included); bytes are the
    UTF-8 bytes of the completion text those tokens spell. bits / bytes is the completion's bits per byte."""

    collate = CompletionCollator(tokenizer, max_len)
    bits, tokens, nbytes = 0.0, 0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(list(examples[i:i + batch_size]))
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        labels = b["labels"][:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                                reduction="sum")
        bits += float(nll) / math.log(2)
        tokens += int(labels.ne(-100).sum())
        nbytes += sum(len(c.encode("utf-8")) for c in b["completion"])
    return bits, tokens, nbytes


def document_sums(model, tokenizer, doc, *, batch_size: int = 8, device: str | torch.device = "cpu",
                  max_len: int | None = None) -> tuple[float, int, int]:
    """``(Σ bits, tokens, bytes)`` of one evaluation document: a text (:func:`evaluate`) or a
    :class:`stillroom.inputs.chat.Example` (:func:`completion_sums`, rows of at most ``max_len`` tokens)."""
    if isinstance(doc, str):
        r = evaluate(model, tokenizer, [doc], batch_size=batch_size, device=device)
        return r.nll_bits, r.tokens, r.bytes
    return completion_sums(model, tokenizer, [doc], max_len=max_len or model_context(model, default=1024), batch_size=batch_size,
                           device=device)


def evaluate_paths(models: Sequence[str | os.PathLike], data: str | os.PathLike, *,
                   teachers: Sequence[str | os.PathLike] = (), context: int | None = None,
                   stride: int | None = None, batch_size: int = 8, device: str = "cpu",
                   progress: bool = True, documents: str = "file") -> list[EvalReport]:
    """Load each model folder and evaluate it on DATA (see :func:`load_eval_texts`), against each teacher."""
    check_device(device)
    texts = load_eval_texts(data, documents)
    loaded_teachers = [(Path(t).name, *load_model(t, device, "--teacher")) for t in teachers]
    reports = []
    for path in models:
        model, tokenizer = load_model(path, device, "--model")
        reports.append(evaluate(model, tokenizer, texts, name=Path(path).name, teachers=loaded_teachers,
                                context=context, stride=stride, batch_size=batch_size, device=device,
                                progress=progress))
    return reports


def report_table(reports: Sequence[EvalReport]):
    """Rich renderable: a table with one row per model, then (given teachers) one row per model and teacher."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title="bits per byte (lower is better; comparable across tokenizers)")
    for col in ("model", "bits/byte", "token ppl", "tokens", "bytes", "texts"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in reports:
        table.add_row(r.model, f"{r.bits_per_byte:.4f}", f"{r.token_perplexity:.2f}", f"{r.tokens:,}",
                      f"{r.bytes:,}", f"{r.texts:,}")
    if not any(r.teachers for r in reports):
        return table
    agree = Table(title="agreement with teachers on 1-to-1 aligned positions")
    for col in ("model", "teacher", "aligned", "top-1 agree", "KL(T||S) nats"):
        agree.add_column(col, justify="left" if col in ("model", "teacher") else "right")
    for r in reports:
        for m in r.teachers:
            agree.add_row(r.model, m.teacher, f"{m.aligned / max(1, m.positions):.1%}", f"{m.top1_agreement:.3f}",
                          f"{m.kl_nats:.4f}")
    return Group(table, agree)
