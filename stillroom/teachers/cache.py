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

**Encoding**: see :mod:`stillroom.teachers.codec` (bit-packed ids, gap-coded log-probs, logit-coded tail,
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

import numpy as np

from stillroom.errors import ConfigError, DataError, MissingPathError
from stillroom.files import atomic_write, check_output_dir
from stillroom.inputs.text import TextSource, scan_texts, text_sha
from stillroom.models.loading import load_tokenizer, resolve_model
from stillroom.progress import bar as progress_bar
from stillroom.targets import TeacherOutput
from stillroom.teachers.codec import Encoding, logprob_step, topk_kl
from stillroom.teachers.online import OnlineTeacher, dir_hash, tokenizer_hash

FORMAT = "stillroom-cache/1"


class CacheMismatchError(ConfigError):
    """The cache on disk was built with another teacher, tokenizer, k, temperature or data."""


# ------------------------------------------------------------------------------------------------------------
# The signal
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Hashes
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Online teacher
# ------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------------------
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
        atomic_write(plan_path, json.dumps(plan, indent=1).encode())
    _check_plan(json.loads(plan_path.read_text()), plan, out)

    mine = [i for i in range(n_shards) if i % world_size == rank]
    todo = [i for i in mine if not _shard_done(out, _shard_name(i, n_shards))]
    for i in mine:  # leftovers of a killed run
        for tmp in out.glob(f".{_shard_name(i, n_shards)}*.tmp*"):
            tmp.unlink(missing_ok=True)
    todo_chars, it, at = sum(shard_chars[i] for i in todo), iter(rows), 0  # `at`: next shard `it` reaches
    schema = pa.schema([("id", pa.string()), ("text_sha", pa.string()), ("n_tokens", pa.int32()),
                        ("input_ids", pa.binary()), ("topk_ids", pa.binary()), ("topk_codes", pa.binary()),
                        ("tail", pa.binary()), ("gold_ce", pa.binary())])
    t0, n_rows, n_tok = time.perf_counter(), 0, 0
    bar = progress_bar("{task.fields[tps]}", console=console, enabled=progress and rank == 0, counts="percent",
                       eta=True)
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
            atomic_write(out / name, blob)
            kl = np.concatenate(kls) if kls else np.zeros(0)
            meta = pq.ParquetFile(pa.BufferReader(blob)).metadata
            entry_bytes = sum(meta.row_group(g).column(c).total_compressed_size  # ids + codes, as stored
                              for g in range(meta.num_row_groups) for c in range(meta.num_columns)
                              if meta.row_group(g).column(c).path_in_schema in ("topk_ids", "topk_codes"))
            side = {"name": name, "rows": len(recs), "tokens": tokens, "bytes": len(blob), "entry_bytes": entry_bytes,
                    "sha256": hashlib.sha256(blob).hexdigest(), "kl_sum": float(kl.sum()),
                    "kl_max": float(kl.max()) if kl.size else 0.0, "max_abs_logprob_err": max_err}
            atomic_write(out / (name + ".json"), json.dumps(side, indent=1).encode())
            n_rows += len(recs)
    manifest = _maybe_merge(out, plan)
    return CacheSummary(out, len(todo), len(mine) - len(todo), n_rows, n_tok, time.perf_counter() - t0,
                        manifest is not None, manifest)


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
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1).encode())
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
                want.update(teacher_hash=dir_hash(Path(teacher)),
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


__all__ = ["CacheMismatchError", "CacheSummary", "CachedTeacher", "VerifyReport", "verify_cache", "write_cache"]
