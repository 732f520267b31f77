"""Model-level helpers shared by teachers and the trainer: equivalent fast activations, frozen teachers that run
in their own dtype.

GPT-2-style models compute the tanh-approximate GELU, ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``, as five
Python-level tensor ops (transformers' ``NewGELUActivation`` / ``FastGELUActivation``), and autograd records
each of them. PyTorch has one fused kernel for the same formula (``F.gelu(x, approximate="tanh")``, wrapped by
transformers as ``GELUTanh``, which it documents as equivalent and much faster); outputs agree to float
rounding (~1e-6), and autograd records one op instead of five.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


def fast_activations(model: torch.nn.Module) -> int:
    """Swap Python-level tanh-GELU modules of ``model`` for the fused kernel, in place; returns how many.

    The model's config is untouched, so ``save_pretrained`` writes the same architecture and weights."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Does ``model.forward`` take a keyword ``name``? (transformers' forward arguments differ by version and
    model: ``logits_to_keep``, the KV cache's ``cache`` / ``past_key_values``.)"""
    import inspect

    return name in inspect.signature(model.forward).parameters


def freeze_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` an inference-only teacher, in place: eval mode, no gradients, fast activations."""
    model.eval().requires_grad_(False)
    fast_activations(model)
    return model


@contextmanager
def frozen():
    """``torch.no_grad`` with autocast off: a teacher runs in its own dtype (``teachers[].dtype``) even inside the
    student's bf16 / fp16 autocast (``train.precision``), which would otherwise lower an fp32 teacher's matmuls."""
    gpu = torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else nullcontext()
    with torch.no_grad(), torch.autocast("cpu", enabled=False), gpu:
        yield
