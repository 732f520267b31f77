"""Building the student a recipe asks for: pretrained, re-initialised, cut from a teacher, or from scratch.

The kind is explicit in the recipe (``stillroom.training.recipe.StudentSpec``) and :func:`describe_student` says which one
was built, for the console and the model card — a pretrained student's weights are never silently replaced.
"""

from __future__ import annotations

import torch

from stillroom.models.cut import cut_from
from stillroom.models.loading import load_causal_lm, load_tokenizer, resolve_model
from stillroom.models.lora import add_lora, trainable_parameters


def student_tokenizer(spec):
    """The student's tokenizer: from its model (pretrained, cut) or its tokenizer folder (from scratch)."""
    if spec.kind == "scratch":
        return load_tokenizer(spec.tokenizer, "student.tokenizer", model=False)
    return load_tokenizer(spec.source, "student.init_from" if spec.kind == "cut" else "student.path")


def build_student(spec, tokenizer) -> torch.nn.Module:
    """The float32 student for ``spec`` (a ``StudentSpec``); ``tokenizer`` is the student's (checked to fit).
    With ``spec.lora``, the student wrapped with LoRA adapters (:func:`stillroom.models.lora.add_lora`)."""
    model = _build(spec, tokenizer)
    lora = getattr(spec, "lora", None)
    if lora is None:
        return model
    return add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


def _build(spec, tokenizer) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.kind == "pretrained":
        return load_causal_lm(spec.path, "student.path", tokenizer=tokenizer)
    if spec.kind == "reinit":
        config = AutoConfig.from_pretrained(resolve_model(spec.path, "student.path"))
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if spec.kind == "cut":
        return cut_from(spec.init_from, spec.layers)  # its own tokenizer: fits by construction
    cfg = dict(spec.config)
    kind = cfg.pop("model_type")
    cfg.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, key, None) is not None:
            cfg.setdefault(key, getattr(tokenizer, key))
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **cfg), dtype=torch.float32)


def describe_student(spec, model: torch.nn.Module | None = None) -> str:
    """One sentence naming the student's kind and origin (and its size when ``model`` is given)."""
    size = ""
    if model is not None:
        n = sum(p.numel() for p in model.parameters())
        size = f" ({n / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers)"
    lora = getattr(spec, "lora", None)
    if lora is not None and model is not None:
        trainable, total = trainable_parameters(model)
        size += f"; LoRA r={lora.r} on {lora.target_modules}: {trainable / 1e6:.2f}M of {total / 1e6:.1f}M train"
    if spec.kind == "pretrained":
        return f"pretrained student: weights from `{spec.path}`{size}"
    if spec.kind == "reinit":
        return f"re-initialised student: the architecture of `{spec.path}` with fresh weights{size}"
    if spec.kind == "cut":
        return f"student cut from `{spec.init_from}`: its decoder layers {list(spec.layers)}, embeddings and head{size}"
    return f"student built from scratch: {spec.config} with the tokenizer in `{spec.tokenizer}`{size}"
