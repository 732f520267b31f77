"""Shared benchmark conventions.

Every benchmark is ``python -m bench.NAME`` and runs stillroom and its peer side by side in one process
(or, for peak memory, in one fresh child process per configuration), prints a table of medians, and ends
with exactly one summary line starting ``SUMMARY:``. Machines are noisy: report medians and ratios.

What more than one benchmark does lives here, once (timing, medians over repeats, the seed spread, the tiny
student/teacher pair, blocks files, trainer settings, a cache's bytes per token); a helper only one benchmark
uses stays in that benchmark. Heavy libraries (torch, transformers, stillroom) are imported inside the helpers
that need them, so that importing this module stays cheap.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, TrainerCallback

    from stillroom.inputs.blocks import Block

console = Console()


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run_child(module: str, args: Sequence[str], timeout: float = 1800) -> dict:
    """Run ``python -m module args`` in a fresh process; it must print one JSON object as its last line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    """The machine every benchmark table records (see :func:`cpu_line`)."""
    return cpu_line()


def cpu_line() -> str:
    """The machine a number was measured on, for the pages of docs/benchmarks/: CPU model (as lscpu names it), whether it has
    the instructions that decide bf16 speed, torch version and threads."""
    import torch

    from stillroom.models.precision import cpu_flags

    name, flags = cpu_flags()
    have = set(flags.split())
    marks = ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{name} ({os.cpu_count()} cores, {marks}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(str(c))
    for r in rows:
        table.add_row(*[f"{x:.4g}" if isinstance(x, float) else str(x) for x in r])
    console.print(table)


def summary(line: str) -> None:
    """The last line a benchmark prints."""
    print(f"SUMMARY: {line}", flush=True)


def spread(values: Sequence[float]) -> float:
    """Half the range of ``values`` (0 for fewer than two): the seed-to-seed spread a gap between two arms is
    compared against. With the 2-3 seeds the benchmarks can afford, a standard deviation is barely defined;
    half the range is simple and conservative. Every bench that reports "mean ± spread" uses this one rule
    (bench.onpolicy_quality pairs it with ``statistics.fmean`` itself)."""
    return (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def medians(runs: Mapping[str, Sequence[dict]], median_of: Callable[[str], bool] | None = None,
            first: Sequence[str] = ()) -> dict[str, dict]:
    """One result per configuration from its repeated runs (each the dict a child process printed).

    Over the runs that finished (no ``"error"`` key): the median ``tokens_per_s`` and the median
    ``peak_rss_gb``, every run's tokens/s in run order (``all_tokens_per_s``), the median of each further key of
    the first finished run for which ``median_of(key)`` is true, and the keys ``first`` as the first finished
    run has them (counts that are the same in every run). A configuration none of whose runs finished gets
    ``{"error": <its first run's error>}`` (``"not run"`` when it has no run).

    Peak memory is the median over the repeats, like every other number these tables print. Each repeat is
    a fresh process doing the same work, so its peak RSS varies little from run to run; the median keeps a
    single odd repeat (another process's pressure on the allocator, a lazily loaded library) from deciding
    the "peer RSS / ours" ratio, which then compares the typical run of each side. The per-run values stay
    in the ``runs`` the benches write with ``--json``.
    """
    out: dict[str, dict] = {}
    for config, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[config] = {"error": rs[0]["error"] if rs else "not run"}
            continue
        res = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in ok),
               "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in ok),
               "all_tokens_per_s": [r["tokens_per_s"] for r in ok]}
        for key in ok[0]:
            if median_of is not None and key not in res and median_of(key):
                res[key] = statistics.median(r[key] for r in ok)
        res.update({key: ok[0][key] for key in first})
        out[config] = res
    return out


class StepTimer:
    """Wall time of a Trainer's optimizer steps after the first ``warm`` (the warm-up, where lazy imports,
    allocator growth and first-call caches land): ``t0`` when step ``warm`` ends, ``t1`` and ``steps`` when each
    later step ends, so :attr:`seconds` spans exactly the ``steps`` timed steps. The benches divide the work done
    in those steps (tokens) by :attr:`seconds`.

    Give a Trainer ``callbacks=[timer.callback()]``; the callback class is made there, so that importing this
    module stays free of transformers (and torch) for the benches that need neither.
    """

    def __init__(self, warm: int) -> None:
        self.warm = warm
        self.t0: float | None = None
        self.t1: float | None = None
        self.steps = 0

    def step_end(self, global_step: int) -> None:
        """Record the end of optimizer step ``global_step`` (1-based, as ``TrainerState.global_step``)."""
        if global_step == self.warm:
            self.t0 = time.perf_counter()
        elif global_step > self.warm:
            self.steps, self.t1 = global_step - self.warm, time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds from the end of the warm-up to the end of the last step."""
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(f"no step after the {self.warm} warm-up steps was timed: train more steps")
        return self.t1 - self.t0

    def callback(self) -> TrainerCallback:
        """A ``transformers.TrainerCallback`` that calls :meth:`step_end` at every optimizer step's end."""
        from transformers import TrainerCallback

        timer = self

        class StepTimerCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.step_end(state.global_step)

        return StepTimerCallback()


