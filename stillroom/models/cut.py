"""A student cut from a teacher: keep some of its decoder layers, with its embeddings, final norm and head.

The seed of KD for generation (the small model starts from the large model's parameters): the student is the
teacher with only the chosen layers, renumbered 0..n-1. Renumbering matters: a layer's ``layer_idx`` indexes the
KV cache (a kept layer 12 must write slot 2, not 12), and families that mix attention kinds (Gemma 3 alternates
sliding-window and global layers, Qwen2 may too) keep each layer's own kind, so ``config.layer_types`` is cut the
same way. Supported: Llama (and Mistral-like), Qwen2, Gemma 3 (text) and GPT-2 layouts.
"""

from __future__ import annotations

import torch

from stillroom.errors import ConfigError, ModelError
from stillroom.models.loading import load_causal_lm


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (``model.layers`` for Llama/Qwen2/Gemma 3, ``transformer.h`` for GPT-2)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("layers", "h"):
        stack = getattr(base, name, None)
        if isinstance(stack, torch.nn.ModuleList):
            return stack
    raise ModelError(f"cut: {type(model).__name__} has no decoder layer list (model.layers or transformer.h); "
                     "cutting supports Llama, Qwen2, Gemma 3 and GPT-2 style models")


def check_layers(layers: list[int], n: int) -> list[int]:
    """``layers`` as a list of distinct, increasing indices in ``[0, n)``, else a one-line :class:`ConfigError`."""
    layers = [int(i) for i in layers]
    if not layers:
        raise ConfigError(f"student.layers: empty; list the teacher layers to keep, e.g. [0, {n - 1}]")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"student.layers: {bad} out of range; the model has {n} layers (0..{n - 1})")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ConfigError(f"student.layers: {layers} must be distinct and increasing (the kept layers run in order)")
    return layers


@torch.no_grad()
def cut_layers(model: torch.nn.Module, layers: list[int]) -> torch.nn.Module:
    """Keep only decoder ``layers`` (in place; returns ``model``), renumbering their per-layer state.

    Embeddings, final norm, positional tables and the LM head stay as they are (a tied head stays tied). The
    config follows: ``num_hidden_layers = len(layers)`` and ``layer_types[j] = layer_types[layers[j]]``.
    """
    config = model.config
    stack = decoder_layers(model)
    layers = check_layers(layers, len(stack))
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ModelError("cut: this GPT-2 config scales attention by 1/(layer_idx+1), so a renumbered layer would "
                         "compute something else; cut a model with scale_attn_by_inverse_layer_idx=false")
    kept = [stack[i] for i in layers]
    for j, layer in enumerate(kept):
        for module in layer.modules():  # the layer itself (Gemma 3) and its attention keep a layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = j
    stack_owner = model.get_decoder() if hasattr(model, "get_decoder") else model
    name = "layers" if getattr(stack_owner, "layers", None) is stack else "h"
    setattr(stack_owner, name, torch.nn.ModuleList(kept))
    types = getattr(config, "layer_types", None)
    if types is not None:
        config.layer_types = [types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model


def cut_from(path, layers: list[int], dtype: torch.dtype = torch.float32, what: str = "student.init_from"):
    """Load the model at ``path`` (a folder or ``.gguf`` file, through :mod:`stillroom.models.loading`) and cut it."""
    return cut_layers(load_causal_lm(path, what, dtype=dtype), layers)
