"""Does fusion help on real pretrained models? FuseLLM's setting on this machine (issue 14, part 3).

Target: a student cut from SmolLM2-135M-Instruct (6 of its 30 decoder layers, SmolLM2's tokenizer) — the
target is one of the source families, as in FuseLLM. ``--scratch``: a Llama of the same shape with fresh weights
(SmolLM2's tokenizer), a student no teacher's weights are inside of. Sources, each cached offline once (top-k):
SmolLM2-135M-Instruct itself (same tokenizer) and Gemma-3-270M (262k ids: exact byte alignment, projection
``--projection``, default ``prefix`` as the shipped cross-tokenizer recipes and the demo; FuseLLM's own is
``onehot``). Arms, with the same training blocks, steps and seed:

- ``ce-only``: continual training with CE alone (λ = 1);
- ``kd-smollm2``, ``kd-gemma3``: λ·CE + (1−λ)·KL(teacher ‖ student) from one teacher;
- ``fused-min_ce``, ``fused-avg_ce``: both teachers fused per sequence (``--token-level`` adds token-level arms).

Cross-tokenizer objectives with Gemma-3 (issue 15; not run unless named in ``--arms``): ``kd-gemma3-mined`` (KD
through FuseLLM's MinED map alone, projection ``onehot``), ``uld-gemma3`` (ULD on its top-k), ``alm-gemma3`` (ALM
over the exact chunks), ``alm-unbiased-gemma3`` (ALM over the unbiased chunks), ``alm+kd-gemma3`` (ALM next to KD
via ``--projection``), ``fused-alm-min_ce`` / ``fused-alm-avg_ce`` (both teachers as ALM terms fused per
sequence), ``fused-min_ce-mined`` (the two teachers fused per sequence, Gemma through the MinED map: fusion with
the best single-teacher cross-tokenizer objective), ``xtoken-gemma3`` (X-Token's direction: the student's
distribution moved into Gemma's vocabulary, KL against its own top-k at every aligned boundary), ``hybrid-gemma3``
(GOLD's hybrid ULD at the same boundaries),
``kd-gemma3-mined-nofill`` (MinED with the rows it leaves uncovered out of the distillation term instead of
given the one-hot gold token: DSKD's confound, extra CE), ``kd-smollm2-served`` (``kd-smollm2`` with SmolLM2's
cache written through a real llama.cpp server, ``llama_cpp.server`` serving the GGUF its folder was converted
from: ``OUT/cache/smollm2-served``, shards of 8 blocks, so a killed run resumes). ALM reads only the teacher's
log-prob of its own tokens, from a top-1 cache
(``OUT/cache/gemma3-top1``); ULD and KD read the top-k cache. ``--cache-from DIR`` reads the top-k caches of
another OUT built over the same blocks with the same teachers, k and ``--temperature`` (λ, lr, projection may
differ; read only: nothing is written there). ``--temperature τ``: KD at τ (Hinton: the caches are written at τ,
the student is softened alike and the term scaled by τ²); ``--support-temperature T``: the teacher's target alone
softened within its top-k (``loss.support_temperature``; the caches are those of τ). ``--kd-rows starts|inside``:
the KD term only on the rows whose next token starts where one of Gemma-3's tokens starts / inside one
(:mod:`bench.kd_rows`; λ·CE alone on the others), for any arm: where a teacher's signal reaches the student.

λ = ``loss.ce_weight`` = 0.9 (FuseLLM's continual-training value and the project default). Data: the shared
Shakespeare corpus split by whole works (fixed lists below; the test works are never trained on and never used
for a choice); held-out bits per byte on the first ``--eval-chars`` characters of each test work, also for the
two teachers and the cut student before training. Bar: fused < best single-teacher KD < CE-only, each gap larger
than the seed-to-seed spread (half range), tested from 3 seeds on.

Resumable: each arm writes ``OUT/seed{S}/{arm}/result.json`` and is skipped when it exists; teacher caches are
written once (``stillroom.teachers.cache.write_cache`` skips finished shards). One OUT per setting (``OUT/options.json``;
a rerun with other options into the same OUT is refused). Writes ``OUT/report.md`` and
``OUT/results.json``; ends with a ``SUMMARY:`` line.

    python -m bench.real_fusion --seeds 0 1 2                   # default scale
    python -m bench.real_fusion --seeds 0 --steps 2 --batch-size 2 --eval-chars 300 --out runs/rf-smoke  # smoke
    python -m bench.real_fusion --seeds 0 --arms kd-gemma3-mined uld-gemma3 alm-gemma3 alm-unbiased-gemma3 \
        alm+kd-gemma3 --cache-from runs/bench-real-fusion --out runs/bench-real-objectives
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import cache_bytes_per_token, console, machine, real_model, summary  # noqa: E402
from bench.kd_rows import CLASSES as KD_ROWS  # noqa: E402
from bench.kd_rows import kd_rows  # noqa: E402
from bench.real_fusion_report import collect, report_md, verdicts  # noqa: E402

SMOLLM2 = real_model("smollm2-135m-instruct")  # `stillroom models get smollm2-135m-instruct`
GEMMA3 = real_model("gemma3-270m")
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "shakespeare"
LAYERS = [0, 6, 12, 18, 24, 29]

# Whole works, fixed once (chosen by name, before any result): tragedies, comedies, a history and poetry on
# each side. Everything not listed here is training data.
TEST_WORKS = ["hamlet_gut.txt", "twelfth_night_gut.txt", "richard_ii_gut.txt", "sonnets_gut.txt"]
VALIDATION_WORKS = ["othello_gut.txt", "much_ado_about_nothing_gut.txt"]


def split_works(names: list[str], test: list[str] = TEST_WORKS, validation: list[str] = VALIDATION_WORKS
                ) -> dict[str, list[str]]:
    """``{"train", "validation", "test"}`` → sorted file names; every work in exactly one split."""
    missing = sorted(set(test + validation) - set(names))
    if missing:
        raise FileNotFoundError(f"corpus: works {missing} not found; pass --corpus with the shared Shakespeare folder")
    held = set(test) | set(validation)
    return {"train": sorted(n for n in names if n not in held), "validation": sorted(validation),
            "test": sorted(test)}


# --- running ------------------------------------------------------------------------------------------------


SCALE = ("steps", "batch_size", "seq_len", "lr", "ce_weight", "projection", "top_k", "eval_chars", "student_from",
         "layers", "smollm2", "gemma3", "scratch", "temperature", "support_temperature", "kd_rows")
CACHE_KEYS = ("seq_len", "top_k", "student_from", "smollm2", "gemma3", "temperature")  # blocks' shape, k, models, τ
REFERENCE_KEYS = ("eval_chars", "student_from", "layers", "smollm2", "gemma3", "scratch")  # the test text, the models
#: options added after runs were recorded: a recorded run without one had its default
LATER = {"scratch": False, "temperature": 1.0, "support_temperature": 1.0, "kd_rows": "all"}


def _differ(have: dict, args: argparse.Namespace, keys: tuple[str, ...]) -> dict:
    was = {k: have.get(k, LATER.get(k)) for k in keys}
    return {k: (was[k], getattr(args, k)) for k in keys if was[k] != getattr(args, k)}


def check_scale(args: argparse.Namespace, out: Path) -> None:
    """One OUT per setting: finished arms and caches are reused only by a rerun with the same options."""
    from stillroom.errors import ConfigError

    path = out / "options.json"
    if path.exists():
        diff = _differ(json.loads(path.read_text()), args, SCALE)
        if diff:
            raise ConfigError(f"--out {out} holds a run with other options {diff} (was, now); pass another --out")
    else:
        path.write_text(json.dumps({k: getattr(args, k) for k in SCALE}, indent=1))


def prepare_data(corpus: Path, out: Path) -> dict[str, str]:
    """Copy the works into ``OUT/data/{train,validation,test}`` (a DATA folder per split); returns the folders."""
    split = split_works(sorted(p.name for p in corpus.glob("*.txt")))
    folders = {}
    for name, works in split.items():
        d = out / "data" / name
        d.mkdir(parents=True, exist_ok=True)
        for w in works:
            if not (d / w).exists():
                (d / w).write_bytes((corpus / w).read_bytes())
        folders[name] = str(d)
    (out / "data" / "split.json").write_text(json.dumps(split, indent=1))
    return folders


def recipe(args: argparse.Namespace, data: dict[str, str], name: str, out_dir: Path, seed: int,
           teachers: list[dict] = (), method: str = "min_ce", level: str = "sequence",
           projection: str | None = None, fill: bool = True) -> dict:
    """One arm's training recipe; ``teachers``: recipe teacher entries (name, path, cache, objective...);
    ``projection`` overrides ``--projection`` for this arm; ``fill``: ``fusion.fill_uncovered``."""
    return {
        "name": name,
        "student": student_spec(args),
        "teachers": [dict(t) for t in teachers],
        "data": {"train": data["train"], "eval": data["validation"], "seq_len": args.seq_len,
                 "max_blocks": args.steps * args.batch_size},  # every block trained on once
        "loss": {"kind": "forward_kl", "ce_weight": args.ce_weight if teachers else 1.0,
                 "temperature": args.temperature, "support_temperature": args.support_temperature},
        "fusion": {"method": method, "level": level, "top_k": args.top_k,
                   "projection": projection or args.projection, "fill_uncovered": fill},
        "train": {"output_dir": str(out_dir), "max_steps": args.steps, "batch_size": args.batch_size,
                  "lr": args.lr, "warmup_steps": max(1, args.steps // 10), "seed": seed,
                  "logging_steps": max(1, args.steps // 10), "eval_steps": None, "eval_max_blocks": 8,
                  "threads": args.threads, "plot": False, "overwrite": True},
    }


#: the cut student's shape (SmolLM2-135M's, 6 layers) for ``--scratch``: a Llama with fresh weights
SCRATCH = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "tie_word_embeddings": True}


def student_spec(args) -> dict:
    """The recipe's ``student``: ``--layers`` of ``--student-from``, or with ``--scratch`` a Llama of the same shape
    (``len(--layers)`` layers) with fresh weights and ``--student-from``'s tokenizer — a student no teacher's
    weights are inside of."""
    if args.scratch:
        return {"tokenizer": args.student_from, "config": {**SCRATCH, "num_hidden_layers": len(args.layers)}}
    return {"init_from": args.student_from, "layers": args.layers}


def cache_source(args, out: Path) -> Path:
    """Where the top-k caches are read: ``--cache-from`` (another OUT whose caches cover at least these blocks —
    the blocks are a prefix of one stream, so a run with more steps × batch size does — with the same teachers and
    k; checked — λ, lr, projection or the layers kept may differ) or OUT."""
    from stillroom.errors import ConfigError, MissingPathError

    src = args.cache_from
    if src is None:
        return out
    opts = src / "options.json"
    if not opts.exists():
        raise MissingPathError(f"--cache-from {src}: no options.json there; point it at a bench.real_fusion OUT")
    have = json.loads(opts.read_text())
    diff = _differ(have, args, CACHE_KEYS)
    if diff:
        raise ConfigError(f"--cache-from {src} was built with other options {diff} (there, here); its caches cover "
                          f"other blocks: drop --cache-from or use the same options")
    # the training blocks are the first steps × batch_size of one stream: a run over more blocks covers these
    there, here = have["steps"] * have["batch_size"], args.steps * args.batch_size
    if there < here:
        raise ConfigError(f"--cache-from {src} caches {there} blocks, this run trains on {here}: drop --cache-from "
                          f"or point it at a run with at least as many steps × batch size")
    for name in ("smollm2", "gemma3"):
        if not (src / "cache" / name / "manifest.json").exists():
            raise MissingPathError(f"--cache-from {src}: cache/{name} is not finished; run that benchmark first")
    return src


def build_caches(args, data: dict[str, str], out: Path, top1: bool = False) -> dict[str, str]:
    """Export the training blocks and cache each teacher over them once (finished shards are skipped); with
    ``--cache-from`` the top-k caches are read there and only the blocks file (to build a top-1 cache) is
    copied. ``top1``: also a top-1 cache of Gemma-3 (all ALM reads) in ``OUT/cache/gemma3-top1``."""
    import shutil

    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.training.data import export_training_blocks
    from stillroom.training.recipe import load_recipe

    src = cache_source(args, out)
    blocks = out / "train_blocks.jsonl"
    if not blocks.exists():
        if src != out:
            shutil.copyfile(src / "train_blocks.jsonl", blocks)
        else:
            n = export_training_blocks(load_recipe(recipe(args, data, "blocks", out / "unused", 0)), blocks)
            console.print(f"{n} training blocks of ≤ {args.seq_len} student tokens → {blocks}")
    caches = {}
    todo = [("smollm2", args.smollm2, args.top_k, src), ("gemma3", args.gemma3, args.top_k, src)]
    if top1:
        todo.append(("gemma3-top1", args.gemma3, 1, out))
    for name, path, k, where in todo:
        cache = where / "cache" / name
        caches[name] = str(cache)
        if where != out:
            continue  # read only
        t = time.perf_counter()
        teacher = OnlineTeacher(path, top_k=k, temperature=args.temperature)
        s = write_cache(teacher, blocks, cache, console=console)
        console.print(f"{name}: {s.tokens:,} teacher tokens cached in {time.perf_counter() - t:.0f} s "
                      f"({s.shards_skipped} shards reused) → {cache}")
        del teacher
    return caches


def served_cache(args, out: Path) -> str:
    """SmolLM2's top-k cache of this run's training blocks written through ``llama_cpp.server`` serving
    ``--served-gguf`` (default: the GGUF SmolLM2's folder was converted from) — the served teacher's path
    (``stillroom.teachers.served``) as a user runs it with ``stillroom cache --server``; resumable."""
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.served import ServedTeacher
    from stillroom.testing import llama_server

    cache = out / "cache" / "smollm2-served"
    if (cache / "manifest.json").exists():
        return str(cache)
    gguf = args.served_gguf or Path(json.loads((Path(args.smollm2) / "stillroom-gguf.json").read_text())["source"])
    rows = [json.loads(x) for x in (out / "train_blocks.jsonl").read_text().splitlines()]
    data = [(r["id"], r["text"]) for r in rows[: args.steps * args.batch_size]]  # this run's blocks only
    t = time.perf_counter()
    with llama_server(gguf, n_ctx=2 * args.seq_len, threads=args.threads) as url:
        teacher = ServedTeacher.from_path(url, args.smollm2, top_k=args.top_k, temperature=args.temperature,
                                          concurrency=1)
        s = write_cache(teacher, data, cache, shard_size=8, console=console)
        console.print(f"smollm2-served: {s.tokens:,} teacher tokens through {url} in {time.perf_counter() - t:.0f} s "
                      f"({s.shards_skipped} shards reused; {teacher.stats.line()}) → {cache}")
    return str(cache)


def served_url(cache: str | None) -> str | None:
    """The URL a served cache was written through (its manifest's ``teacher``): the recipe names it as a user's
    would (``teachers.N.server``); training reads the cache and never asks the server."""
    if cache is None:
        return None
    return json.loads((Path(cache) / "manifest.json").read_text())["teacher"].split()[0]


def bits_per_byte(model, tok, texts: list[str], name: str) -> float:
    import torch

    from stillroom.evaluation import evaluate
    from stillroom.models.runtime import freeze_teacher

    with torch.no_grad():
        return evaluate(freeze_teacher(model), tok, texts, name=name).bits_per_byte


def references(args, texts: list[str], out: Path) -> dict[str, float]:
    """Held-out bits/byte of the two teachers and of the cut student before training (cached in OUT)."""
    from stillroom.evaluation import load_model
    from stillroom.models.cut import cut_from
    from stillroom.models.loading import load_tokenizer

    path = out / "references.json"
    src = args.cache_from
    if (not path.exists() and src is not None and (src / "references.json").exists()
            and not _differ(json.loads((src / "options.json").read_text()), args, REFERENCE_KEYS)):
        path.write_text((src / "references.json").read_text())  # same text and models: same references
    ref = json.loads(path.read_text()) if path.exists() else {}
    todo = [("teacher smollm2", args.smollm2), ("teacher gemma3", args.gemma3)]
    if not args.scratch:  # a fresh student's untrained score is its random init's
        todo.append(("cut student, untrained", None))
    for label, folder in todo:
        if label in ref:
            continue
        t = time.perf_counter()
        if folder is None:
            model, tok = cut_from(args.student_from, args.layers), load_tokenizer(args.student_from)
        else:
            model, tok = load_model(folder)
        ref[label] = bits_per_byte(model, tok, texts, label)
        console.print(f"{label}: {ref[label]:.4f} bits/byte ({time.perf_counter() - t:.0f} s)")
        path.write_text(json.dumps(ref, indent=1))
        del model
    return ref


FUSION_ARMS = ("ce-only", "kd-smollm2", "kd-gemma3", "fused-min_ce", "fused-avg_ce")
TOKEN_ARMS = ("fused-min_ce-token", "fused-avg_ce-token")
OBJECTIVE_ARMS = ("kd-gemma3-mined", "uld-gemma3", "alm-gemma3", "alm-unbiased-gemma3", "alm+kd-gemma3",
                  "fused-alm-min_ce", "fused-alm-avg_ce", "fused-min_ce-mined", "xtoken-gemma3",
                  "kd-gemma3-mined-nofill", "hybrid-gemma3", "kd-smollm2-served")
ALL_ARMS = FUSION_ARMS + TOKEN_ARMS + OBJECTIVE_ARMS


def arms(args, caches: dict[str, str]) -> dict[str, dict]:
    """Arm name → ``{"teachers": [recipe teacher entries], "method", "level", "projection"}`` for the arms asked
    for (``--arms``; default the fusion arms, plus the token-level ones with ``--token-level``)."""
    sm = {"name": "smollm2", "path": args.smollm2, "cache": caches["smollm2"]}
    gm = {"name": "gemma3", "path": args.gemma3, "cache": caches["gemma3"]}
    alm = {"name": "gemma3-alm", "path": args.gemma3, "cache": caches.get("gemma3-top1"), "objective": "alm"}

    def arm(teachers, method="min_ce", level="sequence", projection=None, fill=True):
        return {"teachers": teachers, "method": method, "level": level, "projection": projection, "fill": fill}

    table = {"ce-only": arm([]), "kd-smollm2": arm([sm]), "kd-gemma3": arm([gm]),
             "fused-min_ce": arm([sm, gm]), "fused-avg_ce": arm([sm, gm], "avg_ce"),
             "fused-min_ce-token": arm([sm, gm], level="token"),
             "fused-avg_ce-token": arm([sm, gm], "avg_ce", "token"),
             "kd-gemma3-mined": arm([gm], projection="onehot"),
             # the MinED confound: rows the map leaves uncovered get no target instead of the one-hot gold
             "kd-gemma3-mined-nofill": arm([gm], projection="onehot", fill=False),
             "uld-gemma3": arm([{**gm, "name": "gemma3-uld", "objective": "uld"}]),
             # X-Token's direction: the student's distribution moved into Gemma's vocabulary (stillroom.teachers.xtoken)
             "xtoken-gemma3": arm([{**gm, "name": "gemma3-xtoken", "objective": "xtoken"}]),
             # GOLD's hybrid ULD: Gemma ids with an exact SmolLM2 twin id by id, the rest sorted
             "hybrid-gemma3": arm([{**gm, "name": "gemma3-hybrid", "objective": "hybrid"}]),
             # SmolLM2's cache written through a real llama.cpp server (served_cache)
             "kd-smollm2-served": arm([{**sm, "name": "smollm2-served", "cache": caches.get("smollm2-served"),
                                        "server": served_url(caches.get("smollm2-served"))}]),
             "alm-gemma3": arm([alm]), "alm-unbiased-gemma3": arm([{**alm, "alm_chunks": "unbiased"}]),
             "alm+kd-gemma3": arm([gm, alm]),
             # both teachers as ALM terms, fused per sequence (stillroom.teachers.alm_fusion); SmolLM2's from its top-k cache
             "fused-alm-min_ce": arm([{**sm, "name": "smollm2-alm", "objective": "alm"}, alm]),
             "fused-alm-avg_ce": arm([{**sm, "name": "smollm2-alm", "objective": "alm"}, alm], "avg_ce"),
             # the two teachers fused with Gemma projected by FuseLLM's MinED map (the best single-teacher objective)
             "fused-min_ce-mined": arm([sm, gm], projection="onehot")}
    names = args.arms or list(FUSION_ARMS) + (list(TOKEN_ARMS) if args.token_level else [])
    return {a: table[a] for a in names}


def arm_cache_bytes(spec: dict) -> float:
    """Bytes per teacher token of the caches an arm reads (0 for CE only)."""
    return sum(cache_bytes_per_token(t["cache"]) for t in spec["teachers"])


def run_arm(args, data, out: Path, seed: int, arm: str, spec, texts: list[str], rows_from: str | None = None) -> dict:
    """Train one arm, evaluate it on the test works, write ``result.json``; reuse it when it exists.
    ``rows_from``: Gemma-3's top-k cache, whose tokenization sets the rows ``--kd-rows`` keeps."""
    from stillroom.evaluation import load_model
    from stillroom.training.run import train

    folder = out / f"seed{seed}" / arm
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    console.rule(f"seed {seed}: {arm}")
    t = time.perf_counter()
    with kd_rows(args.kd_rows, rows_from, args.gemma3, args.student_from):
        res = train(recipe(args, data, f"real-fusion-{arm}", folder / "model", seed, spec["teachers"],
                           spec["method"], spec["level"], spec["projection"], spec.get("fill", True)))
    train_s = time.perf_counter() - t
    model, tok = load_model(res.output_dir)
    t = time.perf_counter()
    bpb = bits_per_byte(model, tok, texts, arm)
    result = {"arm": arm, "seed": seed, "test_bpb": bpb, "validation_bpb": res.metrics.get("eval_bpb"),
              "train_seconds": train_s, "eval_seconds": time.perf_counter() - t,
              "train_tokens": args.steps * args.batch_size * args.seq_len,
              "cache_bytes_per_token": arm_cache_bytes(spec)}
    if not args.keep_models:
        for f in Path(res.output_dir).glob("*.safetensors"):
            f.unlink()
    done.write_text(json.dumps(result, indent=1))
    console.print(f"{arm} seed {seed}: {bpb:.4f} bits/byte (train {train_s:.0f} s)")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per arm (each block seen once)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ce-weight", type=float, default=0.9, help="λ (FuseLLM's continual-training value)")
    ap.add_argument("--projection", default="prefix")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="KD temperature τ: the caches' and loss.temperature (both sides softened, the term × τ²)")
    ap.add_argument("--support-temperature", type=float, default=1.0,
                    help="loss.support_temperature: the teacher target's spread within its top-k (>1 softer)")
    ap.add_argument("--kd-rows", choices=KD_ROWS, default="all",
                    help="KD only on the rows whose next token starts where a Gemma-3 token starts / inside one "
                    "(bench.kd_rows; CE alone on the others)")
    ap.add_argument("--token-level", action="store_true", help="also fused arms at token level")
    ap.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=None,
                    help="arms to run (default: the fusion arms; the objective arms run only when named)")
    ap.add_argument("--cache-from", type=Path, default=None,
                    help="read the top-k teacher caches of this OUT (same options; read only)")
    ap.add_argument("--eval-chars", type=int, default=2000, help="characters of each test work evaluated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student-from", default=SMOLLM2)
    ap.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    ap.add_argument("--scratch", action="store_true", help="a student of the cut's shape with fresh weights "
                    "(--student-from's tokenizer) instead of the cut one")
    ap.add_argument("--smollm2", default=SMOLLM2)
    ap.add_argument("--gemma3", default=GEMMA3)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--served-gguf", type=Path, default=None,
                    help="the GGUF llama.cpp serves for kd-smollm2-served (default: SmolLM2's source GGUF)")
    ap.add_argument("--keep-models", action="store_true", help="keep each trained student's weights")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-real-fusion"))
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from stillroom.demo import held_out_texts

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    check_scale(args, args.out)
    console.print(f"machine: {machine()}")
    data = prepare_data(args.corpus, args.out)
    texts = held_out_texts(data["test"], args.eval_chars)
    t = time.perf_counter()
    table_names = args.arms or []
    caches = build_caches(args, data, args.out, top1=any("alm" in a for a in table_names))
    if "kd-smollm2-served" in table_names:
        caches["smollm2-served"] = served_cache(args, args.out)
    console.print(f"caches ready in {time.perf_counter() - t:.0f} s")
    refs = references(args, texts, args.out)
    table = arms(args, caches)
    for seed in args.seeds:
        for arm, spec in table.items():
            run_arm(args, data, args.out, seed, arm, spec, texts, caches["gemma3"])
            results, secs, sizes = collect(args.out)  # report after every arm: a killed run keeps what it finished
            lines = verdicts(results)
            (args.out / "report.md").write_text(report_md(args, results, secs, refs, lines, sizes, TEST_WORKS),
                                                 encoding="utf-8")
            (args.out / "results.json").write_text(json.dumps({"test_bpb": results, "train_seconds": secs,
                                                               "cache_bytes_per_token": sizes, "references": refs},
                                                              indent=1))
    console.print((args.out / "report.md").read_text())
    summary("; ".join(lines))


if __name__ == "__main__":
    main()
