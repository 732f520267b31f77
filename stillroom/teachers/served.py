"""A teacher behind an OpenAI-compatible server: llama.cpp's, vLLM, ``llama_cpp.server`` of llama-cpp-python.

The completions API scores a prompt when asked ``echo: true, logprobs: k, max_tokens: 1``: every echoed prompt
token comes back with a dict ``{token text: log-prob}`` of the top k of *one* next-token distribution. Servers
disagree on which. The OpenAI reading gives at echoed token e the distribution that predicted it (the one after
token e − 1); ``llama_cpp.server`` gives the one *after* token e and leaves the first entry empty. Both are an
offset: echoed entry e holds local row ``r = e + o`` (row r predicts token r + 1 of the local tokenization, as in
:class:`~stillroom.targets.TeacherOutput`). :class:`ServedTeacher` measures ``o`` at start, on a probe whose
next tokens are nearly certain (counting), as the offset under which the probe's real next tokens are likely,
and refuses in one line when no offset fits. A row a server leaves empty is asked for alone with ``echo: false``
on the text before it: the one sampled token carries the distribution after its prompt in every server.
The cache records the teacher as the served model's name, the tokenizer and its top-1 ids on the probe.

Ids: the server must tokenize as the local tokenizer does (checked on the probe through the server's tokenize
endpoint where it has one — a BOS asymmetry shifts every row — and for every text by the number of echoed
tokens). Top-k entries come keyed by text; each maps back to the one local id whose bytes are that text. An
entry whose text several such ids share, or none, is not guessed: its mass joins the tail and is counted
(:class:`ServedStats`). A token that is part of a UTF-8 character prints, invalid bytes dropped, like a whole
token (``Ġ`` + half of ``é`` prints as ``" "``, as ``Ġ`` does): such a text is read as the whole token, and counted.
The gold next token's log-prob (``gold_ce``) is read where the returned entries hold it, ``nan`` elsewhere.
The API returns log-probs at temperature 1 only, so a served teacher has τ = 1.

Requests go ``concurrency`` at a time; a connection error, a timeout or a 5xx is retried with exponential backoff
(``retries`` times), then one :class:`~stillroom.errors.ServerError` line. The cache writer keeps its contract:
rows are written shard by shard, so a dropped connection loses no finished row and duplicates none.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from stillroom.errors import ConfigError, DataError, ServerError
from stillroom.targets import TeacherOutput
from stillroom.tokenization.tokens import TokenTable

#: nearly certain next tokens for any language model worth distilling from
PROBE = ", ".join(str(i) for i in range(1, 41))
OFFSETS = (-1, 0, 1)


@dataclass
class ServedStats:
    """What the server's answers held, summed over every text scored so far."""

    requests: int = 0
    retries: int = 0
    entries: int = 0          # top-k entries read
    ambiguous: int = 0        # entries whose text several local ids share (mass → tail)
    unmapped: int = 0         # entries whose text no local id has (mass → tail)
    lossy: int = 0            # entries read as the whole token a partial-character token also prints as
    extra_rows: int = 0       # rows asked for alone (the server left them empty)
    empty_rows: int = 0       # rows no request gave (tail = 1)
    gold_unknown: int = 0     # rows whose gold next token was not among the returned entries
    rows: int = 0

    def add(self, other: ServedStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def line(self) -> str:
        share = lambda n, d: f"{n:,} ({100 * n / max(d, 1):.2f}%)"  # noqa: E731
        return (f"{self.rows:,} rows in {self.requests:,} requests ({self.retries} retried); entries "
                f"ambiguous {share(self.ambiguous, self.entries)}, unmapped {share(self.unmapped, self.entries)}, "
                f"read past a partial-character twin {share(self.lossy, self.entries)}; "
                f"rows asked alone {self.extra_rows:,}, without a distribution {self.empty_rows:,}, gold outside "
                f"the entries {share(self.gold_unknown, self.rows)}")


@dataclass
class Reply:
    """One completion's log-probs: per entry the ``{text: log-prob}`` dict (``None`` = empty); ``prompt``: how
    many entries are the echoed prompt's (by their text offsets; a server may or may not add the sampled
    token's entry after them)."""

    tokens: list[str]
    top: list[dict[str, float] | None] = field(default_factory=list)
    prompt: int = 0


def _post(url: str, body: dict | None, timeout: float) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


class ServedTeacher:
    """A teacher signal from an OpenAI-compatible completions server (see the module docstring).

    ``url``: the server (``http://host:port`` or ``.../v1``); ``tokenizer``: the teacher's tokenizer, loaded (a
    folder or a ``.gguf`` is loaded by :func:`from_path`); ``model``: the served model's name when the server
    hosts several. ``max_length``: the longest text in tokens (the server's context; texts are not windowed).
    """

    def __init__(self, url: str, tokenizer, *, model: str | None = None, top_k: int = 16, temperature: float = 1.0,
                 max_length: int = 2048, concurrency: int = 4, retries: int = 5, timeout: float = 120.0,
                 backoff: float = 0.5, probe: str = PROBE, source: str | None = None):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"server {url!r} is not an http(s) URL; give it as http://HOST:PORT")
        if temperature != 1.0:
            raise ConfigError(f"temperature {temperature}: a served teacher returns log-probs at temperature 1 "
                              "only; set temperature 1 (loss.temperature / --temperature)")
        for name, v, lo in (("top_k", top_k, 1), ("concurrency", concurrency, 1), ("retries", retries, 0),
                            ("max_length", max_length, 2)):
            if not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")
        self.base = url.rstrip("/").removesuffix("/v1")
        self.tokenizer, self.top_k, self.temperature = tokenizer, int(top_k), 1.0
        self.max_length, self.overlap = int(max_length), 0
        self.concurrency, self.retries, self.timeout, self.backoff = concurrency, retries, timeout, backoff
        self.batch_tokens = 1024 * concurrency  # what the cache writer groups texts by
        self.table = TokenTable.from_tokenizer(tokenizer)
        self.vocab_size = self.table.vocab_size
        self.tokenizer_hash = self.table.hash
        self.stats = ServedStats()
        self._stats_lock = threading.Lock()  # requests run in threads: counts are merged under it
        self._by_text = self._text_index()
        self.model = model or self._only_model()
        self.source = source or f"{self.base} ({self.model})"
        self.offset, self.strip, top1 = self._probe(probe)
        # what a cache records as the teacher: the served model's name, the tokenizer and its top-1 ids on the
        # probe (the weights are not reachable through the API)
        self.teacher_hash = hashlib.sha256(f"served:{self.model}:{self.tokenizer_hash}:{top1}".encode()).hexdigest()

    @classmethod
    def from_path(cls, url: str, path: str | Path, what: str = "teacher", **kw) -> ServedTeacher:
        """The teacher's tokenizer read from a model or tokenizer folder, or a ``.gguf`` file (tokenizer only)."""
        from stillroom.models.loading import load_tokenizer

        p = Path(path)
        tok = load_tokenizer(p, what, model=False)  # a folder, or a .gguf's tokenizer without its weights
        return cls(url, tok, source=kw.pop("source", None) or f"{url} ({p.name})", **kw)

    # --- HTTP -----------------------------------------------------------------------------------------------
    def _call(self, path: str, body: dict | None = None, *, quiet_4xx: bool = False) -> dict | None:
        """POST (GET without body) with retries on connection errors, timeouts and 5xx; a 4xx is the caller's
        mistake: one line with the server's message (``None`` with ``quiet_4xx``)."""
        url, last = self.base + path, ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count(ServedStats(retries=1))
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                self._count(ServedStats(requests=1))
                return _post(url, body, self.timeout)
            except urllib.error.HTTPError as e:
                msg = _server_message(e)
                if e.code < 500:
                    if quiet_4xx:
                        return None
                    raise ServerError(f"teacher server {url}: {e.code} {msg}{_hint(msg, self.top_k)}") from None
                last = f"{e.code} {msg}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
            except json.JSONDecodeError:
                raise ServerError(f"teacher server {url}: the answer is not JSON; is this an OpenAI-compatible "
                                  "server (llama.cpp, vLLM)?") from None
        raise ServerError(f"teacher server {url}: no answer after {self.retries + 1} tries (last: {last}); check "
                          f"that it runs and the URL (--server / teachers[].server)")

    def _only_model(self) -> str:
        ans = self._call("/v1/models")
        names = [m.get("id") for m in (ans or {}).get("data", []) if m.get("id")]
        if not names:
            raise ServerError(f"teacher server {self.base}: /v1/models lists no model; is it an OpenAI-compatible "
                              "server?")
        if len(names) > 1:
            raise ConfigError(f"teacher server {self.base} hosts several models ({', '.join(names)}); pick one "
                              "with --server-model / teachers[].server_model")
        return names[0]

    def complete(self, prompt: str, *, echo: bool) -> Reply:
        """One completion of a single token at temperature 0 with the top-k log-probs."""
        ans = self._call("/v1/completions", {"model": self.model, "prompt": prompt, "echo": echo,
                                             "logprobs": self.top_k, "max_tokens": 1, "temperature": 0.0})
        try:
            lp = ans["choices"][0]["logprobs"]
        except (KeyError, IndexError, TypeError):
            lp = None
        if not lp or "top_logprobs" not in lp:
            raise ServerError(f"teacher server {self.base}: its completions carry no logprobs; start it with "
                              "log-probs enabled (llama_cpp.server: --logits_all true)")
        top = list(lp["top_logprobs"])
        offsets = lp.get("text_offset") or []
        n_prompt = sum(o < len(prompt) for o in offsets) if len(offsets) == len(top) else len(top) - 1
        return Reply(list(lp.get("tokens") or []), top, n_prompt if echo else 0)

    def server_tokens(self, text: str) -> list[int] | None:
        """The server's own tokenization of ``text`` (llama_cpp.server, vLLM and llama.cpp each name the
        endpoint differently); ``None`` where it has none."""
        for path, body, key in (("/extras/tokenize", {"input": text, "model": self.model}, "tokens"),
                                ("/tokenize", {"prompt": text, "model": self.model}, "tokens"),
                                ("/tokenize", {"content": text, "add_special": True}, "tokens")):
            ans = self._call(path, body, quiet_4xx=True)
            if ans and isinstance(ans.get(key), list):
                return [int(t) for t in ans[key]]
        return None

    # --- ids --------------------------------------------------------------------------------------------------
    def _text_index(self) -> dict[str, tuple[int, bool]]:
        """Token text → (id, lossy) as servers decode a token alone: its bytes as UTF-8, invalid bytes dropped.
        A text maps to the one id whose bytes *are* that text (-1 where several are); ``lossy``: a token that
        is a piece of a UTF-8 character also prints as it (llama.cpp's ``" "`` is ``Ġ`` or ``Ġ`` + half of
        ``é``); such a text is read as the whole token and counted. A text only partial tokens print maps to
        the one of them, else -1."""
        exact: dict[str, int] = {}
        partial: dict[str, int] = {}
        for i, b in enumerate(self.table.token_bytes):
            raw = bytes(b)
            try:
                s = raw.decode("utf-8")
                exact[s] = -1 if s in exact else i
            except UnicodeDecodeError:
                s = raw.decode("utf-8", errors="ignore")
                partial[s] = -1 if s in partial else i
        index = {s: (i, s in partial) for s, i in exact.items()}
        for s, i in partial.items():
            index.setdefault(s, (i, False))
        return index

    def local_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _row(self, entry: dict[str, float]) -> list[tuple[int, float, bool]]:
        """(id, log-prob, lossy) of one returned dict, best first; ambiguous / unmapped texts get id -1 / -2."""
        out = []
        for s, v in entry.items():
            i, lossy = self._by_text.get(s, (-2, False))
            out.append((i, float(v), lossy))
        return sorted(out, key=lambda e: -e[1])

    # --- the convention ------------------------------------------------------------------------------------
    def _probe(self, probe: str) -> tuple[int, int, list[int]]:
        """(offset, strip, top-1 ids of the probe's rows): the reading that predicts the probe, see the module
        docstring."""
        local = self.local_ids(probe)
        served = self.server_tokens(probe)
        if served is not None and served != local:
            j = next((i for i, (a, b) in enumerate(zip(served, local, strict=False)) if a != b), min(len(served), len(local)))
            raise ConfigError(f"teacher server {self.base} tokenizes the probe differently from the local "
                              f"tokenizer (first difference at token {j}: server {served[j:j + 3]}, local "
                              f"{local[j:j + 3]}; {len(served)} vs {len(local)} tokens); give the teacher's own "
                              "tokenizer (teachers[].path / --teacher), with the same BOS rule")
        reply = self.complete(probe, echo=True)
        n = len(local)
        strip = n - reply.prompt  # 1 where the server leaves its BOS out of the echo
        if strip not in (0, 1):
            raise ConfigError(f"teacher server {self.base} echoed {reply.prompt} tokens for a probe of {n} "
                              "local tokens; its tokenizer is not the local one (teachers[].path / --teacher)")
        rows = [None if d is None else self._row(d) for d in reply.top]
        scores = {}
        for o in OFFSETS:
            got = []
            for e, row in enumerate(rows):
                r = e + o
                if row is None or not n // 2 <= r < n - 1:
                    continue
                hit = [v for i, v, _ in row if i == local[r + 1]]
                got.append(hit[0] if hit else math.log(1e-4))
            scores[o] = sum(got) / len(got) if got else float("-inf")
        best = max(scores, key=scores.get)
        second = max(v for o, v in scores.items() if o != best)
        if scores[best] < math.log(0.5) or scores[best] - second < 1.0:
            shown = ", ".join(f"{o:+d}: {math.exp(v):.3f}" for o, v in scores.items())
            raise ServerError(f"teacher server {self.base}: no reading of its log-probs predicts the probe's next "
                              f"tokens (mean probability by offset {shown}); is the model served the teacher "
                              f"whose tokenizer was given, with its log-probs?")
        return best, strip, [row[0][0] if row else -3 for row in rows]

    # --- scoring ----------------------------------------------------------------------------------------------
    def signal(self, texts: Sequence[str], example_ids: Sequence[str] | None = None) -> list[TeacherOutput]:
        """One :class:`TeacherOutput` per text, scored by the server (``concurrency`` requests at a time)."""
        ids = [str(i) for i in range(len(texts))] if example_ids is None else [str(i) for i in example_ids]
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} example ids")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"text {ids[i]} is empty; drop it before asking the teacher")
        return _map(self.concurrency, lambda j: self._one(texts[j], ids[j]), range(len(texts)))

    def _one(self, text: str, example_id: str) -> TeacherOutput:
        local = self.local_ids(text)
        n, k = len(local), self.top_k
        if n < 2:
            raise DataError(f"example {example_id}: the teacher's tokenizer gives < 2 tokens")
        if n > self.max_length:
            raise DataError(f"example {example_id} has {n} teacher tokens, more than max_length {self.max_length} "
                            "(the server's context); shorten the texts or raise --max-length / the server's")
        reply = self.complete(text, echo=True)
        if reply.prompt != n - self.strip:
            raise DataError(f"example {example_id}: the server echoed {reply.prompt} tokens where the local "
                            f"tokenizer has {n - self.strip}; it tokenizes this text differently (see the teacher's "
                            "tokenizer)")
        rows: list[list[tuple[int, float, bool]] | None] = [None] * n
        for e, d in enumerate(reply.top):
            r = e + self.offset
            if d is not None and 0 <= r < n:
                rows[r] = self._row(d)
        for r in [r for r in range(n) if rows[r] is None]:  # a row the server left empty: asked alone
            prefix = self.tokenizer.decode(local[:r + 1], skip_special_tokens=True)
            alone = self.complete(prefix, echo=False)
            if alone.top and alone.top[-1] is not None:
                rows[r] = self._row(alone.top[-1])
                self._count(ServedStats(extra_rows=1))
        return self._output(example_id, local, rows, k)

    def _output(self, example_id: str, local: list[int], rows, k: int) -> TeacherOutput:
        n = len(local)
        ids = torch.zeros(n, k, dtype=torch.long)
        lp = torch.full((n, k), float("-inf"))
        tail = torch.ones(n)
        ce = torch.full((n,), float("nan"))
        st = ServedStats()  # this text's counts, merged once at the end
        for r, row in enumerate(rows):
            st.rows += 1
            if row is None:
                st.empty_rows += 1
                continue
            top = row[:k]  # the server's k best (an extra entry, llama_cpp's echoed token, is past them)
            st.entries += len(top)
            kept = [(i, v) for i, v, _ in top if i >= 0]
            st.ambiguous += sum(i == -1 for i, _, _ in top)
            st.unmapped += sum(i == -2 for i, _, _ in top)
            st.lossy += sum(lossy for i, _, lossy in top if i >= 0)
            for c, (i, v) in enumerate(kept):
                ids[r, c], lp[r, c] = i, v
            tail[r] = max(0.0, 1.0 - sum(math.exp(v) for _, v in kept))
            if r + 1 < n:
                gold = [v for i, v, _ in row if i == local[r + 1]]
                if gold:
                    ce[r] = -gold[0]
                else:
                    st.gold_unknown += 1
        self._count(st)
        return TeacherOutput(example_id, torch.as_tensor(local, dtype=torch.long), ids, lp, tail, ce)

    def _count(self, delta: ServedStats) -> None:
        with self._stats_lock:
            self.stats.add(delta)


def _map(workers: int, fn: Callable[[int], TeacherOutput], items) -> list[TeacherOutput]:
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read().decode())
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else str(err)
        return str(msg or body).splitlines()[0][:300]
    except Exception:  # noqa: BLE001 - any unreadable body: the status line says enough
        return str(e.reason)


def _hint(msg: str, k: int) -> str:
    """The fix for the 4xx answers a user can meet: k above the server's maximum, or a server that cannot echo
    the prompt (llama.cpp's own ``llama-server`` answers "Only no echo is supported")."""
    low = msg.lower()
    if "logprob" in low and any(w in low for w in ("max", "exceed", "greater", "less than", "at most")):
        return f"; lower --top-k / fusion.top_k (asked {k})"
    if "echo" in low:
        return ("; this server cannot return a prompt's log-probs (echo): serve the teacher with llama_cpp.server "
                "(pip install 'llama-cpp-python[server]') or vLLM")
    return ""
