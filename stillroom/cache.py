"""Teacher signals: run a teacher once (online) or read what it said from a compact offline cache.

A teacher signal, per example, is a :class:`TeacherOutput` over the *teacher's* tokenization of the text:
for every position i the top-k next-token ids and log-probs at temperature tau,

    topk_logprobs[i] = log softmax(z_i / tau)[topk_ids[i]],    tail[i] = 1 - sum(exp(topk_logprobs[i])),

and the teacher's cross-entropy on its own gold next token at tau = 1, ``gold_ce[i] = -log p(x_{i+1} | x_<=i)``
(``nan`` at the last position, which predicts nothing). Row i predicts token i+1 (standard causal shift).

Two implementations give the same result: :class:`OnlineTeacher` (a Hugging Face causal LM run under
``no_grad`` in eval mode, batched) and :class:`CachedTeacher` (reads a cache written by :func:`write_cache`).
:func:`student_targets` moves a teacher output onto a student's positions and vocabulary.

**Long texts.** A text longer than the teacher's context (``max_length``, default the model's
``max_position_embeddings`` / ``n_positions``) is cut into windows of ``max_length`` tokens that overlap by
``overlap`` tokens (default ``max_length // 8``): window w > 0 re-reads the ``overlap`` tokens before its
first position as context and only its new positions are kept. Every position is scored exactly once and
sees at least ``overlap`` tokens of context (the whole prefix when the text fits). Only the first window
starts with the tokenizer's special tokens (e.g. BOS).

**Cache layout** (``CACHE_DIR``): ``plan.json`` (what is being built: teacher/tokenizer hashes, k,
temperature, encoding, data fingerprint, shard count), ``shard-NNNNN-of-MMMMM.parquet`` (examples
``[N*shard_size, (N+1)*shard_size)`` of the data, in data order; one row per example, keyed by example id,
never by step), one ``.json`` sidecar per finished shard (rows, tokens, sha256, measured error), and
``manifest.json`` (plan + every shard's entry + totals) once all shards exist. Each file is written to a
temporary name, fsynced and renamed, so a shard is never half-visible; a shard counts as done only when its
sidecar exists, so rerunning the same command after a crash redoes only unfinished shards. Under
torchrun/accelerate (``RANK``/``WORLD_SIZE``) rank r writes shards ``N % WORLD_SIZE == r``; whichever rank
finishes last merges the sidecars into the manifest.

**Encoding**: see :mod:`stillroom.codec` (bit-packed ids, gap-coded log-probs, logit-coded tail,
float16 ``gold_ce``: ~3 bytes per top-k entry up to 2^18 ids).

The writer measures, against the exact values it had before encoding, the mean KL(exact ‖ decoded) over the
k + 1 bins (top-k plus tail) per token and the largest log-prob error; both go into the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stillroom.codec import Encoding, logprob_step, topk_kl
from stillroom.data_io import TextSource, scan_texts, text_sha
from stillroom.errors import ConfigError, DataError, MissingPathError
from stillroom.modeling import forward_accepts, freeze_teacher, frozen
from stillroom.models import check_device, load_causal_lm, load_tokenizer, resolve_model
from stillroom.outputs import check_output_dir
from stillroom.targets import SparseTarget, TeacherOutput

FORMAT = "stillroom-cache/1"


class CacheMismatchError(ConfigError):
    """The cache on disk was built with another teacher, tokenizer, k, temperature or data."""


# ------------------------------------------------------------------------------------------------------------
# The signal
# ------------------------------------------------------------------------------------------------------------
class TeacherSignal(Protocol):
    """What the trainer needs from a teacher, online or cached."""

    top_k: int
    temperature: float
    teacher_hash: str
    tokenizer_hash: str

    def signal(self, texts: Sequence[str] | None, example_ids: Sequence[str] | None = None) -> list[TeacherOutput]:
        ...


# ------------------------------------------------------------------------------------------------------------
# Hashes
# ------------------------------------------------------------------------------------------------------------
def tokenizer_hash(tokenizer) -> str:
    """Content hash of a tokenizer (``TokenTable.hash``: tokenizer JSON including added tokens)."""
    from stillroom.tokens import TokenTable

    return TokenTable.from_tokenizer(tokenizer).hash


def teacher_hash(model_or_dir) -> str:
    """Fingerprint of a teacher's weights.

    For a model folder: sha256 of ``config.json`` and of every ``*.safetensors`` file (whole file up to
    64 MiB; larger files contribute their size, their safetensors header and three 1 MiB samples, so hashing
    a 70B teacher takes seconds, not minutes). A model object loaded from such a folder hashes as the folder;
    otherwise its config and parameter bytes are hashed.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        return _dir_hash(Path(model_or_dir))
    src = getattr(model_or_dir, "name_or_path", "") or ""
    if src and Path(src).is_dir() and list(Path(src).glob("*.safetensors")):
        return _dir_hash(Path(src))
    h = hashlib.sha256(model_or_dir.config.to_json_string(use_diff=False).encode())
    for name, t in model_or_dir.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dir_hash(path: Path) -> str:
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


