"""The student's speed and memory switches of a recipe's ``train`` section, checked before training and applied.

- ``train.precision`` (auto | fp32 | bf16 | fp16): fp32 master weights, the forward and backward under bf16 / fp16
  autocast (``TrainingArguments(bf16=..., fp16=...)``); ``auto`` decided by :mod:`stillroom.models.precision`.
- ``train.gradient_checkpointing``: transformers' activation checkpointing (each decoder layer's activations are
  recomputed in the backward pass instead of kept): the same gradients for less memory and ~30% more compute.
- ``train.compile``: ``torch.compile`` of each decoder layer (``nn.Module.compile``: in place, so the state dict,
  the trainer's hook on the base model and ``save_pretrained`` are unchanged; layers share one compiled graph).

:func:`check` refuses what cannot work with one line naming the key and the fix and returns warnings for what
works but is slow; ``teachers[].dtype`` (the online teachers' load dtype) is checked here too.
"""

from __future__ import annotations

import shutil

import torch

from stillroom.errors import ConfigError
from stillroom.models import precision


def student_class(config):
    """The ``AutoModelForCausalLM`` class a student ``config`` loads as (None when transformers has none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def check(recipe, config, device: str | torch.device | None = None) -> list[str]:
    """Validate the recipe's switches against the student ``config`` and the training device; raise
    :class:`ConfigError` for a switch that cannot work, return one-line warnings for one that will be slow."""
    t, warnings = recipe.train, []
    device = torch.device(device) if device is not None else precision.training_device()
    precision.student_precision(t.precision, device)  # fp16 on CPU, bf16 on a GPU without it: refused
    if t.precision == "bf16":
        warnings.append(precision.slow_bf16_warning("train.precision", "train.precision=auto", device))
    for i, spec in enumerate(recipe.teachers):
        if spec.cache is not None:
            continue  # a cached teacher is not run
        if spec.dtype == "bfloat16":
            warnings.append(precision.slow_bf16_warning(f"teachers.{i}.dtype", f"teachers.{i}.dtype=auto", device))
        elif spec.dtype == "float16" and device.type == "cpu":
            warnings.append(f"teachers.{i}.dtype: float16 on CPU runs without fast kernels on most CPUs (14x slower "
                            f"than float32 here in a matmul); set teachers.{i}.dtype=auto")
    if t.gradient_checkpointing:
        cls = student_class(config)
        if not getattr(cls, "supports_gradient_checkpointing", False):
            name = cls.__name__ if cls is not None else type(config).__name__
            raise ConfigError(f"train.gradient_checkpointing: the student ({name}) does not support it in "
                              "transformers; set train.gradient_checkpointing=false")
    if t.compile:
        if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
            raise ConfigError("train.compile: torch.compile is not supported on this Python / platform; "
                              "set train.compile=false")
        if device.type == "cpu":
            if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
                raise ConfigError("train.compile: torch.compile on CPU needs a C++ compiler (c++, g++ or clang++) "
                                  "on PATH; install one (e.g. apt-get install g++) or set train.compile=false")
            warnings.append("train.compile: on CPU it measured slower (0.60-0.85x eager tokens/s on an AMD EPYC, "
                            "docs/benchmarks/compile.md) and its first compile takes minutes; set train.compile=false "
                            "unless you measured a gain on this machine")
    return [w for w in warnings if w]


def training_kwargs(train) -> dict:
    """``TrainingArguments`` keywords for the recipe's ``train`` section: mixed precision and checkpointing."""
    from transformers import TrainingArguments

    p = precision.student_precision(train.precision)
    fields = TrainingArguments.__dataclass_fields__
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {"bf16": p == "bf16", "fp16": p == "fp16", ckpt: train.gradient_checkpointing}


def apply(model: torch.nn.Module, train) -> torch.nn.Module:
    """Compile each decoder layer of ``model`` in place when ``train.compile``; returns ``model``."""
    if train.compile:
        from stillroom.models.cut import decoder_layers
        from stillroom.models.lora import base_model

        for layer in decoder_layers(base_model(model)):
            layer.compile()
    return model


def describe(train) -> str:
    """One line for the run's log: the student's precision and what decided it."""
    p = precision.student_precision(train.precision)
    why = "asked" if train.precision != "auto" else "auto"
    parts = [f"student precision {p} ({why})"]
    if train.gradient_checkpointing:
        parts.append("gradient checkpointing")
    if train.compile:
        parts.append("torch.compile per decoder layer")
    return ", ".join(parts)
