"""Generation: continuing text with a causal LM — token healing for users, sampling for on-policy training.

Contract: a model, its tokenizer and prompts in, text (or token ids) out; no training state.

- ``healing``: :func:`generate` — the prompt exactly as given plus its continuation, token healing on;
- ``rollout``: :func:`sample` — batched, seeded sampling of completions (on-policy distillation) and
  :func:`generate_file` (sequence-level KD data, resumable).
"""

from stillroom.exports import lazy

_EXPORTS = {
    "TokenHealingLogitsProcessor": "stillroom.generation.healing",
    "generate": "stillroom.generation.healing",
    "prepare": "stillroom.generation.healing",
    "Sample": "stillroom.generation.rollout",
    "generate_file": "stillroom.generation.rollout",
    "sample": "stillroom.generation.rollout",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
