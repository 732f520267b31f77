"""The model families stillroom writes as GGUF: each one's hyper-parameters and tensors under llama.cpp's names.

One :class:`Family` per Hugging Face ``model_type``: ``check`` refuses a config llama.cpp would run differently
(one line naming the field), ``hparams`` writes the architecture's metadata, ``tensors`` yields ``(gguf name,
float32 array)`` in llama.cpp's layout. What each family needs beyond renaming:

- Llama (SmolLM2 and the students cut from it): q/k rows reordered for llama.cpp's interleaved rotary pairs,
  ``w.reshape(heads, 2, d/2, in).swapaxes(1, 2)`` (GGUF readers undo it);
- Qwen2: q/k/v biases, no reordering (llama.cpp ropes Qwen2 in halves, as transformers);
- Gemma 3: RMSNorm weights stored as 1 + w (transformers computes ``x · (1 + w)``, llama.cpp ``x · w``); per-layer
  sliding windows as a boolean array; rotary bases for the global and the sliding layers;
- GPT-2: ``Conv1D`` weights are [in, out], transposed to [out, in]; learned positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stillroom.errors import ConfigError
from stillroom.models.loading import model_context


@dataclass(frozen=True)
class Family:
    arch: str  # llama.cpp's architecture name
    hparams: Callable[[object, object], None]  # (writer, config)
    tensors: Callable[[dict, object], list[tuple[str, np.ndarray]]]  # (state dict as numpy, config)
    check: Callable[[object], str | None] = lambda config: None  # a reason to refuse, or None


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q/k rows in llama.cpp's rotary order (the inverse of what GGUF readers apply)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _theta(config, layer_type: str | None = None, default: float = 10000.0) -> float:
    """The rotary base of ``layer_type``'s layers (transformers 5 keys ``rope_parameters`` by layer type when
    they differ) or of all layers."""
    rp = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    return float(rp.get("rope_theta") or getattr(config, "rope_theta", None) or default)


def _common(w, config, context_default: int = 2048) -> None:
    w.add_context_length(model_context(config, default=context_default))
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))


# --- Llama / Qwen2 -------------------------------------------------------------------------------------------

_LLAMA_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


def llama_tensors(state: dict, config, permute: bool = True) -> list[tuple[str, np.ndarray]]:
    """Every tensor of a Llama (``permute``) or Qwen2 state dict; ``output.weight`` only for an untied head."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf, gg in _LLAMA_NAMES.items():
            for part in ("weight", "bias"):
                t = state.get(f"model.layers.{i}.{hf}.{part}")
                if t is None:
                    continue
                if permute and gg in ("attn_q", "attn_k"):
                    t = _permute(t, heads if gg == "attn_q" else kv)
                out.append((f"blk.{i}.{gg}.{part}", t))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not _tied(config):
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _llama_hparams(w, config) -> None:
    _common(w, config)
    w.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    w.add_rope_freq_base(_theta(config))


# --- Gemma 3 -------------------------------------------------------------------------------------------------

_GEMMA_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "post_feedforward_layernorm": "post_ffw_norm"}


def gemma3_tensors(state: dict, config) -> list[tuple[str, np.ndarray]]:
    """Every tensor of a Gemma 3 text state dict; each RMSNorm weight w written as 1 + w."""
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf, gg in _GEMMA_NAMES.items():
            t = state[f"model.layers.{i}.{hf}.weight"]
            out.append((f"blk.{i}.{gg}.weight", t + 1.0 if gg.endswith("norm") else t))
    out.append(("output_norm.weight", state["model.norm.weight"] + 1.0))
    if not _tied(config):
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _gemma3_layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types is None:
        pattern = getattr(config, "sliding_window_pattern", None) or getattr(config, "_sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(config.num_hidden_layers)]
    return list(types)


def _gemma3_check(config) -> str | None:
    head_dim = config.head_dim
    scale = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    if config.query_pre_attn_scalar != scale:  # llama.cpp scales queries by 1/sqrt of this, fixed
        return f"query_pre_attn_scalar = {config.query_pre_attn_scalar} (llama.cpp uses {scale})"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attn_logit_softcapping is set (llama.cpp's Gemma 3 has none)"
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return f"hidden_activation = {config.hidden_activation!r} (llama.cpp uses gelu_pytorch_tanh)"
    rp = getattr(config, "rope_parameters", None) or {}
    kinds = {v.get("rope_type", "default") for v in rp.values() if isinstance(v, dict)} or {rp.get("rope_type",
                                                                                                  "default")}
    if kinds - {"default", None}:
        return f"rope_parameters rope_type {sorted(kinds)} (exported: default rotary embeddings only)"
    return None


def _gemma3_hparams(w, config) -> None:
    _common(w, config, context_default=32768)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_freq_base(_theta(config, "full_attention", 1_000_000.0))
    types = _gemma3_layer_types(config)
    if "sliding_attention" in types and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])  # per layer: llama.cpp reads it
        w.add_rope_freq_base_swa(_theta(config, "sliding_attention", 10000.0))
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        w.add_final_logit_softcapping(float(softcap))


# --- GPT-2 ---------------------------------------------------------------------------------------------------

_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gpt2_tensors(state: dict, config) -> list[tuple[str, np.ndarray]]:
    """Every tensor of a GPT-2 state dict; ``Conv1D`` weights ([in, out]) transposed to llama.cpp's [out, in]."""
    out = [("token_embd.weight", state["transformer.wte.weight"]),
           ("position_embd.weight", state["transformer.wpe.weight"])]
    for i in range(config.n_layer):
        for hf, gg in _GPT2_NAMES.items():
            weight = state[f"transformer.h.{i}.{hf}.weight"]
            out.append((f"blk.{i}.{gg}.weight", weight if hf.startswith("ln") else weight.T.copy()))
            out.append((f"blk.{i}.{gg}.bias", state[f"transformer.h.{i}.{hf}.bias"]))
    out += [("output_norm.weight", state["transformer.ln_f.weight"]),
            ("output_norm.bias", state["transformer.ln_f.bias"])]
    if not _tied(config):
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _gpt2_check(config) -> str | None:
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        return f"activation_function = {config.activation_function!r} (llama.cpp's GPT-2 uses gelu_new)"
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
        return "a non-default attention scaling (scale_attn_by_inverse_layer_idx / scale_attn_weights)"
    return None


def _gpt2_hparams(w, config) -> None:
    w.add_context_length(config.n_positions)
    w.add_embedding_length(config.n_embd)
    w.add_block_count(config.n_layer)
    w.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    w.add_head_count(config.n_head)
    w.add_layer_norm_eps(float(config.layer_norm_epsilon))


FAMILIES = {
    "llama": Family("llama", _llama_hparams, llama_tensors),
    "qwen2": Family("qwen2", _llama_hparams, lambda s, c: llama_tensors(s, c, permute=False)),
    "gemma3_text": Family("gemma3", _gemma3_hparams, gemma3_tensors, _gemma3_check),
    "gpt2": Family("gpt2", _gpt2_hparams, gpt2_tensors, _gpt2_check),
}


def family(model_type: str, config, option: str = "--model") -> Family:
    """The family of ``model_type``, checked against what llama.cpp runs the same; else a one-line refusal."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise ConfigError(f"{option}: export supports {', '.join(FAMILIES)} students (SmolLM2, Qwen2, Gemma 3, GPT-2 "
                          f"and the students cut from them); this one is {model_type!r}")
    reason = fam.check(config)
    if reason:
        raise ConfigError(f"{option}: this {model_type} student has {reason}; llama.cpp would compute another "
                          "model, so it is not exported")
    return fam
