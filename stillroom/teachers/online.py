"""A teacher run in-process: a Hugging Face causal LM scored once per text, its top-k kept.

:class:`OnlineTeacher` gives, per example, a :class:`~stillroom.targets.TeacherOutput` over the *teacher's*
tokenization (top-k ids and log-probs at temperature τ, tail mass, gold CE); :class:`TeacherSignal` is what the
trainer and the cache writer need from any teacher signal, online or cached
(:class:`stillroom.teachers.cache.CachedTeacher`). ``teacher_hash`` / ``tokenizer_hash`` fingerprint what a
signal was computed with, so a cache is never read for another teacher. Texts longer than the context are
scored in overlapping windows (see :mod:`stillroom.teachers.cache`'s docstring, "Long texts").
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from stillroom.errors import ConfigError, DataError
from stillroom.models.loading import check_device, load_causal_lm, load_tokenizer, resolve_model
from stillroom.models.precision import auto_dtype, parse_dtype
from stillroom.models.runtime import forward_accepts, freeze_teacher, frozen
from stillroom.targets import TeacherOutput
from stillroom.tokenization.special import pad_id
from stillroom.tokenization.tokens import TokenTable


class TeacherSignal(Protocol):
    """What the trainer needs from a teacher, online or cached."""
    top_k: int
    temperature: float
    teacher_hash: str
    tokenizer_hash: str

    def signal(self, texts: Sequence[str] | None, example_ids: Sequence[str] | None = None) -> list[TeacherOutput]:
        ...


def tokenizer_hash(tokenizer) -> str:
    """Content hash of a tokenizer (``TokenTable.hash``: tokenizer JSON including added tokens)."""
    return TokenTable.from_tokenizer(tokenizer).hash


def teacher_hash(model_or_dir) -> str:
    """Fingerprint of a teacher's weights.

    For a model folder: sha256 of ``config.json`` and of every ``*.safetensors`` file (whole file up to
    64 MiB; larger files contribute their size, their safetensors header and three 1 MiB samples, so hashing
    a 70B teacher takes seconds, not minutes). A model object loaded from such a folder hashes as the folder;
    otherwise its config and parameter bytes are hashed.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        return dir_hash(Path(model_or_dir))
    src = getattr(model_or_dir, "name_or_path", "") or ""
    if src and Path(src).is_dir() and list(Path(src).glob("*.safetensors")):
        return dir_hash(Path(src))
    h = hashlib.sha256(model_or_dir.config.to_json_string(use_diff=False).encode())
    for name, t in model_or_dir.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dir_hash(path: Path) -> str:
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").exists() or not files:
        raise FileNotFoundError(f"teacher folder {path} needs config.json and *.safetensors weights")
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f.name.encode() + size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            if size <= 64 << 20:
                h.update(fh.read())
                continue
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 100 << 20)))
            for pos in (0, size // 2, size - (1 << 20)):
                fh.seek(pos)
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def _windows(n: int, max_length: int, overlap: int) -> list[tuple[int, int, int]]:
    """(input start, input end, first kept position) for a text of n tokens; see the module docstring."""
    out, s = [], 0
    while s < n:
        a = s - overlap if s > 0 else 0
        e = min(n, a + max_length)
        out.append((a, e, s))
        s = e
    return out


class OnlineTeacher:
    """A Hugging Face causal LM as a teacher signal.

    ``model``: a model folder (loaded with ``AutoModelForCausalLM``, safetensors only, no remote code) or a
    loaded model. ``tokenizer`` defaults to the folder's. ``batch_tokens`` bounds padded tokens per forward
    (default 4096 on GPU, 1024 on CPU).
    """

    def __init__(self, model, tokenizer=None, top_k: int = 16, temperature: float = 1.0,
                 max_length: int | None = None, overlap: int | None = None, batch_tokens: int | None = None,
                 device: str | torch.device | None = None, dtype: str = "auto"):
        if isinstance(model, (str, os.PathLike)):  # checked folder: weights, tokenizer, vocabulary that fits
            self.source = str(model)
            model = resolve_model(model, "teacher")  # a .gguf file: its converted folder (converted once)
            device = check_device(device) or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = tokenizer or load_tokenizer(model, "teacher")
            self.teacher_hash = dir_hash(Path(model))
            model = load_causal_lm(model, "teacher", dtype=_pick_dtype(dtype, device), device=device,
                                   tokenizer=tokenizer)
        else:
            self.source = getattr(model, "name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise ValueError("OnlineTeacher: pass tokenizer= with a loaded model")
            self.teacher_hash = teacher_hash(model)
            if device is not None:
                model = model.to(device)
        self.model = freeze_teacher(model)
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        if len(tokenizer) > self.vocab_size:
            raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the teacher's vocab_size is "
                             f"{self.vocab_size}; they do not belong together")
        if not isinstance(top_k, int) or not 1 <= top_k <= self.vocab_size:
            raise ConfigError(f"top_k (--top-k) must be in [1, {self.vocab_size}], got {top_k}")
        if temperature <= 0:
            raise ConfigError(f"temperature (--temperature) must be > 0, got {temperature}")
        ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_length = int(max_length or ctx or 2048)
        if ctx and self.max_length > ctx:
            raise ConfigError(f"max_length (--max-length) {self.max_length} exceeds the teacher's context {ctx}")
        self.overlap = int(self.max_length // 8 if overlap is None else overlap)
        if not 0 <= self.overlap < self.max_length:
            raise ConfigError(f"overlap (--overlap) must be in [0, max_length={self.max_length}), got {self.overlap}")
        self.top_k, self.temperature = int(top_k), float(temperature)
        # padded tokens per forward: the [tokens, V] fp32 logits dominate memory (1024 x 128k = 0.5 GB)
        self.batch_tokens = int(batch_tokens or (4096 if self.device.type == "cuda" else 1024))
        self.pad_id = pad_id(tokenizer)
        self._keep = forward_accepts(model, "logits_to_keep")  # the head on a suffix of the columns only

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"text {i} is empty; drop it before asking the teacher")
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        if any(len(x) < 2 for x in ids):  # zero tokens cached is an error, never a result
            raise DataError(f"{self.source}: its tokenizer gives < 2 tokens for text {[len(x) < 2 for x in ids].index(True)}")
        return ids

    def signal(self, texts: Sequence[str], example_ids: Sequence[str] | None = None) -> list[TeacherOutput]:
        """Run the teacher on ``texts``; one :class:`TeacherOutput` per text, in order."""
        ids = [str(i) for i in range(len(texts))] if example_ids is None else [str(i) for i in example_ids]
        if len(ids) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(ids)} example ids")
        return self.run_ids(self.tokenize(texts), ids)

    @frozen()
    def run_ids(self, token_ids: Sequence[Sequence[int]], example_ids: Sequence[str],
                starts: Sequence[int] | None = None) -> list[TeacherOutput]:
        """Score already-tokenized examples (teacher tokenization). ``starts[i]``: the first position of example
        i whose signal is wanted (a completion's region); rows before it are left empty (ids 0, log-probs
        −inf, CE nan) and, where every row of a forward starts late, the head never computes their logits —
        at a 262k vocabulary the head costs more than the body."""
        k, tau = self.top_k, self.temperature
        arrs = [torch.as_tensor(list(t), dtype=torch.long) for t in token_ids]
        first = [0] * len(arrs) if starts is None else [max(0, int(x)) for x in starts]
        res = [(torch.zeros(len(a), k, dtype=torch.long), torch.full((len(a), k), float("-inf")),
                torch.zeros(len(a)), torch.full((len(a),), float("nan"))) for a in arrs]
        wins = [(ex, a, e, max(s, first[ex])) for ex, arr in enumerate(arrs)
                for (a, e, s) in _windows(len(arr), self.max_length, self.overlap) if e > first[ex]]
        wins.sort(key=lambda w: (-(w[2] - w[1]), w[0], w[1]))  # longest first: less padding, stable order
        i = 0
        while i < len(wins):
            width = wins[i][2] - wins[i][1]
            n = max(1, self.batch_tokens // width)
            batch, i = wins[i:i + n], i + n
            x = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (ex, a, e, _) in enumerate(batch):
                x[r, :e - a] = arrs[ex][a:e]
                mask[r, :e - a] = 1
            lo = min(s - a for _, a, _, s in batch) if self._keep else 0  # columns before lo: no logits
            keep = {"logits_to_keep": width - lo} if lo else {}
            z = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device), **keep).logits
            for r, (ex, a, e, s) in enumerate(batch):  # only positions s..e-1 are kept: no padding, no overlap
                zr = z[r, s - a - lo:e - a - lo].float()
                top_vals, top_ids, lse1, lse_tau = topk_logsumexp(zr, k, tau)  # the same ids at any tau > 0
                lp = (top_vals / tau - lse_tau[:, None]).cpu()
                ids_out, lp_out, tail_out, ce_out = res[ex]
                ids_out[s:e], lp_out[s:e] = top_ids.cpu(), lp
                tail_out[s:e] = (1.0 - lp.double().exp().sum(-1)).clamp_min(0).float()
                gold = arrs[ex][s + 1:e + 1].to(zr.device)  # positions s..s+len(gold)-1 have a next token
                ce_out[s:s + len(gold)] = (lse1[:len(gold)] - zr[:len(gold)].gather(1, gold[:, None])[:, 0]).cpu()
            del z
        return [TeacherOutput(eid, arr, *r) for eid, arr, r in zip(example_ids, arrs, res, strict=True)]