def trainer_args(output_dir: str | Path, steps: int, batch: int, seed: int = 0) -> dict:
    """The ``TrainingArguments`` keywords every trainer benchmark gives both sides (TRL's configs take the same):
    ``steps`` steps of ``batch`` rows on the CPU at a constant learning rate of 1e-4, nothing logged, saved or
    drawn (a progress bar or a checkpoint would be timed), no dataloader workers, columns kept for the
    collators."""
    return dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=seed, remove_unused_columns=False, lr_scheduler_type="constant")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer of ``model``, as TRL's ``disable_dropout=True`` does for its side: both sides
    of a comparison then train the same deterministic model."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def gkd_collator(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    """``collate`` (stillroom's ``BlockCollator``) cut to the keys TRL's ``GKDTrainer`` reads, so that both
    trainers see the same batches."""
    def collate_ids(features: list) -> dict:
        b = collate(features)
        return {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
    return collate_ids


def write_blocks(path: Path, blocks: Iterable[Block]) -> None:
    """Training blocks as JSONL (``id``, ``text``, ``input_ids`` per line): built once by the parent process,
    read by every child (:func:`read_blocks`), so that all configurations train on the same blocks."""
    with path.open("w") as f:
        for b in blocks:
            f.write(json.dumps({"id": b.example_id, "text": b.text, "input_ids": b.input_ids}) + "\n")


def read_blocks(path: Path) -> list[Block]:
    """The blocks :func:`write_blocks` wrote, in order."""
    from stillroom.inputs.blocks import Block

    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [Block(r["id"], r["text"], r["input_ids"]) for r in rows]


def build_pair(root: Path, sz: Mapping, n_positions: int, chars: int | None = None,
               chat_template: str | None = None) -> tuple[PreTrainedTokenizerBase, list[str]]:
    """The tiny student/teacher pair of the throughput benchmarks, saved under ``root / "student"`` and
    ``root / "teacher"``: a byte-level BPE tokenizer of ``sz["vocab"]`` ids trained on the shipped corpus's train
    works (each cut to its first ``chars`` characters when given; 2,000-character chunks), with ``chat_template``
    set when given, and two random-weight GPT-2s on it, ``sz["student"]`` and ``sz["teacher"]`` = (layers,
    width, heads), seeds 0 and 1 (speed does not depend on the weights). Returns the tokenizer and the texts."""
    from stillroom.testing import corpus_texts, save_pair, tiny_gpt2, train_byte_bpe

    texts = corpus_texts("train")
    if chars is not None:
        texts = [t[:chars] for t in texts]
    chunks = [t[i:i + 2000] for t in texts for i in range(0, len(t), 2000)]
    tok = train_byte_bpe(chunks, vocab_size=sz["vocab"])
    if chat_template is not None:
        tok.chat_template = chat_template
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    kw = dict(bos_token_id=eot, eos_token_id=eot, n_positions=n_positions)
    for name, (layers, width, heads), seed in (("student", sz["student"], 0), ("teacher", sz["teacher"], 1)):
        save_pair(tiny_gpt2(len(tok), n_layer=layers, n_embd=width, n_head=heads, seed=seed, **kw), tok, root / name)
    return tok, texts


def cache_bytes_per_token(cache: str | Path) -> float:
    """Bytes per teacher token of a stillroom cache: the shards' bytes over their tokens, both as the manifest
    records them (``write_cache`` records each shard's size as written, and its ``totals.bytes_per_token``,
    which bench.cache and bench.real_speed print, is the same ratio). Read from the manifest, not from the
    files: a cache read from another run's folder, or one whose shards were moved, gives the same number."""
    m = json.loads((Path(cache) / "manifest.json").read_text())
    return sum(int(s["bytes"]) for s in m["shards"]) / max(sum(int(s["tokens"]) for s in m["shards"]), 1)


def real_model(name: str) -> str:
    """The folder ``stillroom models get NAME`` converted the model into (its folder under the model cache; the
    path it would have when not fetched yet, so ``--help`` and the smoke tests need no model)."""
    from stillroom.files import cache_dir
    from stillroom.models.registry import converted_folder

    return str(converted_folder(name) or cache_dir("models") / name)