# ------------------------------------------------------------------------------------------------------------
# Online teacher
# ------------------------------------------------------------------------------------------------------------
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
            self.teacher_hash = _dir_hash(Path(model))
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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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
    """``auto``: measured by :func:`stillroom.precision.auto_dtype` (bf16 only where this machine runs it faster)."""
    from stillroom.precision import auto_dtype, parse_dtype

    return auto_dtype(device, parse_dtype(dtype, "--dtype"))


# ------------------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: the file appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_done(out: Path, name: str) -> bool:
    """A shard is done when its sidecar exists and the file matches the sidecar's sha256 (a corrupt or
    missing shard is rebuilt by rerunning the command)."""
    side, path = out / (name + ".json"), out / name
    if not side.exists():
        return False
    if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == json.loads(side.read_text())["sha256"]:
        return True
    side.unlink()
    return False


def _shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.parquet"


_PLAN_KEYS = ("format", "teacher_hash", "tokenizer_hash", "top_k", "temperature", "max_length", "overlap",
              "vocab_size", "id_bits", "logprob_bits", "data_fingerprint", "n_examples", "shard_size", "n_shards")


def _check_plan(have: dict, want: dict, where: Path) -> None:
    diffs = [f"{k}: cache has {have.get(k)!r}, this run has {want.get(k)!r}" for k in _PLAN_KEYS
             if have.get(k) != want.get(k)]
    if diffs:
        raise CacheMismatchError(f"{where} was built with different settings ({'; '.join(diffs)}). "
                                 f"Use another --out folder, or delete {where} to rebuild it.")


@dataclass
class CacheSummary:
    """What a :func:`write_cache` call did (this rank) and the cache totals once complete."""

    out: Path
    shards_written: int
    shards_skipped: int
    rows: int
    tokens: int
    seconds: float
    complete: bool
    manifest: dict | None = field(default=None, repr=False)


