"""Real-model speed (issue 14, part 4): teacher caching, cached fused training and online KD on real teachers.

    flock /tmp/stillroom-heavy.lock python -m bench.real_speed [--repeats 3] [--steps 10] [--blocks 64]

Teachers: SmolLM2-135M-Instruct (Llama, 30 layers, 49,152 ids) and Gemma-3-270M (18 layers, 262,144 ids), the
converted fp32 folders of ``stillroom models get``. Student: SmolLM2 cut to layers [0, 6, 12, 18, 24, 29]
(``stillroom.models.cut``), SmolLM2's tokenizer. Data: ``--blocks`` blocks of ``--seq`` (256) student tokens of the shipped Shakespeare
corpus; the cache configurations read their texts, training cycles through them (``--steps`` batches of 4).
Each configuration runs in a fresh process (its peak RSS is its own); configurations run round-robin
``--repeats`` times and the table shows medians. Pairs (configuration, its peer):

- ``cache_smollm2`` / ``cache_gemma3``: ``write_cache`` at k = 16 end to end (tokenise, forward, top-k,
  log-sum-exp, encode, measure the error, Parquet, fsync) vs ``fwd_smollm2`` / ``fwd_gemma3``, the bare teacher
  forward ``model(input_ids, attention_mask)`` over the same windows and batch sizes (``bench.cache.plain_loop``);
  bytes/token of the cache written;
- ``fused_cache``: the cut student trained (AdamW, λ = 0.9, forward KL) on MinCE-fused targets read from the
  two teachers' caches (SmolLM2 same tokenizer; Gemma aligned and projected, ``prefix``) vs ``ce``: the same
  trainer, student and blocks with plain CE;
- ``sr_online``: stillroom online same-tokenizer KD from SmolLM2 (dense generalised JSD, β = 0.5, no CE term,
  the chunked fused-linear loss) vs ``trl_gkd``: TRL ``GKDTrainer`` off-policy (``lmbda=0``), same student,
  teacher, batch, sequence length and β, fp32.

Tokens/s of the training configurations is over the optimizer steps after the ``--warmup`` first; of the cache
configurations over all ``--blocks`` texts after one untimed warm-up batch. ``--small`` runs everything on tiny
models in seconds (a test; the real models are not needed) and ``--inline`` runs the configurations in this
process (no per-configuration peak RSS; for tests). Ends with a ``SUMMARY:`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import real_model  # noqa: E402

SMOLLM2 = real_model("smollm2-135m-instruct")  # `stillroom models get smollm2-135m-instruct`
GEMMA3 = real_model("gemma3-270m")
LAYERS = [0, 6, 12, 18, 24, 29]
BATCH, TOP_K = 4, 16
CONFIGS = ("fwd_smollm2", "cache_smollm2", "fwd_gemma3", "cache_gemma3", "ce", "fused_cache", "trl_gkd",
           "sr_online")
PEERS = {"cache_smollm2": "fwd_smollm2", "cache_gemma3": "fwd_gemma3", "fused_cache": "ce", "sr_online": "trl_gkd"}


# --- assets -------------------------------------------------------------------------------------------------


def small_models(root: Path) -> dict[str, str]:
    """Tiny stand-ins: a Llama "smollm2" (byte-level BPE) and a Llama "gemma3" (▁-BPE): different tokenizers."""
    from stillroom.testing import corpus_texts, save_pair, tiny_llama, train_byte_bpe, train_spm_bpe

    text = "\n".join(corpus_texts("train"))[:100_000]
    chunks = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    bpe, spm = train_byte_bpe(chunks, 1000), train_spm_bpe(chunks, 1200)
    eot = bpe.convert_tokens_to_ids("<|endoftext|>")
    sm = save_pair(tiny_llama(len(bpe), n_layer=4, seed=0, bos_token_id=eot, eos_token_id=eot), bpe, root / "sm")
    gm = save_pair(tiny_llama(len(spm), n_layer=2, seed=1, bos_token_id=spm.bos_token_id,
                              eos_token_id=spm.eos_token_id), spm, root / "gm")
    return {"smollm2": str(sm), "gemma3": str(gm)}


def build_blocks(root: Path, a) -> None:
    """The first ``--blocks`` blocks of ``--seq`` student tokens of the shipped corpus, as JSONL under ``root``."""
    from bench.common import write_blocks
    from stillroom.inputs.blocks import make_blocks
    from stillroom.models.loading import load_tokenizer
    from stillroom.testing import corpus_texts

    tok = load_tokenizer(a.smollm2, "student")
    rows, blocks = [], []
    for i, t in enumerate(corpus_texts("train")):  # only as much text as the blocks need
        rows.append((f"w{i}", t[: 6 * a.seq * a.blocks]))
        blocks = [b for b in make_blocks(rows, tok, a.seq, add_bos=False, warn_padding=False)
                  if len(b.input_ids) >= a.seq - 8]
        if len(blocks) >= a.blocks:
            break
    if len(blocks) < a.blocks:
        raise SystemExit(f"only {len(blocks)} blocks of {a.seq} tokens in the corpus; lower --blocks")
    write_blocks(root / "blocks.jsonl", blocks[: a.blocks])


def build_cache(root: Path, name: str, a) -> None:
    """Teacher ``name``'s k = 16 cache over the blocks, for ``fused_cache`` (when no ``cache_*`` run wrote it)."""
    import torch

    from bench.common import read_blocks
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher

    torch.set_num_threads(a.threads)
    rows = [(b.example_id, b.text) for b in read_blocks(root / "blocks.jsonl")]
    write_cache(OnlineTeacher(getattr(a, name), top_k=TOP_K), rows, root / f"cache-{name}", progress=False)


