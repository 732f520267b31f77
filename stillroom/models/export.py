"""A trained student written as one GGUF file, llama.cpp's format, with its tokenizer and chat template.

Students are run where small models run: llama.cpp and the tools built on it read GGUF. :func:`export_gguf`
writes a Hugging Face causal LM folder (a run's output: LoRA runs save the merged model) with the ``gguf``
package: the architecture's metadata, every tensor under llama.cpp's name, and the tokenizer (its tokens, merges,
token kinds, special ids and chat template) so the file needs nothing beside it. Llama's query and key rows are
reordered as llama.cpp expects for its rotary layout (``w.reshape(heads, 2, d/2, in).swapaxes(1, 2)``; readers
undo it). Norms and other 1-D tensors stay float32; 2-D weights are ``f32``, ``f16`` or ``q8_0`` (blocks of 32
values with one scale; rows whose length is not a multiple of 32 stay f16).

Families: Llama (SmolLM2 and the students cut from it) and Qwen2, with a byte-level BPE tokenizer whose
pre-tokenizer llama.cpp knows by name (GPT-2's, Llama 3's, Qwen2's); others are refused in one line naming what
is supported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from stillroom.errors import ConfigError
from stillroom.files import atomic_write, check_output_file
from stillroom.models.loading import load_causal_lm, load_tokenizer, model_context, resolve_model
from stillroom.progress import bar

DTYPES = ("f32", "f16", "q8_0")
SUPPORTED = ("llama", "qwen2")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Llama's q/k rows in llama.cpp's rotary order (the inverse of what GGUF readers apply)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_tensors(state: dict, config, arch: str = "llama") -> list[tuple[str, np.ndarray]]:
    """``(gguf name, float32 array)`` of every tensor of a Llama or Qwen2 state dict; ``output.weight`` only
    when the head is not tied to the embedding. Llama's q/k rows are permuted (llama.cpp ropes Llama in
    interleaved pairs); Qwen2 keeps them (llama.cpp ropes it in halves, as transformers) and adds the q/k/v
    biases."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    permute = arch == "llama"
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    out = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        for hf, gg in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if permute and gg == "attn_q":
                w = _permute(w, heads)
            elif permute and gg == "attn_k":
                w = _permute(w, kv)
            out.append((f"blk.{i}.{gg}.weight", w))
            bias = state.get(f"model.layers.{i}.{hf}.bias")
            if bias is not None:
                if permute and gg in ("attn_q", "attn_k"):
                    bias = _permute(bias, heads if gg == "attn_q" else kv)
                out.append((f"blk.{i}.{gg}.bias", bias))
    out.append(("output_norm.weight", state["model.norm.weight"]))
    if not getattr(config, "tie_word_embeddings", False):
        out.append(("output.weight", state["lm_head.weight"]))
    return out


def _byte_level_bpe(folder: Path) -> dict:
    """The folder's ``tokenizer.json``, checked to be a byte-level BPE tokenizer (the one kind exported)."""
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or not any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(spec)):
        raise ConfigError(f"--model {folder}: export supports byte-level BPE tokenizers in a tokenizer.json (GPT-2, "
                          "SmolLM2, Llama 3 style); this one is not")
    return spec


def _tokenizer_metadata(writer, tokenizer, spec: dict) -> None:
    """Tokens (in id order), merges, kinds, special ids and chat template of a byte-level BPE tokenizer."""
    model = spec["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab.update({text: t["id"] for text, t in added.items()})
    size = max(vocab.values()) + 1
    tokens, kinds = [f"[PAD{i}]" for i in range(size)], [5] * size  # unused ids: llama.cpp's "unused" kind
    for text, i in vocab.items():
        tokens[i] = text
        kinds[i] = (3 if added[text].get("special", False) else 4) if text in added else 1  # control / user / normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(spec))
    probe = "Hello world"
    plain, full = tokenizer(probe, add_special_tokens=False)["input_ids"], tokenizer(probe)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_add_bos_token(bool(len(full) > len(plain) and full[0] == bos))  # llama.cpp adds what HF adds
    writer.add_add_eos_token(bool(len(full) > len(plain) and full[-1] == eos and full[:len(plain)] == plain))
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


#: llama.cpp's names for the pre-tokenizer regexes it implements, keyed by the tokenizer.json Split pattern
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _pre_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's regex (a ByteLevel that splits) or one of
    the Split patterns it knows; anything else is refused rather than tokenized differently by llama.cpp."""
    pres = _pre_tokenizers(spec)
    if len(pres) == 1 and pres[0].get("use_regex", True):
        return "gpt-2"
    splits = [p for p in pres if p.get("type") == "Split"]
    if len(pres) == 2 and len(splits) == 1 and not pres[1].get("use_regex", True):
        name = _SPLITS.get(splits[0].get("pattern", {}).get("Regex", ""))
        if name:
            return name
    raise ConfigError("export: this tokenizer's pre-tokenizer is none llama.cpp knows by name (GPT-2's, Llama 3's, "
                      "Qwen2's); llama.cpp would split text differently, so it is not exported")


def _pre_tokenizers(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre else []


def _encode(w: np.ndarray, dtype: str):
    """The array to write and its GGUF type for a 2-D weight in ``dtype``."""
    import gguf

    if dtype == "f32" or w.ndim < 2:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and w.shape[-1] % 32 == 0:
        return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return w.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "f16",
                overwrite: bool = False, progress: bool = True) -> Path:
    """Write the causal LM in ``model_dir`` (a Hugging Face folder: a run's output) as the GGUF file ``out``;
    returns ``out``. ``dtype``: ``f32``, ``f16`` or ``q8_0`` for the 2-D weights. An existing ``out`` is kept
    unless ``overwrite``; the file appears whole or not at all."""
    import gguf

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}; pick one of those")
    out = check_output_file(out, "--gguf", overwrite=overwrite)
    from transformers import AutoConfig

    folder = resolve_model(model_dir, "--model")  # cheap checks first: folder, config, tokenizer; then the weights
    arch = AutoConfig.from_pretrained(folder, trust_remote_code=False).model_type
    if arch not in SUPPORTED:
        raise ConfigError(f"--model {folder}: export supports {', '.join(SUPPORTED)} students (SmolLM2, Qwen2 and "
                          f"the students cut from them); this one is {arch!r}")
    spec = _byte_level_bpe(folder)
    tokenizer = load_tokenizer(folder, "--model")
    model = load_causal_lm(folder, "--model", tokenizer=tokenizer)
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = llama_tensors(state, config, arch)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(folder.name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_context_length(model_context(config, default=2048))
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta",
                                                                                                10000.0)
        w.add_rope_freq_base(float(theta))
        w.add_vocab_size(config.vocab_size)
        _tokenizer_metadata(w, tokenizer, spec)
        with bar(enabled=progress, transient=True) as shown:
            task = shown.add_task(f"export {folder.name} ({dtype})", total=len(tensors))
            for name, t in tensors:
                data, kind = _encode(t, dtype)
                w.add_tensor(name, data, raw_dtype=kind)
                shown.advance(task)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(out, write)
