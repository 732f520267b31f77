"""Which floating-point type to compute in, decided by measuring the machine rather than by rule.

On a GPU the choice is simple (bf16 where supported, else fp16). On a CPU it depends on the instruction set:
without native bf16 dot products (x86 ``avx512_bf16``/``amx_bf16``, Arm ``bf16``) PyTorch emulates bf16 and a
matmul can run tens of times slower than fp32; with them it runs 2–4× faster. :func:`cpu_bf16_speedup` times a
square matmul both ways once per machine (CPU model, flags, torch version, threads) and caches the ratio in
``$STILLROOM_CACHE/precision.json``; :func:`auto_dtype` picks bf16 only where it was measured to be at least
``MIN_SPEEDUP`` times faster. ``STILLROOM_DTYPE=float32|bfloat16|float16`` forces a choice everywhere "auto" is used.

The student trains with fp32 master weights; :func:`student_precision` picks whether its forward and backward run
under bf16 / fp16 autocast (recipe key ``train.precision``). Teachers run in their own dtype (``teachers[].dtype``)
inside :func:`stillroom.models.runtime.frozen`, so a student's autocast does not silently lower an fp32 teacher's matmuls.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from stillroom.errors import ConfigError
from stillroom.files import atomic_write, cache_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this much before "auto" trades precision for it


def cpu_flags() -> tuple[str, str]:
    """``(model name, space-separated flags)`` of this CPU, from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name.startswith(value.strip()):
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return name, flags


def machine_key() -> str:
    """A short hash naming what a speed measurement depends on: CPU, flags, torch version and threads."""
    name, flags = cpu_flags()
    raw = f"{name}|{flags}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _time_matmul(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up (and kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def measure_bf16_speedup(n: int = 512, repeats: int = 5) -> float:
    """fp32 time ÷ bf16 time of an ``n × n`` matmul on this CPU (best of ``repeats``; > 1 means bf16 is faster)."""
    return _time_matmul(torch.float32, n, repeats) / _time_matmul(torch.bfloat16, n, repeats)


def cpu_bf16_speedup(*, refresh: bool = False) -> float:
    """:func:`measure_bf16_speedup`, measured once per :func:`machine_key` and cached on disk."""
    path, key = cache_dir() / "precision.json", machine_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not refresh and isinstance(known.get(key), (int, float)):
        return float(known[key])
    speedup = measure_bf16_speedup()
    known[key] = round(speedup, 3)
    try:
        atomic_write(path, json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return speedup


def parse_dtype(name: str, what: str = "dtype") -> str:
    """Validate a dtype name: ``auto`` or one of :data:`DTYPES`."""
    if name != "auto" and name not in DTYPES:
        raise ConfigError(f"{what}: {name!r} is not a dtype; use auto, float32, bfloat16 or float16")
    return name


def auto_dtype(device: str | torch.device = "cpu", name: str = "auto") -> torch.dtype:
    """The dtype to run a model in on ``device``: ``name`` if given, ``$STILLROOM_DTYPE``, else by capability.

    GPU: bf16 where supported, else fp16. CPU: bf16 where :func:`cpu_bf16_speedup` ≥ :data:`MIN_SPEEDUP`, else
    fp32 (on CPUs without native bf16 it is emulated and far slower)."""
    parse_dtype(name)
    if name == "auto":
        name = os.environ.get("STILLROOM_DTYPE", "auto")
        parse_dtype(name, "STILLROOM_DTYPE")
    if name != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_speedup() >= MIN_SPEEDUP else torch.float32
    return torch.float32


def training_device() -> torch.device:
    """Where ``stillroom train`` trains: the GPU when there is one (``TrainingArguments(use_cpu=...)``), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def student_precision(name: str = "auto", device: str | torch.device | None = None) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the student's autocast for recipe key ``train.precision`` on ``device``.

    ``auto``: bf16 where :func:`auto_dtype` picks bf16 (a GPU with bf16, a CPU measured faster at it), else fp32.
    fp16 on CPU is refused: its 5-bit exponent needs loss scaling against underflowing gradients, while bf16 keeps
    fp32's range and is at least as fast on every CPU with half-precision kernels (on CPUs without, both are
    emulated: a 512² matmul ran 14x slower than fp32 in either on the AMD EPYC of docs/benchmarks/precision.md)."""
    device = torch.device(device) if device is not None else training_device()
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: {name!r} is not a precision; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision: fp16 is for GPUs (its narrow range needs loss scaling; on CPU bf16 is "
                          "as fast and keeps fp32's range); set train.precision=auto, bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: bf16 is not supported by this GPU; set train.precision=fp16 or auto")
    if name != "auto":
        return name
    return "bf16" if auto_dtype(device) is torch.bfloat16 else "fp32"


def slow_bf16_warning(key: str, fix: str, device: str | torch.device | None = None) -> str | None:
    """One line when bf16 was asked for (``key``) on a CPU measured slower at it than :data:`MIN_SPEEDUP`, else
    None: the run is allowed (the user asked), but it should not crawl without saying so."""
    device = torch.device(device) if device is not None else training_device()
    if device.type != "cpu":
        return None
    speedup = cpu_bf16_speedup()
    if speedup >= MIN_SPEEDUP:
        return None
    name, flags = cpu_flags()
    native = "native" if {"avx512_bf16", "amx_bf16", "bf16"} & set(flags.split()) else "no native"
    how = f"{1 / speedup:.1f}x slower than" if speedup < 1 else f"only {speedup:.2f}x as fast as"
    return (f"{key}: bf16 on this CPU ({name}, {native} bf16) measured {how} fp32 in a matmul; "
            f"set {fix} to let stillroom pick")