# --- one configuration --------------------------------------------------------------------------------------


def cache_child(config: str, root: Path, a) -> dict:
    """``fwd_*``: bare forward loop; ``cache_*``: ``write_cache`` at k = 16; both over the first ``--blocks`` texts."""
    from bench.cache import plain_loop
    from bench.common import read_blocks
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher

    name = config.split("_", 1)[1]
    blocks = read_blocks(root / "blocks.jsonl")[: a.blocks]
    rows = [(b.example_id, b.text) for b in blocks]
    teacher = OnlineTeacher(getattr(a, name), top_k=TOP_K)
    out = root / f"timed-{config}-{os.getpid()}"
    keep = root / f"cache-{name}"  # the first cache written is kept: fused_cache trains on it
    try:
        if config.startswith("fwd_"):
            plain_loop(teacher, rows[:2])  # warm-up
            t = time.perf_counter()
            tokens = plain_loop(teacher, rows)
            res = {}
        else:
            write_cache(teacher, rows[:2], out / "warm", progress=False)
            t = time.perf_counter()
            s = write_cache(teacher, rows, out / "cache" if keep.exists() else keep, progress=False)
            tokens = s.tokens
            tot = s.manifest["totals"]
            res = {"bytes_per_token": tot["bytes_per_token"], "kl_mean": tot["kl_mean"]}
        elapsed = time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return dict(res, tokens=tokens, seconds=elapsed, tokens_per_s=tokens / elapsed)


