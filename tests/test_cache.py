"""Teacher signals and the offline cache: encoding, online/offline agreement, resume after SIGKILL, verify,
bad input. References are naive re-computations (plain forward + log_softmax, bit strings), never the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stillroom.inputs.text import load_texts
from stillroom.targets import TeacherOutput
from stillroom.teachers.cache import CachedTeacher, CacheMismatchError, verify_cache, write_cache
from stillroom.teachers.codec import (
    decode_logprobs,
    decode_tail,
    encode_logprobs,
    encode_tail,
    pack_bits,
    topk_kl,
    unpack_bits,
)
from stillroom.teachers.online import OnlineTeacher, topk_logsumexp
from stillroom.testing import corpus_texts
from stillroom.tokenization.project import student_targets

ROOT = Path(__file__).resolve().parent.parent


def _rows(n: int = 12, seed: int = 0) -> list[tuple[str, str]]:
    text = corpus_texts("validation")[0]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = int(rng.integers(0, len(text) - 2000))
        out.append((f"doc-{i}", text[a:a + int(rng.integers(40, 700))].strip() or "x"))
    return out


@pytest.fixture(scope="module")
def teacher(tiny_models):
    return OnlineTeacher(tiny_models["gpt2-bpe-teacher"], top_k=8, max_length=96, overlap=16, batch_tokens=1024)


@pytest.fixture(scope="module")
def built(teacher, tmp_path_factory):
    rows = _rows()
    out = tmp_path_factory.mktemp("cache") / "c"
    summary = write_cache(teacher, rows, out, shard_size=5, progress=False)
    return rows, out, summary


# --- encoding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 6, 7, 8, 10, 11, 16, 17, 18])
def test_pack_bits_matches_bit_strings(bits):
    rng = np.random.default_rng(bits)
    vals = rng.integers(0, 1 << bits, size=1003)
    # reference: concatenate little-endian bit strings, then cut bytes (LSB first)
    bitstr = "".join(format(int(v), f"0{bits}b")[::-1] for v in vals)
    bitstr += "0" * (-len(bitstr) % 8)
    ref = bytes(int(bitstr[i:i + 8][::-1], 2) for i in range(0, len(bitstr), 8))
    assert pack_bits(vals, bits) == ref
    assert np.array_equal(unpack_bits(ref, bits, len(vals)), vals)


def test_pack_bits_rejects_overflow():
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([1024]), 10)


@pytest.mark.parametrize("bits", [6, 7, 8])
def test_quantised_logprobs_kl_small(bits):
    torch.manual_seed(bits)
    logits = torch.randn(500, 32000) * 3.0  # peaky-ish rows, a real vocabulary size
    full = torch.log_softmax(logits, -1)
    lp, _ = torch.topk(full, 16, dim=-1)
    tail = (1 - lp.exp().sum(-1)).clamp_min(0)
    codes = encode_logprobs(lp.numpy(), bits)
    assert codes.max() < (1 << bits)
    dec_tail = decode_tail(encode_tail(tail.numpy()))
    dec = torch.from_numpy(decode_logprobs(codes, dec_tail, bits))
    # independent KL over the k+1 bins with torch
    p = torch.cat([lp.exp(), tail[:, None]], -1).double()
    q = torch.cat([dec.exp(), torch.from_numpy(dec_tail)[:, None]], -1).double()
    ref = (p * (p.log() - (q / q.sum(-1, keepdim=True)).log())).sum(-1)
    ours = topk_kl(lp.numpy(), tail.numpy(), dec.numpy(), dec_tail)
    assert np.allclose(ours, ref.numpy(), rtol=1e-3, atol=1e-7)
    assert ref.mean() < 1e-3
    step = 16 / (1 << bits)
    assert (dec - lp).abs().max() < step  # half a step of rounding + the renormalisation shift
    assert torch.allclose(torch.from_numpy(dec_tail), tail, rtol=2e-3, atol=1e-7)


# --- blockwise top-k + log-sum-exp against torch.topk / torch.logsumexp ---------------------------------------
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_topk_logsumexp_matches_library_kernels(tau):
    g = torch.Generator().manual_seed(0)
    v, k = 50_257, 16  # not a multiple of the block: the last, partial block must be searched too
    z = torch.randn(37, v, generator=g) * 4  # 37 rows: the last row chunk is partial
    z[0, 1000:1016] = 50.0 + torch.arange(16.0)  # the whole top k in one block
    z[1, -3:] = 60.0  # the top 3 in the partial block
    z[2, ::4096] = 70.0  # spread over many blocks, with ties at the top
    vals, ids, lse1, lse_tau = topk_logsumexp(z, k, tau)
    ref_vals, ref_ids = torch.topk(z, k, dim=-1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(z.gather(1, ids), ref_vals)  # ids point at the right values (tie order may differ)
    assert all(len(set(r.tolist())) == k for r in ids)
    assert torch.equal(ids[3:], ref_ids[3:]) and set(ids[0].tolist()) == set(range(1000, 1016))
    assert set(ids[1, :3].tolist()) == {v - 3, v - 2, v - 1}
    assert torch.allclose(lse1, torch.logsumexp(z, -1), atol=1e-5)
    assert torch.allclose(lse_tau, torch.logsumexp(z / tau, -1), atol=1e-5)


# --- online teacher against a naive forward ------------------------------------------------------------------
def _naive(model_dir, ids: list[int], k: int, lo: int = 0, hi: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[lo:hi]])).logits[0]
    full = torch.log_softmax(logits, -1)
    lp, top = torch.topk(full, k, -1)
    gold = torch.tensor(ids[lo + 1:(hi or len(ids)) + 1])
    ce = F.cross_entropy(logits[:len(gold)], gold, reduction="none")
    return top, lp, 1 - lp.exp().sum(-1), ce


def test_online_matches_naive_forward_and_chunks_long_text(teacher, tiny_models):
    d = tiny_models["gpt2-bpe-teacher"]
    short, long_ = "To be, or not to be.", corpus_texts("validation")[0][:1500]
    outs = teacher.signal([short, long_], ["a", "b"])
    ids = teacher.tokenizer(short)["input_ids"]
    top, lp, tail, ce = _naive(d, ids, 8)
    assert torch.equal(outs[0].topk_ids, top)
    assert torch.allclose(outs[0].topk_logprobs, lp, atol=1e-4)
    assert torch.allclose(outs[0].tail, tail, atol=1e-5)
    assert torch.allclose(outs[0].gold_ce[:-1], ce, atol=1e-4) and torch.isnan(outs[0].gold_ce[-1])
    # long text: > max_length=96 tokens -> windows [0,96), then [80,176) keeping 96..175, ... (overlap 16)
    ids = teacher.tokenizer(long_)["input_ids"]
    assert len(ids) > 200 and len(outs[1]) == len(ids)
    top, lp, _, ce = _naive(d, ids, 8, 0, 96)
    assert torch.equal(outs[1].topk_ids[:96], top) and torch.allclose(outs[1].topk_logprobs[:96], lp, atol=1e-4)
    top, lp, _, ce = _naive(d, ids, 8, 80, 176)
    assert torch.equal(outs[1].topk_ids[96:176], top[16:])
    assert torch.allclose(outs[1].topk_logprobs[96:176], lp[16:], atol=1e-4)
    assert torch.allclose(outs[1].gold_ce[96:176], ce[16:], atol=1e-4)
    assert torch.isfinite(outs[1].gold_ce[:-1]).all()



def test_starts_skip_the_head_before_each_region(teacher, tiny_models):
    """``run_ids(starts=)`` (a completion region per example): positions from the start equal the naive forward
    of the whole window, earlier ones are empty, and the head sees only the columns some row needs."""
    d = tiny_models["gpt2-bpe-teacher"]
    texts = ["To be, or not to be: that is the question.", corpus_texts("validation")[0][:700]]
    ids = [teacher.tokenizer(t)["input_ids"] for t in texts]
    starts = [5, 130]  # the long text's start lies in its second window ([80, 176), kept from 96)
    widths = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: widths.append(args[0].shape[1]))
    try:
        outs = teacher.run_ids(ids, ["a", "b"], starts=starts)
    finally:
        hook.remove()
    top, lp, _, ce = _naive(d, ids[0], 8)
    assert torch.equal(outs[0].topk_ids[5:], top[5:]) and torch.allclose(outs[0].topk_logprobs[5:], lp[5:], atol=1e-4)
    assert torch.allclose(outs[0].gold_ce[5:-1], ce[5:], atol=1e-4)
    assert (outs[0].topk_ids[:5] == 0).all() and torch.isnan(outs[0].gold_ce[:5]).all()
    top, lp, _, ce = _naive(d, ids[1], 8, 80, 176)
    assert torch.equal(outs[1].topk_ids[130:176], top[50:])
    assert torch.allclose(outs[1].gold_ce[130:176], ce[50:], atol=1e-4)
    assert torch.isinf(outs[1].topk_logprobs[:130]).all()
    # one forward of width 96 (the long text's windows from [80, 176) on; [0, 96) is never run, nothing of it is
    # wanted) and the short text: the earliest column any row wants is the short text's 5, so the head gets 91
    assert len(ids[1]) > 176 and widths == [96 - 5]


# --- online vs offline ----------------------------------------------------------------------------------------
def test_offline_agrees_with_online_and_reads_are_identical(teacher, built):
    rows, out, summary = built
    assert summary.complete and summary.rows == len(rows)
    tot = summary.manifest["totals"]
    assert tot["kl_mean"] < 1e-3 and tot["rows"] == len(rows)
    assert tot["entry_bytes_per_entry"] <= 3.0  # ids + log-prob codes as stored; the rest is per-token fields and file overhead
    cached = CachedTeacher(out, teacher=teacher, top_k=8)
    texts, ids = [t for _, t in rows], [i for i, _ in rows]
    online = teacher.signal(texts, ids)
    offline = cached.signal(texts, ids)
    step = 16 / (1 << summary.manifest["logprob_bits"])
    for a, b in zip(online, offline, strict=True):
        assert a.example_id == b.example_id
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.topk_ids, b.topk_ids)
        assert (a.topk_logprobs - b.topk_logprobs).abs().max() <= step
        assert torch.allclose(a.tail, b.tail, rtol=2e-3, atol=1e-6)
        assert torch.allclose(a.gold_ce, b.gold_ce, rtol=1e-3, atol=1e-3, equal_nan=True)
    # two epochs, shuffled order, a fresh reader: identical
    again = CachedTeacher(out).signal(None, ids[::-1])[::-1]
    for a, b in zip(offline, again, strict=True):
        for f in ("input_ids", "topk_ids", "topk_logprobs", "tail", "gold_ce"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(cached.signal(None, [ids[3]])[0].topk_logprobs, offline[3].topk_logprobs)


def test_student_targets_same_tokenizer(teacher, built):
    rows, out, _ = built
    o = CachedTeacher(out).signal(None, [rows[0][0]])[0]
    target, ce = student_targets(o, o.input_ids.numpy())
    assert torch.equal(target.ids, o.topk_ids) and not target.valid[-1] and target.valid[:-1].all()
    assert torch.equal(ce[:-1], o.gold_ce[:-1]) and torch.isnan(ce[-1])
    with pytest.raises(ValueError, match="differ"):
        student_targets(o, o.input_ids[1:])


def test_sharded_ranks_merge_to_the_same_cache(teacher, built, tmp_path):
    rows, out, _ = built
    s0 = write_cache(teacher, rows, tmp_path / "r", shard_size=5, rank=0, world_size=2, progress=False)
    assert not s0.complete and not (tmp_path / "r" / "manifest.json").exists()
    s1 = write_cache(teacher, rows, tmp_path / "r", shard_size=5, rank=1, world_size=2, progress=False)
    assert s1.complete and s0.shards_written == 2 and s1.shards_written == 1
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert a["shards"] == b["shards"]  # same names, rows and sha256


# --- resume after SIGKILL -------------------------------------------------------------------------------------
def _cli(model, data, out, *extra):
    return [sys.executable, "-m", "stillroom", "cache", "--teacher", str(model), "--data", str(data), "--out",
            str(out), "--top-k", "8", "--max-length", "96", "--shard-size", "2", "--batch-tokens", "256",
            "--no-progress", *extra]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _run_and_kill(cmd, out: Path, when) -> None:
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if when(out):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_models, tmp_path):
    model = tiny_models["gpt2-bpe-teacher"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in _rows(16, seed=1)))
    ref = tmp_path / "ref"
    ref_run = subprocess.Popen(_cli(model, data, ref), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # the uninterrupted run, alongside the first kill
    out = tmp_path / "resumed"
    _run_and_kill(_cli(model, data, out), out, lambda d: (d / "plan.json").exists())  # before any shard
    _, err = ref_run.communicate()
    assert ref_run.returncode == 0, err
    # mid-run: after at least two shards, or while a shard is being written
    _run_and_kill(_cli(model, data, out), out,
                  lambda d: any(d.glob(".shard-*.tmp.*")) or len(list(d.glob("*.parquet.json"))) >= 2)
    # the states a kill between two writes leaves: a stale temp file, a shard without its sidecar
    done = sorted(out.glob("shard-*.parquet.json"))
    assert len(done) < 8, "the kills came too late to test resumption"
    (out / ".shard-00007-of-00008.parquet.tmp.123").write_bytes(b"half a shard")
    shutil.copy(ref / "shard-00007-of-00008.parquet", out / "shard-00007-of-00008.parquet")
    (out / "shard-00007-of-00008.parquet").write_bytes(b"garbage: renamed but no sidecar yet")
    r = subprocess.run(_cli(model, data, out), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout
    a = json.loads((ref / "manifest.json").read_text())
    b = json.loads((out / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["totals"]["rows"] == 16
    assert not list(out.glob(".*tmp*"))
    import pyarrow.parquet as pq

    for s in a["shards"]:
        assert pq.read_table(ref / s["name"]).equals(pq.read_table(out / s["name"]))


# --- verify ---------------------------------------------------------------------------------------------------
def test_verify_names_truncated_flipped_and_missing_shards(teacher, built, tmp_path):
    rows, out, _ = built
    c = tmp_path / "c"
    shutil.copytree(out, c)
    assert verify_cache(c).ok
    names = [s["name"] for s in json.loads((c / "manifest.json").read_text())["shards"]]
    blob = (c / names[0]).read_bytes()
    (c / names[0]).write_bytes(blob[: len(blob) // 2])  # truncated
    flipped = bytearray((c / names[1]).read_bytes())
    flipped[len(flipped) // 3] ^= 0x01  # one flipped bit
    (c / names[1]).write_bytes(bytes(flipped))
    (c / names[2]).unlink()
    rep = verify_cache(c)
    assert not rep.ok and rep.corrupt == names[:2] and rep.missing == [names[2]]
    r = subprocess.run([sys.executable, "-m", "stillroom", "cache", "--verify", str(c)], env=_env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and all(n in r.stdout for n in names[:3])
    assert r.stderr.count("\n") == 1 and "2 corrupt" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises((FileNotFoundError, ValueError), match="verify"):
        CachedTeacher(c)
    # rerunning the command rebuilds exactly the damaged shards
    s = write_cache(teacher, rows, c, shard_size=5, progress=False)
    assert s.shards_written == 3 and verify_cache(c).ok
    assert json.loads((c / "manifest.json").read_text())["shards"] == \
        json.loads((out / "manifest.json").read_text())["shards"]


# --- bad input --------------------------------------------------------------------------------------------------
def test_cache_built_for_another_teacher_or_k_is_refused(teacher, built, tiny_models):
    rows, out, _ = built
    with pytest.raises(CacheMismatchError, match="teacher_hash"):
        CachedTeacher(out, teacher=tiny_models["llama-spm"])
    with pytest.raises(CacheMismatchError, match="top_k"):
        CachedTeacher(out, top_k=16)
    with pytest.raises(CacheMismatchError, match="top_k"):  # resuming into it with another k
        other = OnlineTeacher(tiny_models["gpt2-bpe-teacher"], top_k=4, max_length=96, overlap=16)
        write_cache(other, rows, out, shard_size=5, progress=False)
    with pytest.raises(CacheMismatchError, match="data_fingerprint"):
        write_cache(teacher, rows[:-1], out, shard_size=5, progress=False)
    with pytest.raises(CacheMismatchError, match="text differs"):
        CachedTeacher(out).signal(["another text"], [rows[0][0]])
    with pytest.raises(CacheMismatchError, match="nope"):
        CachedTeacher(out).signal(None, ["nope"])


def test_bad_data_gives_clear_errors(teacher, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: record has no 'text' field"):
        load_texts(p)
    p.write_text('{"text": "fine"}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: text is empty"):
        load_texts(p)
    p.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    with pytest.raises(ValueError, match="occurs twice"):
        load_texts(p)
    with pytest.raises(ValueError, match="empty"):
        teacher.signal(["ok", ""])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "absent.txt")


def test_load_texts_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("first line\n\n  \nsecond line\n")
    assert load_texts(tmp_path / "lines.txt", documents="line") == [("lines:1", "first line"),
                                                                    ("lines:4", "second line")]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n")
    (folder / "sub" / "a.txt").write_text("ay")
    assert load_texts(folder) == [("b.txt", "bee\n"), ("sub/a.txt", "ay")]
    (tmp_path / "j.jsonl").write_text('{"id": "x", "body": "one"}\n{"body": "two"}\n')
    assert load_texts(tmp_path / "j.jsonl", text_field="body") == [("x", "one"), ("j:2", "two")]
    import datasets

    datasets.Dataset.from_dict({"text": ["p", "q"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(tmp_path / "ds") == [("0", "p"), ("1", "q")]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": ["u"], "text": ["r"]})}).save_to_disk(
        str(tmp_path / "dd"))
    assert load_texts(tmp_path / "dd") == [("u", "r")]
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [s]}) for s in ("train", "test")}).save_to_disk(
        str(tmp_path / "dd2"))
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; pass one split's folder"):
        load_texts(tmp_path / "dd2")  # never a split picked silently
    assert load_texts(tmp_path / "dd2" / "test") == [("0", "test")]
    (tmp_path / "a.json").write_text('[{"text": "one"},\n {"id": "b", "text": "two"}]')  # a JSON array
    assert load_texts(tmp_path / "a.json") == [("a:1", "one"), ("b", "two")]
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: line 2 is not UTF-8 \(byte 0xe9\); DATA must be UTF-8"):
        load_texts(tmp_path / "latin1.txt")
    (tmp_path / "crlf.txt").write_bytes(b"a\r\n\r\nb\rc\n")  # universal newlines, as open() reads text
    assert load_texts(tmp_path / "crlf.txt", documents="line") == [("crlf:1", "a"), ("crlf:3", "b"), ("crlf:4", "c")]
    assert load_texts(tmp_path / "crlf.txt") == [("crlf", "a\n\nb\nc\n")]  # default: a .txt is one document


def test_teacher_output_target_shapes():
    o = TeacherOutput("e", torch.tensor([1, 2, 3]), torch.zeros(3, 2, dtype=torch.long),
                      torch.full((3, 2), -1.0), torch.zeros(3), torch.tensor([1.0, 2.0, float("nan")]))
    t = o.target()
    assert t.k == 2 and t.valid.tolist() == [True, True, False]


# --- cross-tokenizer student targets ---------------------------------------------------------------------------
def _dense(t, v: int) -> torch.Tensor:
    p = torch.zeros(t.ids.shape[0], v + 1, dtype=torch.float64)
    p.scatter_add_(1, t.ids, t.logprobs.double().exp())
    p[:, v] = t.tail.double()
    return p


def test_student_targets_cross_tokenizer_online_equals_offline(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    pytest.importorskip("stillroom.tokenization.align")
    pytest.importorskip("stillroom.tokenization.vocab")
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    t = OnlineTeacher(tiny_models["llama-spm"], top_k=8, max_length=128)
    stok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    rows = _rows(4, seed=3)
    write_cache(t, rows, tmp_path / "c", shard_size=2, progress=False)
    tt, st = TokenTable.from_tokenizer(t.tokenizer), TokenTable.from_tokenizer(stok)
    vm = VocabMap.build(tt, st, progress=False)
    ids = [e for e, _ in rows]
    online = t.signal([x for _, x in rows], ids)
    offline = CachedTeacher(tmp_path / "c", teacher=t).signal([x for _, x in rows], ids)
    for (_, text), a, b in zip(rows, online, offline, strict=True):
        sid = stok(text)["input_ids"]
        ta, ca = student_targets(a, sid, st, tt, vm)
        tb, cb = student_targets(b, sid, st, tt, vm)
        assert ta.ids.shape[0] == len(sid) and torch.equal(ta.valid, tb.valid) and ta.valid.any()
        pa_, pb_ = _dense(ta, len(stok)), _dense(tb, len(stok))
        assert (pa_ - pb_)[ta.valid].abs().max() < 0.02  # quantisation error in probability
        assert torch.allclose(ca, cb, atol=5e-3, equal_nan=True)
        # the spread CE sums to the teacher's total over the aligned text (gold CE at rows 0..T-2)
        assert abs(float(ca.nansum()) - float(a.gold_ce[:-1].sum())) < 0.05 * float(a.gold_ce[:-1].sum())


def test_streamed_data_path_builds_the_same_cache(teacher, built, tmp_path):
    """A DATA path is streamed (fingerprint pass, then shard by shard, ranks skipping others' rows): the cache
    equals the one built from the rows in memory."""
    rows, out, _ = built
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows), encoding="utf-8")
    assert load_texts(data) == rows
    s1 = write_cache(teacher, data, tmp_path / "s", shard_size=5, rank=1, world_size=2, progress=False)
    s0 = write_cache(teacher, data, tmp_path / "s", shard_size=5, rank=0, world_size=2, progress=False)
    assert (s1.shards_written, s0.shards_written, s0.complete) == (1, 2, True)
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert a["shards"] == b["shards"] and a["data_fingerprint"] == b["data_fingerprint"]
    again = write_cache(teacher, data, tmp_path / "s", shard_size=5, progress=False)  # resumed: nothing to do
    assert (again.shards_written, again.shards_skipped) == (0, 3)
