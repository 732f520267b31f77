"""A trained student written as one GGUF file, llama.cpp's format, with its tokenizer and chat template.

Students are run where small models run: llama.cpp and the tools built on it read GGUF. :func:`export_gguf`
writes a Hugging Face causal LM folder (a run's output: LoRA runs save the merged model) with the ``gguf``
package: the architecture's metadata and every tensor under llama.cpp's name (:mod:`stillroom.models.gguf_arch`:
Llama/SmolLM2, Qwen2, Gemma 3, GPT-2) and the tokenizer (:mod:`stillroom.models.gguf_vocab`: byte-level BPE or
SentencePiece-style BPE, with special ids and chat template) so the file needs nothing beside it. Norms and
other 1-D tensors stay float32; 2-D weights are ``f32``, ``f16`` or ``q8_0`` (blocks of 32 values with one scale;
rows whose length is not a multiple of 32 stay f16). Anything else is refused in one line naming what is
supported.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stillroom.errors import ConfigError
from stillroom.files import atomic_write, check_output_file
from stillroom.models.gguf_arch import family
from stillroom.models.gguf_vocab import read_spec, write_tokenizer
from stillroom.models.loading import load_causal_lm, load_tokenizer, resolve_model
from stillroom.progress import bar

DTYPES = ("f32", "f16", "q8_0")


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
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    fam = family(config.model_type, config, f"--model {folder}")
    kind, spec = read_spec(folder)
    tokenizer = load_tokenizer(folder, "--model")
    model = load_causal_lm(folder, "--model", tokenizer=tokenizer)
    config = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = fam.tensors(state, config)
    n_vocab = tensors[0][1].shape[0]  # the embedding's rows: llama.cpp wants one token per row

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        w.add_name(folder.name)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        fam.hparams(w, config)
        w.add_vocab_size(n_vocab)
        write_tokenizer(w, tokenizer, kind, spec, n_vocab)
        with bar(enabled=progress, transient=True) as shown:
            task = shown.add_task(f"export {folder.name} ({dtype})", total=len(tensors))
            for name, t in tensors:
                data, gtype = _encode(t, dtype)
                w.add_tensor(name, data, raw_dtype=gtype)
                shown.advance(task)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(out, write)