def train_child(config: str, root: Path, a) -> dict:
    """``ce``, ``fused_cache``, ``sr_online`` (stillroom's DistillTrainer) and ``trl_gkd`` on the cut student."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from bench.common import StepTimer, disable_dropout, gkd_collator, read_blocks, trainer_args
    from stillroom.inputs.blocks import BlockCollator, BlockDataset
    from stillroom.models.cut import cut_from
    from stillroom.models.loading import load_tokenizer
    from stillroom.teachers.kd import AlignedTeacher, SameTokenizerTeacher
    from stillroom.training.recipe import FusionSpec, LossSpec
    from stillroom.training.trainer import DistillTrainer

    torch.manual_seed(0)
    tok = load_tokenizer(a.smollm2, "student")
    # ``--steps`` may take more than one pass over the blocks: the same work per step
    blocks = read_blocks(root / "blocks.jsonl")
    student = cut_from(a.smollm2, a.layers)
    collate = BlockCollator(tok, a.seq)
    timer = StepTimer(a.warmup)
    spent: dict[str, list[float]] = {}
    common = trainer_args(root / f"out-{config}-{os.getpid()}", a.steps, BATCH)
    if config == "trl_gkd":
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        teacher = AutoModelForCausalLM.from_pretrained(a.smollm2, dtype=torch.float32)
        # bf16=False: TRL's default bf16 autocast runs ~50x slower on a CPU without avx512_bf16 (137 s per step here,
        # 7.5 tokens/s); fp32 is TRL's best on such a machine and the same precision stillroom trains in
        # fp32 and no activation checkpointing, as stillroom trains here (GKDConfig defaults to bf16 + checkpointing)
        args = GKDConfig(**common, lmbda=0.0, beta=0.5, temperature=1.0, max_length=a.seq, disable_dropout=True,
                         bf16=False, gradient_checkpointing=False)
        ds = Dataset.from_list([{"input_ids": b.input_ids, "text": b.text, "example_id": b.example_id}
                                for b in blocks])
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             processing_class=tok, data_collator=gkd_collator(collate), callbacks=[timer.callback()])
    else:
        teachers, fusion = [], FusionSpec()
        if config == "ce":
            loss = LossSpec(kind="forward_kl", ce_weight=1.0)
        elif config == "sr_online":
            teacher = AutoModelForCausalLM.from_pretrained(a.smollm2, dtype=torch.float32)
            teachers = [SameTokenizerTeacher(teacher, top_k=None)]
            loss = LossSpec(kind="jsd", ce_weight=0.0, beta=0.5)
        else:  # fused_cache: both teachers from their caches, MinCE per sequence, as bench.real_fusion
            from stillroom.teachers.cache import CachedTeacher
            from stillroom.tokenization.tokens import TokenTable
            from stillroom.tokenization.vocab import VocabMap

            s_table = TokenTable.from_tokenizer(tok)
            for name, fallback in (("smollm2", "onehot"), ("gemma3", "prefix")):
                t_table = TokenTable.from_tokenizer(load_tokenizer(getattr(a, name), "teacher"))
                teachers.append(AlignedTeacher(CachedTeacher(root / f"cache-{name}"), s_table, t_table,
                                               VocabMap.cached(t_table, s_table), fallback, name))
            for t in teachers:  # time each teacher's per-batch work (read, decode, align, project) on the CPU
                t.targets = timed(t.targets, spent.setdefault(t.name, []))
            loss = LossSpec(kind="forward_kl", ce_weight=0.9)
            fusion = FusionSpec(method="min_ce", level="sequence", fused_top_k=TOP_K)
        disable_dropout(student)  # as GKD's disable_dropout
        trainer = DistillTrainer(model=student, args=TrainingArguments(**common), train_dataset=BlockDataset(blocks),
                                 data_collator=collate, teachers=teachers, loss=loss, fusion=fusion,
                                 callbacks=[timer.callback()])
    trainer.train()
    step_s = timer.seconds / timer.steps
    out = {"tokens_per_s": BATCH * a.seq / step_s, "steps_timed": timer.steps, "step_s": step_s}
    for name, times in spent.items():  # one call per step; the timed steps are the last ones
        out[f"targets_s_per_step/{name}"] = statistics.median(times[-timer.steps:])
    return out


def timed(fn, log: list[float]):
    """``fn`` that appends the seconds of each call to ``log``."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        r = fn(*args, **kwargs)
        log.append(time.perf_counter() - t)
        return r
    return wrapper


