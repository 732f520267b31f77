"""Shared benchmark conventions.

Every benchmark is ``python -m bench.NAME`` and runs stillroom and its peer side by side in one process
(or, for peak memory, in one fresh child process per configuration), prints a table of medians, and ends
with exactly one summary line starting ``SUMMARY:``. Machines are noisy: report medians and ratios.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

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
    """The machine a number was measured on, for docs/benchmarks.md: CPU model (as lscpu names it), whether it has
    the instructions that decide bf16 speed, torch version and threads."""
    import torch

    from stillroom.precision import cpu_flags

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
