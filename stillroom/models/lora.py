"""LoRA students: only low-rank adapters train, the student's own weights stay as they were (``peft``).

LoRA (Hu et al. 2021) replaces a frozen linear map ``W`` by ``W + (α / r) · B A`` with ``A ∈ R^{r×in}`` (random)
and ``B ∈ R^{out×r}`` (zeros, so training starts from the student exactly). :func:`add_lora` wraps a student in a
``peft`` model (any student kind: pretrained, cut, from scratch); :func:`merge_lora` folds the adapters back into
plain weights, so what a run saves loads anywhere a Hugging Face model does. ``peft`` is imported here only:
install it with ``pip install 'stillroom[lora]'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stillroom.errors import ConfigError


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("student.lora: LoRA students need the peft package; pip install 'stillroom[lora]' "
                          "(or pip install peft)") from None
    return peft


def add_lora(model: torch.nn.Module, *, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
             target_modules: Sequence[str] | str = "all-linear") -> torch.nn.Module:
    """``model`` wrapped with LoRA adapters of rank ``r`` and scale ``alpha / r`` on ``target_modules`` (module
    names such as ``["q_proj", "v_proj"]``, or ``"all-linear"``: every linear layer but the head). Only the
    adapters require gradients; the base weights are frozen and unchanged."""
    peft = _peft()
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = peft.LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout),
                             target_modules=targets, task_type="CAUSAL_LM", bias="none")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module the model does not have
        first = str(e).splitlines()[0].rstrip(". ")
        raise ConfigError(f"student.lora.target_modules: {first}; name modules the student has (e.g. q_proj, "
                          "v_proj for Llama, c_attn for GPT-2) or use all-linear") from None


def is_lora(model: torch.nn.Module) -> bool:
    """Is ``model`` a ``peft`` model carrying adapters?"""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face causal LM inside a LoRA student (``model`` itself otherwise)."""
    return model.get_base_model() if is_lora(model) else model


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A plain Hugging Face model with the adapters folded into its weights (``W + (α / r) · B A``); ``model``
    unchanged when it has no adapters. The merge works on a copy: the trained adapter model stays usable."""
    if not is_lora(model):
        return model
    import copy

    return copy.deepcopy(model).merge_and_unload()


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