def child(config: str, root: Path, a) -> dict:
    import torch

    from bench.common import peak_rss_gb

    torch.set_num_threads(a.threads)
    r = (cache_child if config.split("_")[0] in ("fwd", "cache") else train_child)(config, root, a)
    return dict(r, config=config, peak_rss_gb=peak_rss_gb())


# --- the run ------------------------------------------------------------------------------------------------


def median_key(key: str) -> bool:
    """A run's numbers that the results keep (as medians) beside tokens/s and peak RSS: the cache's bytes per
    token, a training step's seconds, each teacher's seconds of targets per step."""
    return key in ("bytes_per_token", "step_s") or key.startswith("targets_s_per_step/")


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Each configuration's median tokens/s over its peer's (``PEERS``), where both finished."""
    return {c: results[c]["tokens_per_s"] / results[p]["tokens_per_s"] for c, p in PEERS.items()
            if "tokens_per_s" in results.get(c, {}) and "tokens_per_s" in results.get(p, {})}


def markdown(results: dict[str, dict]) -> str:
    """The docs table: config, tokens/s per repeat, median, ratio vs its peer, peak RSS (median over repeats)."""
    r = ratios(results)
    lines = ["| config | tokens/s per repeat | median | vs peer | peak RSS GB |", "|---|---|---|---|---|"]
    for c, v in results.items():
        if "error" in v:
            lines.append(f"| `{c}` | error: {v['error']} | | | |")
            continue
        peer = f"{r[c]:.2f}× `{PEERS[c]}`" if c in r else ""
        per = " ".join(f"{x:,.0f}" for x in v["all_tokens_per_s"])
        lines.append(f"| `{c}` | {per} | {v['tokens_per_s']:,.0f} | {peer} | {v['peak_rss_gb']:.2f} |")
    return "\n".join(lines)


def summary_line(results: dict[str, dict]) -> str:
    r = ratios(results)

    def pct(c):
        return f"{100 * (1 / r[c] - 1):.1f}%" if c in r else "n/a"

    def x(c):
        return f"{r[c]:.2f}x" if c in r else "n/a"

    def bpt(c):
        return f"{results[c]['bytes_per_token']:.1f}" if "bytes_per_token" in results.get(c, {}) else "n/a"

    f = results.get("fused_cache", {})
    share = sum(v for k, v in f.items() if k.startswith("targets_s_per_step/")) / f["step_s"] if "step_s" in f else None
    rss = max((v["peak_rss_gb"] for v in results.values() if "peak_rss_gb" in v), default=float("nan"))
    return (f"cache overhead vs bare forward: smollm2 {pct('cache_smollm2')}, gemma3 {pct('cache_gemma3')}; "
            f"k=16 B/token: smollm2 {bpt('cache_smollm2')}, gemma3 {bpt('cache_gemma3')}; cached fused / CE "
            f"{x('fused_cache')} (teacher targets {'n/a' if share is None else f'{share:.0%}'} of its step); online KD / TRL GKD {x('sr_online')}; max peak RSS {rss:.2f} GB")


def head_check(threads: int, repeats: int = 2, rows: int = 1024, hidden: int = 640, vocab: int = 262_144,
               chunk: int = 256) -> dict[str, list[float]]:
    """Seconds of Gemma-3's output layer (random weights) on ``rows`` hidden states: the matmul alone, the matmul
    then ``topk_logsumexp`` (what the cache writer adds), and the same applied ``chunk`` rows at a time (no
    [rows × vocab] logits tensor, but the head weight is streamed once per chunk)."""
    import torch

    from stillroom.teachers.online import topk_logsumexp

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(vocab, hidden, generator=g) * 0.05, torch.randn(rows, hidden, generator=g)
    runs = {"head": lambda: h @ w.T, "head + topk_logsumexp": lambda: topk_logsumexp(h @ w.T, TOP_K),
            f"head + topk_logsumexp in {chunk}-row chunks": lambda: [topk_logsumexp(h[s:s + chunk] @ w.T, TOP_K)
                                                                     for s in range(0, rows, chunk)]}
    out: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t)
    return out


def machine_line(threads: int) -> str:
    """lscpu model name, avx512_bf16, torch version, threads, cores, load average now."""
    import platform
    import subprocess

    import torch

    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        info = ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("Model name")),
                 platform.processor() or platform.machine())
    bf16 = "yes" if "avx512_bf16" in info else "no"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{model}, {os.cpu_count()} cores, avx512_bf16 {bf16}, torch {torch.__version__}, {threads} threads, "
            f"load average {load}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per training configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    ap.add_argument("--blocks", type=int, default=16, help="blocks (texts) cached and trained on")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--smollm2", default=SMOLLM2)
    ap.add_argument("--gemma3", default=GEMMA3)
    ap.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    ap.add_argument("--small", action="store_true", help="tiny stand-in models (a test, seconds)")
    ap.add_argument("--inline", action="store_true", help="run configurations in this process (tests)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-run results here")
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    ap.add_argument("--head-check", action="store_true", help="only time Gemma's head with/without top-k, chunked")
    a = ap.parse_args(argv)
    if a.head_check:
        for k, v in head_check(a.threads, a.repeats).items():
            print(f"{k}: {' '.join(f'{x:.2f}' for x in v)} s")
        return {}
    if a.child:
        print(json.dumps(child(a.child, Path(a.root), a)), flush=True)
        return {}

    from bench.common import console, medians, print_table, run_child, summary

    configs = a.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory(prefix="bench-real-speed-") as tmp:
        root = Path(tmp)
        if a.small:
            models = small_models(root)
            a.smollm2, a.gemma3, a.layers = models["smollm2"], models["gemma3"], [0, 3]
        before = machine_line(a.threads)
        console.print(f"machine: {before}")
        build_blocks(root, a)
        if "fused_cache" in configs:  # its caches come from the first cache_* run, else from here (untimed)
            for name in ("smollm2", "gemma3"):
                if f"cache_{name}" not in configs or configs.index(f"cache_{name}") > configs.index("fused_cache"):
                    build_cache(root, name, a)
        args = ["--root", str(root), "--steps", str(a.steps), "--warmup", str(a.warmup), "--blocks", str(a.blocks),
                "--seq", str(a.seq), "--threads", str(a.threads), "--smollm2", a.smollm2, "--gemma3", a.gemma3,
                "--layers", *map(str, a.layers)]
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for rep in range(a.repeats):  # round-robin: a slow patch of a shared machine hits every configuration
            for config in configs:
                t = time.perf_counter()
                if a.inline:
                    r = child(config, root, ap.parse_args(["--child", config, *args]))
                else:
                    r = run_child("bench.real_speed", ["--child", config, *args], timeout=3600)
                runs[config].append(r)
                console.print(f"repeat {rep + 1}/{a.repeats} {config} ({time.perf_counter() - t:.0f} s): {r}")
                if a.json:  # after every run: a run cut short keeps what it measured
                    a.json.write_text(json.dumps({"runs": runs, "machine": [before],
                                                  "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))
    results = medians(runs, median_of=median_key)
    after = machine_line(a.threads)
    rows = [[c, v.get("tokens_per_s", "error"), " ".join(f"{x:.0f}" for x in v.get("all_tokens_per_s", [])),
             f"{ratios(results)[c]:.2f}× {PEERS[c]}" if c in ratios(results) else "",
             v.get("peak_rss_gb", ""), v.get("bytes_per_token", "")] for c, v in results.items()]
    print_table(f"real-model speed: batch {BATCH}×{a.seq}, {a.steps} steps ({a.warmup} warm-up), cache over "
                f"{a.blocks} blocks, median of {a.repeats}", ["config", "tokens/s", "per repeat", "vs peer",
                                                                "peak RSS GB", "B/token"], rows)
    console.print(f"machine at the start: {before}\nmachine at the end: {after}")
    print(markdown(results))
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "results": results, "machine": [before, after],
                                      "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))
    summary(summary_line(results))
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
