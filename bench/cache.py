"""Teacher cache: bytes/token and fidelity vs FuseLLM-style and plain Parquet storage; writer overhead.

    flock /tmp/stillroom-heavy.lock python -m bench.cache [--teacher MODEL_DIR] [--chars 60000] [--repeats 3]

Storage (k in {8, 16, 32}), on the same exact top-k teacher outputs:
- stillroom: the cache ``write_cache`` writes (bit-packed ids, quantised log-probs, tail, gold CE; Parquet);
- FuseLLM-style: per example, top-k fp16 values + int64 ids as Arrow list columns in an Arrow IPC file (as
  ``datasets.save_to_disk`` stores them). We store fp16 *log-probs* (FuseLLM keeps raw logits), so its tail
  is recoverable and its KL is measured like ours;
- plain Parquet: fp32 log-probs + int32 ids + fp32 tail (pyarrow defaults, snappy).
Fidelity: mean over tokens of KL(exact ‖ decoded) over the k + 1 bins (top-k and the tail), nats/token.

Throughput: ``write_cache`` end to end (tokenise, forward, top-k, encode, measure, write, fsync) vs a plain
HF forward loop over the same windows and batches that only computes the logits; median tokens/s.

Default teacher: a GPT-2 (``--layers`` 2, ``--width`` 1024) over the real Llama-3 tokenizer (128,256 ids, 17-bit ids,
7-bit log-prob codes) with random weights whose output layer is scaled so the mean next-token entropy is
2.5 nats, about what trained LMs show on prose (random init alone gives near-uniform, unrealistically easy
to quantise distributions). ``--teacher`` benches a real model folder instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import machine, print_table, summary
from stillroom.targets import TeacherOutput
from stillroom.teachers.cache import write_cache
from stillroom.teachers.codec import topk_kl
from stillroom.teachers.online import OnlineTeacher, _windows
from stillroom.testing import shared_dir, tiny_gpt2


def synthetic_teacher(folder: Path, width: int, layers: int, entropy: float = 2.5) -> Path:
    from transformers import AutoTokenizer

    shared = shared_dir()
    if shared is None:
        raise SystemExit("needs ../shared/tokenizers/llama3 (or pass --teacher)")
    tok = AutoTokenizer.from_pretrained(shared / "tokenizers" / "llama3")
    model = tiny_gpt2(len(tok), n_layer=layers, n_embd=width, n_head=width // 64, n_positions=1024, seed=0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        ids = torch.tensor([tok("To be, or not to be, that is the question: whether 'tis nobler")["input_ids"]])
        z = model(ids).logits[0].float()
        lo, hi = 0.1, 1000.0
        for _ in range(40):  # bisection on the scale s: mean entropy of softmax(s z) = entropy
            s = (lo * hi) ** 0.5
            p = torch.softmax(s * z, -1)
            h = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
            lo, hi = (s, hi) if h > entropy else (lo, s)
        model.lm_head.weight.mul_(s)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


class Replay:
    """Serves precomputed outputs (a top-k prefix of a larger k) through the OnlineTeacher interface."""

    def __init__(self, base: OnlineTeacher, outs: dict[str, TeacherOutput], k: int):
        for a in ("source", "teacher_hash", "tokenizer_hash", "vocab_size", "temperature", "max_length",
                  "overlap"):
            setattr(self, a, getattr(base, a))
        self.top_k, self.outs = k, {e: cut(o, k) for e, o in outs.items()}

    def signal(self, texts, example_ids):
        return [self.outs[e] for e in example_ids]


def cut(o: TeacherOutput, k: int) -> TeacherOutput:
    lp = o.topk_logprobs[:, :k]
    tail = (1.0 - lp.double().exp().sum(-1)).clamp_min(0).float()
    return TeacherOutput(o.example_id, o.input_ids, o.topk_ids[:, :k], lp, tail, o.gold_ce)


def peers(outs: list[TeacherOutput], k: int, folder: Path) -> dict[str, tuple[int, float]]:
    """name -> (bytes on disk, mean KL nats/token)."""
    tokens = sum(len(o) for o in outs)
    fuse = pa.table({"id": [o.example_id for o in outs],
                     "topk_ids": pa.array([o.topk_ids.reshape(-1).numpy() for o in outs], pa.list_(pa.int64())),
                     "topk_values": pa.array([o.topk_logprobs.reshape(-1).numpy().astype(np.float16) for o in outs],
                                             pa.list_(pa.float16()))})
    with pa.OSFile(str(folder / "fusellm.arrow"), "wb") as sink, pa.ipc.new_file(sink, fuse.schema) as w:
        w.write_table(fuse)
    kl = 0.0
    for o in outs:
        lp = o.topk_logprobs.numpy()
        dec = lp.astype(np.float16).astype(np.float32)
        dec_tail = np.clip(1.0 - np.exp(dec.astype(np.float64)).sum(-1), 0, 1)
        kl += float(topk_kl(lp, o.tail.numpy(), dec, dec_tail).sum())
    plain = pa.table({"id": [o.example_id for o in outs],
                      "topk_ids": pa.array([o.topk_ids.reshape(-1).numpy().astype(np.int32) for o in outs],
                                           pa.list_(pa.int32())),
                      "topk_logprobs": pa.array([o.topk_logprobs.reshape(-1).numpy() for o in outs],
                                                pa.list_(pa.float32())),
                      "tail": pa.array([o.tail.numpy() for o in outs], pa.list_(pa.float32()))})
    pq.write_table(plain, folder / "plain.parquet")
    return {"FuseLLM-style (fp16 + int64, Arrow)": ((folder / "fusellm.arrow").stat().st_size, kl / tokens),
            "plain Parquet (fp32 + int32)": ((folder / "plain.parquet").stat().st_size, 0.0)}


def plain_loop(teacher: OnlineTeacher, rows) -> int:
    """Plain HF forward loop over the same windows and batches as OnlineTeacher; returns tokens."""
    ids = teacher.tokenizer([t for _, t in rows], add_special_tokens=True)["input_ids"]
    wins = [(i, a, e) for i, x in enumerate(ids) for (a, e, _) in _windows(len(x), teacher.max_length,
                                                                              teacher.overlap)]
    wins.sort(key=lambda w: -(w[2] - w[1]))
    j = 0
    with torch.no_grad():
        while j < len(wins):
            width = wins[j][2] - wins[j][1]
            batch, j = wins[j:j + max(1, teacher.batch_tokens // width)], j + max(1, teacher.batch_tokens // width)
            x = torch.zeros((len(batch), width), dtype=torch.long)
            m = torch.zeros_like(x)
            for r, (i, a, e) in enumerate(batch):
                x[r, :e - a] = torch.tensor(ids[i][a:e])
                m[r, :e - a] = 1
            teacher.model(input_ids=x, attention_mask=m).logits.float()
    return sum(len(x) for x in ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, default=None)
    ap.add_argument("--chars", type=int, default=60_000, help="characters of validation/test text to score")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024, help="synthetic teacher hidden size")
    ap.add_argument("--layers", type=int, default=2, help="synthetic teacher layers")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        model_dir = args.teacher or synthetic_teacher(tmp / "teacher", args.width, args.layers)
        from stillroom.testing import corpus_texts

        text = "\n".join(corpus_texts("validation") + corpus_texts("test"))[: args.chars]
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        rows, buf = [], ""
        for p in paras:  # examples of ~1,500 characters, on paragraph boundaries
            buf = f"{buf}\n\n{p}" if buf else p
            if len(buf) >= 1500:
                rows.append((f"ex{len(rows)}", buf))
                buf = ""
        if buf:
            rows.append((f"ex{len(rows)}", buf))
        base = OnlineTeacher(model_dir, top_k=32, device="cpu")
        exact = base.signal([t for _, t in rows], [e for e, _ in rows])
        tokens = sum(len(o) for o in exact)
        print(f"teacher {base.source} (V={base.vocab_size}, width {base.model.config.hidden_size}, "
              f"{base.model.config.num_hidden_layers} layers), {len(rows)} examples, {tokens:,} tokens; {machine()}")
        by_id = {o.example_id: o for o in exact}
        table, ours16 = [], None
        for k in (8, 16, 32):
            out = tmp / f"cache-k{k}"
            s = write_cache(Replay(base, by_id, k), rows, out, shard_size=64, progress=False)
            tot = s.manifest["totals"]
            table.append((k, "stillroom", f"{tot['bytes_per_token']:.1f}", f"{tot['bytes_per_entry']:.2f}",
                          f"{tot['entry_bytes_per_entry']:.2f}", f"{tot['kl_mean']:.2e}"))
            if k == 16:
                ours16 = tot
            folder = tmp / f"peers-k{k}"
            folder.mkdir()
            for name, (nbytes, kl) in peers([cut(o, k) for o in exact], k, folder).items():
                table.append((k, name, f"{nbytes / tokens:.1f}", f"{nbytes / tokens / k:.2f}", "", f"{kl:.2e}"))
        print_table("storage: bytes and fidelity (KL(exact top-k+tail ‖ decoded), nats/token)",
                    ["k", "format", "B/token", "B/entry (all)", "B/entry (ids+codes)", "KL"], table)

        teacher = OnlineTeacher(model_dir, top_k=16, device="cpu")
        writer_tps, plain_tps = [], []
        plain_loop(teacher, rows[:4])  # warm-up
        for r in range(args.repeats):
            t = time.perf_counter()
            n = plain_loop(teacher, rows)
            plain_tps.append(n / (time.perf_counter() - t))
            out = tmp / f"run{r}"
            t = time.perf_counter()
            s = write_cache(teacher, rows, out, shard_size=64, progress=False)
            writer_tps.append(s.tokens / (time.perf_counter() - t))
            shutil.rmtree(out)
        w, p = statistics.median(writer_tps), statistics.median(plain_tps)
        print_table(f"teacher pass throughput (k=16, median of {args.repeats})",
                    ["pipeline", "tokens/s"], [("plain HF forward loop", f"{p:,.0f}"),
                                               ("stillroom write_cache", f"{w:,.0f}")])
        fuse16 = next(float(r[2]) for r in table if r[0] == 16 and r[1].startswith("FuseLLM"))
        summary(json.dumps({
            "k16_bytes_per_token": round(ours16["bytes_per_token"], 1),
            "k16_entry_bytes_per_entry": round(ours16["entry_bytes_per_entry"], 2),
            "k16_kl": float(f"{ours16['kl_mean']:.2e}"), "fusellm_k16_bytes_per_token": fuse16,
            "writer_tokens_per_s": round(w), "plain_tokens_per_s": round(p),
            "writer_overhead_pct": round(100 * (p / w - 1), 1)}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