def topk_logsumexp(z: torch.Tensor, k: int, tau: float = 1.0, *, rows: int = 32, block: int = 256):
    """Top-k and log-sum-exp of each row of logits ``z`` [N, V] in one cache-friendly sweep.

    Returns ``(values, ids, lse_1, lse_tau)``: the k largest logits of each row (descending) and their ids,
    ``logsumexp(z)`` and ``logsumexp(z / tau)``. At a large vocabulary ``torch.topk`` and ``torch.logsumexp``
    over [N, V] cost as much as a small teacher's forward (0.13 s and 0.3 s for 1,024 x 128k on 2 cores), so
    on CPU rows go in chunks that stay in cache, and the top-k is found among a few blocks: split a row into
    blocks of ``block`` logits; any logit of the top k lies in a block whose maximum is >= the k-th largest
    logit, and at most k blocks have such a maximum, so the top k blocks by maximum hold the whole top k.
    The row maximum is the maximum of the block maxima; when every |max| < 60 the sum of exp(z) is taken
    unshifted (no overflow for V < 2^40; a term lost to underflow is < e^-27 of the total), saving a pass.
    Exact, ties aside.
    """
    n, v = z.shape
    if z.device.type != "cpu" or v < 8 * k * block:  # small vocabularies / GPU: the library kernels are fine
        vals, ids = torch.topk(z, k, dim=-1)
        lse1 = torch.logsumexp(z, -1)
        return vals, ids, lse1, lse1 if tau == 1.0 else torch.logsumexp(z / tau, -1)
    nb = v // block
    full = nb * block
    vals = torch.empty(n, k, dtype=z.dtype)
    ids = torch.empty(n, k, dtype=torch.long)
    lse1 = torch.empty(n, dtype=z.dtype)
    lse_tau = lse1 if tau == 1.0 else torch.empty(n, dtype=z.dtype)
    offsets = torch.arange(block)
    rest = torch.arange(full, v)  # a last, partial block is always a candidate
    scratch = torch.empty(rows, v, dtype=z.dtype)  # reused: a fresh 8 MB buffer per chunk costs page faults
    for s in range(0, n, rows):
        c = z[s:s + rows]
        m = c.shape[0]
        bmax = c[:, :full].reshape(m, nb, block).amax(-1)
        cols = (bmax.topk(k, -1).indices[..., None] * block + offsets).reshape(m, k * block)
        if full < v:
            cols = torch.cat([cols, rest.expand(m, -1)], 1)
        cv, ci = c.gather(1, cols).topk(k, -1)
        vals[s:s + m], ids[s:s + m] = cv, cols.gather(1, ci)
        zmax = bmax.amax(-1, keepdim=True)
        if full < v:
            zmax = torch.maximum(zmax, c[:, full:].amax(-1, keepdim=True))
        e = scratch[:m]
        if float(zmax.abs().max()) < 60.0:  # exp(z) neither overflows nor loses the row's top: skip the shift
            lse1[s:s + m] = torch.exp(c, out=e).sum(-1).log_()
        else:
            lse1[s:s + m] = torch.sub(c, zmax, out=e).exp_().sum(-1).log_() + zmax[:, 0]
        if tau != 1.0:
            lse_tau[s:s + m] = torch.sub(c, zmax, out=e).div_(tau).exp_().sum(-1).log_() + zmax[:, 0] / tau
    return vals, ids, lse1, lse_tau


def _pick_dtype(dtype: str, device: torch.device):
    """``auto``: measured by :func:`stillroom.models.precision.auto_dtype` (bf16 only where this machine runs it faster)."""
    return auto_dtype(device, parse_dtype(dtype, "--dtype"))