def write_cache(teacher: OnlineTeacher, data, out: str | os.PathLike, *, shard_size: int = 1000,
                text_field: str = "text", logprob_bits: int | None = None, rank: int | None = None,
                world_size: int | None = None, progress: bool = True, console=None) -> CacheSummary:
    """Run ``teacher`` over DATA (a path, streamed twice: to fingerprint, then shard by shard; or ``[(id, text)]``)
    and write the cache into ``out``; resumes an interrupted run of the same command (see module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = TextSource(data, text_field) if isinstance(data, (str, os.PathLike)) else data  # read twice below
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if shard_size < 1:
        raise ConfigError(f"shard_size (--shard-size) must be >= 1, got {shard_size}")
    fingerprint, n_examples, shard_chars = scan_texts(rows, shard_size)  # DataError when there are none
    enc = Encoding.for_vocab(teacher.vocab_size, teacher.top_k, logprob_bits)
    n_shards = math.ceil(n_examples / shard_size)
    plan = {"format": FORMAT, "teacher": teacher.source, "teacher_hash": teacher.teacher_hash,
            "tokenizer_hash": teacher.tokenizer_hash, "top_k": teacher.top_k, "temperature": teacher.temperature,
            "max_length": teacher.max_length, "overlap": teacher.overlap, "vocab_size": enc.vocab_size,
            "id_bits": enc.id_bits, "logprob_bits": enc.logprob_bits, "logprob_step": logprob_step(enc.logprob_bits),
            "data_fingerprint": fingerprint, "n_examples": n_examples, "shard_size": shard_size,
            "n_shards": n_shards}
    out = check_output_dir(out, "cache folder", marker="plan.json")  # resumable: ours, or new, or empty
    plan_path = out / "plan.json"
    if not plan_path.exists():
        _atomic_write(plan_path, json.dumps(plan, indent=1).encode())
    _check_plan(json.loads(plan_path.read_text()), plan, out)

    mine = [i for i in range(n_shards) if i % world_size == rank]
    todo = [i for i in mine if not _shard_done(out, _shard_name(i, n_shards))]
    for i in mine:  # leftovers of a killed run
        for tmp in out.glob(f".{_shard_name(i, n_shards)}*.tmp.*"):
            tmp.unlink(missing_ok=True)
    todo_chars, it, at = sum(shard_chars[i] for i in todo), iter(rows), 0  # `at`: next shard `it` reaches
    schema = pa.schema([("id", pa.string()), ("text_sha", pa.string()), ("n_tokens", pa.int32()),
                        ("input_ids", pa.binary()), ("topk_ids", pa.binary()), ("topk_codes", pa.binary()),
                        ("tail", pa.binary()), ("gold_ce", pa.binary())])
    t0, n_rows, n_tok = time.perf_counter(), 0, 0
    bar = _progress(progress and rank == 0, console)
    with bar:
        task = bar.add_task(f"teacher pass (rank {rank}/{world_size})", total=max(1, todo_chars), tps="")
        for i in todo:
            chunk, at = list(itertools.islice(it, (i - at) * shard_size, (i - at + 1) * shard_size)), i + 1
            recs, kls, max_err, tokens = [], [], 0.0, 0
            g = max(1, min(64, 4 * teacher.batch_tokens // max(1, *(len(t) for _, t in chunk))))
            for j in range(0, len(chunk), g):  # groups of about one teacher forward (~4 chars/token); bar per group
                part = chunk[j:j + g]
                outs = teacher.signal([t for _, t in part], [e for e, _ in part])
                for (_, text), o in zip(part, outs, strict=True):
                    rec = enc.encode(o)
                    rec["text_sha"] = text_sha(text)
                    dec = enc.decode(rec)
                    kls.append(topk_kl(o.topk_logprobs.numpy(), o.tail.numpy(), dec.topk_logprobs.numpy(),
                                       dec.tail.numpy()))
                    in_range = o.topk_logprobs >= o.topk_logprobs[:, :1] - 15.0  # gaps past the grid clip
                    err = (dec.topk_logprobs - o.topk_logprobs).abs()[in_range]
                    max_err = max(max_err, float(err.max()) if err.numel() else 0.0)
                    tokens += len(o)
                    recs.append(rec)
                n_tok += sum(len(o) for o in outs)
                elapsed = time.perf_counter() - t0
                bar.update(task, advance=sum(len(t) for _, t in part), tps=f"{n_tok / max(elapsed, 1e-9):,.0f} tok/s")
            table = pa.Table.from_pylist(recs, schema=schema)
            sink = pa.BufferOutputStream()
            # no column statistics: min/max of the binary columns would store up to two whole rows per row group
            pq.write_table(table, sink, compression="zstd", row_group_size=256, write_statistics=False,
                           use_dictionary=False)
            blob = sink.getvalue().to_pybytes()
            name = _shard_name(i, n_shards)
            _atomic_write(out / name, blob)
            kl = np.concatenate(kls) if kls else np.zeros(0)
            meta = pq.ParquetFile(pa.BufferReader(blob)).metadata
            entry_bytes = sum(meta.row_group(g).column(c).total_compressed_size  # ids + codes, as stored
                              for g in range(meta.num_row_groups) for c in range(meta.num_columns)
                              if meta.row_group(g).column(c).path_in_schema in ("topk_ids", "topk_codes"))
            side = {"name": name, "rows": len(recs), "tokens": tokens, "bytes": len(blob), "entry_bytes": entry_bytes,
                    "sha256": hashlib.sha256(blob).hexdigest(), "kl_sum": float(kl.sum()),
                    "kl_max": float(kl.max()) if kl.size else 0.0, "max_abs_logprob_err": max_err}
            _atomic_write(out / (name + ".json"), json.dumps(side, indent=1).encode())
            n_rows += len(recs)
    manifest = _maybe_merge(out, plan)
    return CacheSummary(out, len(todo), len(mine) - len(todo), n_rows, n_tok, time.perf_counter() - t0,
                        manifest is not None, manifest)


def _progress(enabled: bool, console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TextColumn("{task.fields[tps]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=console, disable=not enabled, transient=False)


def _maybe_merge(out: Path, plan: dict) -> dict | None:
    """Write manifest.json when every shard's sidecar exists (idempotent; any rank may do it)."""
    n = plan["n_shards"]
    sides = []
    for i in range(n):
        p = out / (_shard_name(i, n) + ".json")
        if not p.exists():
            return None
        sides.append(json.loads(p.read_text()))
    tokens = sum(s["tokens"] for s in sides)
    nbytes = sum(s["bytes"] for s in sides)
    totals = {"rows": sum(s["rows"] for s in sides), "tokens": tokens, "bytes": nbytes,
              "bytes_per_token": nbytes / max(tokens, 1),
              "bytes_per_entry": nbytes / max(tokens * plan["top_k"], 1),
              "entry_bytes_per_entry": sum(s["entry_bytes"] for s in sides) / max(tokens * plan["top_k"], 1),
              "kl_mean": sum(s["kl_sum"] for s in sides) / max(tokens, 1),
              "kl_max": max(s["kl_max"] for s in sides),
              "max_abs_logprob_err": max(s["max_abs_logprob_err"] for s in sides)}
    manifest = dict(plan, shards=[{k: s[k] for k in ("name", "rows", "tokens", "bytes", "sha256")} for s in sides],
                    totals=totals)
    _atomic_write(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


# ------------------------------------------------------------------------------------------------------------
# Verify
# ------------------------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    ok: bool
    checked: int
    missing: list[str]
    corrupt: list[str]
    problems: list[str]


def verify_cache(cache_dir: str | os.PathLike) -> VerifyReport:
    """Check every shard named by the manifest (or plan, for an unfinished cache): present, sha256, row count."""
    import pyarrow.parquet as pq

    d = Path(cache_dir)
    if (d / "manifest.json").exists():
        manifest = json.loads((d / "manifest.json").read_text())
        shards, problems = manifest["shards"], []
    elif (d / "plan.json").exists():
        plan = json.loads((d / "plan.json").read_text())
        n = plan["n_shards"]
        shards, problems = [], ["no manifest.json: the cache is unfinished; rerun the same cache command"]
        for i in range(n):
            side = d / (_shard_name(i, n) + ".json")
            shards.append(json.loads(side.read_text()) if side.exists() else {"name": _shard_name(i, n)})
    else:
        raise (DataError if d.exists() else MissingPathError)(f"{d} is not a stillroom cache (no manifest.json or "
                                                              "plan.json); pass the --out folder of `stillroom cache`")
    missing, corrupt = [], []
    for s in shards:
        p = d / s["name"]
        if not p.exists() or "sha256" not in s:
            missing.append(s["name"])
            continue
        blob = p.read_bytes()
        if hashlib.sha256(blob).hexdigest() != s["sha256"]:
            corrupt.append(s["name"])
            problems.append(f"{s['name']}: sha256 mismatch ({len(blob)} bytes on disk, {s['bytes']} expected)")
            continue
        rows = pq.ParquetFile(p).metadata.num_rows
        if rows != s["rows"]:
            corrupt.append(s["name"])
            problems.append(f"{s['name']}: {rows} rows, manifest says {s['rows']}")
    problems += [f"{m}: missing" for m in missing]
    return VerifyReport(not problems, len(shards), missing, corrupt, problems)


# ------------------------------------------------------------------------------------------------------------
# Reader
# ------------------------------------------------------------------------------------------------------------
class CachedTeacher:
    """Teacher signals served from a finished cache, by example id.

    ``teacher`` (a model folder or an :class:`OnlineTeacher`), ``top_k`` and ``temperature``, when given, are
    checked against the manifest and a :class:`CacheMismatchError` names any difference.
    """

    def __init__(self, cache_dir: str | os.PathLike, *, teacher=None, top_k: int | None = None,
                 temperature: float | None = None, max_open_shards: int = 4):
        import pyarrow.parquet as pq

        self.dir = Path(cache_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.exists():
            hint = "it is unfinished: rerun the same cache command" if (self.dir / "plan.json").exists() \
                else "no cache there"
            raise MissingPathError(f"{mpath} not found ({hint})")
        self.manifest = m = json.loads(mpath.read_text())
        if m.get("format") != FORMAT:
            raise CacheMismatchError(f"{self.dir}: format {m.get('format')!r}, this stillroom reads {FORMAT!r}")
        self.top_k, self.temperature = int(m["top_k"]), float(m["temperature"])
        self.teacher_hash, self.tokenizer_hash = m["teacher_hash"], m["tokenizer_hash"]
        self.vocab_size = int(m["vocab_size"])
        want = {}
        if teacher is not None:
            if isinstance(teacher, OnlineTeacher):
                want.update(teacher_hash=teacher.teacher_hash, tokenizer_hash=teacher.tokenizer_hash)
            else:
                teacher = resolve_model(teacher, "teacher")
                want.update(teacher_hash=_dir_hash(Path(teacher)),
                            tokenizer_hash=tokenizer_hash(load_tokenizer(teacher, "teacher")))
        if top_k is not None:
            want["top_k"] = int(top_k)
        if temperature is not None:
            want["temperature"] = float(temperature)
        diffs = [f"{k}: cache has {m[k]!r}, config asks for {v!r}" for k, v in want.items() if m[k] != v]
        if diffs:
            raise CacheMismatchError(f"cache {self.dir} was built for another teacher setup ({'; '.join(diffs)}); "
                                     f"rebuild it with `stillroom cache` for this teacher")
        self.encoding = Encoding(self.vocab_size, self.top_k, int(m["id_bits"]), int(m["logprob_bits"]))
        self._index: dict[str, tuple[int, int, str]] = {}
        for si, s in enumerate(m["shards"]):
            p = self.dir / s["name"]
            if not p.exists():
                raise MissingPathError(f"cache shard {p} is missing; run `stillroom cache --verify {self.dir}`")
            try:
                t = pq.read_table(p, columns=["id", "text_sha"])
            except Exception as e:
                raise DataError(f"cache shard {p} is unreadable ({e}); run `stillroom cache --verify "
                                 f"{self.dir}` and rerun the cache command to rebuild it") from None
            for r, (eid, sha) in enumerate(zip(t.column("id").to_pylist(), t.column("text_sha").to_pylist(), strict=True)):
                self._index[eid] = (si, r, sha)
        self._open: OrderedDict[int, object] = OrderedDict()
        self._max_open = max_open_shards

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, example_id: str) -> bool:
        return str(example_id) in self._index

    def ids(self) -> list[str]:
        return list(self._index)

    def _shard(self, si: int):
        import pyarrow.parquet as pq

        if si in self._open:
            self._open.move_to_end(si)
            return self._open[si]
        table = pq.read_table(self.dir / self.manifest["shards"][si]["name"])
        self._open[si] = table
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return table

    def signal(self, texts: Sequence[str] | None, example_ids: Sequence[str] | None = None) -> list[TeacherOutput]:
        """The cached outputs for ``example_ids``; ``texts``, when given, must be the texts that were cached."""
        if example_ids is None:
            raise ValueError("CachedTeacher.signal needs example_ids (the cache is keyed by example id)")
        if texts is not None and len(texts) != len(example_ids):
            raise ValueError(f"{len(texts)} texts but {len(example_ids)} example ids")
        outs = []
        for j, eid in enumerate(example_ids):
            eid = str(eid)
            if eid not in self._index:
                raise CacheMismatchError(f"example id {eid!r} is not in cache {self.dir}; rebuild the cache over these texts")
            si, r, sha = self._index[eid]
            if texts is not None and text_sha(texts[j]) != sha:
                raise CacheMismatchError(f"example {eid!r}: its text differs from the text cached in {self.dir}")
            table = self._shard(si)
            row = {c: table.column(c)[r].as_py() for c in ("id", "n_tokens", "input_ids", "topk_ids",
                                                             "topk_codes", "tail", "gold_ce")}
            outs.append(self.encoding.decode(row))
        return outs


# ------------------------------------------------------------------------------------------------------------
# Student targets
# ------------------------------------------------------------------------------------------------------------
def student_targets(out: TeacherOutput, student_ids, student_table=None, teacher_table=None, vocab_map=None,
                    *, fallback: str = "onehot", fill: bool = True) -> tuple[SparseTarget, torch.Tensor]:
    """Teacher output -> (SparseTarget over the student's positions and vocabulary, teacher CE per position).

    Same tokenizer (``vocab_map`` is None, or both tables have one hash and the ids agree): the teacher's rows
    are the student's rows. Otherwise the texts are aligned at byte level (``stillroom.align.align``) and the
    top-k projected (``stillroom.align.project`` through ``vocab_map``; ``fallback`` and ``fill`` as there).
    The teacher CE of an aligned group (the teacher tokens covering the same bytes as some student tokens) is
    spread evenly over the student rows that predict that group's tokens, so a sequence's summed CE is the
    teacher's over the same bytes; rows with no covering group, and the last row, get ``nan``.
    """
    sid = torch.as_tensor(np.asarray(student_ids), dtype=torch.long).reshape(-1)
    same = vocab_map is None or (student_table is not None and teacher_table is not None
                                 and student_table.hash == teacher_table.hash
                                 and torch.equal(sid, out.input_ids))
    if same:
        if not torch.equal(sid, out.input_ids):
            raise ValueError("student ids differ from the teacher's tokenization of the same text; for a "
                             "teacher with another tokenizer pass student_table, teacher_table and vocab_map")
        ce = out.gold_ce.clone()
        if len(ce):
            ce[-1] = float("nan")
        return out.target(), ce
    from stillroom.align import align, project

    alignment = align(out.input_ids.numpy(), sid.numpy(), teacher_table, student_table)
    target = project(out.topk_ids, out.topk_logprobs, alignment, vocab_map, sid, fallback=fallback,
                     teacher_tail=out.tail, fill=fill)
    return target, _group_ce(out.gold_ce, np.asarray(alignment.groups), len(sid))


def _group_ce(gold_ce: torch.Tensor, groups: np.ndarray, n_student: int) -> torch.Tensor:
    """Spread each aligned group's teacher CE over the student rows predicting the group's tokens."""
    ce = torch.full((n_student,), float("nan"))
    g = gold_ce.double()
    for ts, te, ss, se in groups.tolist():
        rows = range(max(ss - 1, 0), se - 1)  # row j predicts student token j+1
        terms = g[max(ts - 1, 0):te - 1]  # teacher row i predicts teacher token i+1
        if len(rows) == 0 or len(terms) == 0:
            continue
        total = float(terms.sum())
        if math.isfinite(total):
            ce[list(rows)] = total / len(rows)
    return ce.float()


__all__ = ["CacheMismatchError", "CacheSummary", "CachedTeacher", "OnlineTeacher", "TeacherOutput",
           "TeacherSignal", "VerifyReport", "student_targets", "teacher_hash", "tokenizer_hash", "verify_cache",
           "write_cache"]
