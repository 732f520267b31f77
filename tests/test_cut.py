"""Students cut from a teacher: the cut model equals a hand-built model with the same layers (logits), decodes
with its KV cache, and saves/reloads as a normal Hugging Face model; for Llama, Qwen2, Gemma 3 and GPT-2."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from stillroom.errors import ConfigError, ModelError
from stillroom.models.cut import cut_layers

V = 96
FAMILIES = {
    "llama": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2),
    # Qwen2 with sliding-window attention on its upper layers: layer kinds differ along the stack.
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=3),
    # Gemma 3: every 2nd layer global, the others sliding (window 4 < the test's 12 tokens, so it matters).
    "gemma3_text": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, sliding_window=4, sliding_window_pattern=2),
    "gpt2": dict(n_embd=32, n_layer=6, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
KEEP = [0, 3, 5]


def _model(kind: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(kind, vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                               **{**FAMILIES[kind], **over})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _hand_built(kind: str, full, keep: list[int]):
    """An independent reference: a fresh model of len(keep) layers whose state dict is copied key by key."""
    over = {"n_layer" if kind == "gpt2" else "num_hidden_layers": len(keep)}
    if getattr(full.config, "layer_types", None) is not None:
        over["layer_types"] = [full.config.layer_types[i] for i in keep]
    ref = _model(kind, seed=123, **over)
    src = full.state_dict()
    new = {}
    for key in ref.state_dict():
        m = re.match(r"(.*\.(?:layers|h)\.)(\d+)(\..*)", key)
        new[key] = src[f"{m[1]}{keep[int(m[2])]}{m[3]}" if m else key]
    ref.load_state_dict(new, strict=True)
    return ref


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_cut_equals_hand_built_model(kind, tmp_path):
    full = _model(kind)
    ref = _hand_built(kind, full, KEEP)
    cut = cut_layers(full, KEEP)
    assert cut.config.num_hidden_layers == 3
    ids = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
        assert torch.allclose(cut(ids).logits, want, atol=1e-6, rtol=0)

    # KV-cache decoding: each layer writes its own (renumbered) cache slot, so cached greedy decoding equals
    # decoding without a cache, and equals the reference's.
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    with_cache = cut.generate(ids[:1], use_cache=True, **gen)
    assert torch.equal(with_cache, cut.generate(ids[:1], use_cache=False, **gen))
    assert torch.equal(with_cache, ref.generate(ids[:1], use_cache=True, **gen))

    cut.save_pretrained(tmp_path / "cut")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "cut", dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, want, atol=1e-6, rtol=0)


def test_gemma3_layer_types_follow_the_kept_layers():
    full = _model("gemma3_text")
    # Pattern 2 on 6 layers, written out by hand: sliding, global, sliding, global, sliding, global.
    assert full.config.layer_types == ["sliding_attention", "full_attention"] * 3
    cut = cut_layers(full, [0, 3, 4])
    assert cut.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.is_sliding for layer in cut.model.layers] == [True, False, True]
    assert [layer.self_attn.layer_idx for layer in cut.model.layers] == [0, 1, 2]


def test_tied_head_stays_tied():
    full = _model("llama", tie_word_embeddings=True)
    cut = cut_layers(full, [1, 2])
    assert cut.lm_head.weight.data_ptr() == cut.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("layers, match", [([], "empty"), ([0, 6], r"\[6\] out of range.*6 layers"),
                                           ([3, 1], "increasing"), ([2, 2], "distinct")])
def test_bad_layer_lists_are_one_line_errors(layers, match):
    with pytest.raises(ConfigError, match=match) as e:
        cut_layers(_model("llama"), layers)
    assert "\n" not in str(e.value)


def test_gpt2_inverse_layer_scaling_is_refused():
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx"):
        cut_layers(_model("gpt2", scale_attn_by_inverse_layer_idx=True), [0, 1])
