"""Loading models as users have them, refusing the ones that would silently produce garbage.

Every verb and recipe that takes a model goes through :func:`resolve_model` → :func:`load_tokenizer` /
:func:`load_causal_lm`. A ``.gguf`` file (llama.cpp's format) is accepted anywhere a folder is: it is converted
once — dequantised to float32 by transformers, saved as safetensors with its tokenizer — into a folder of the
model cache, named for the model or keyed by the file's sha256 (:func:`gguf_folder`), and that folder is used from then on. A folder must hold ``config.json``, safetensors weights (pickle ``.bin`` files are refused)
and tokenizer files; a tokenizer with more ids than the model's embedding, or with (almost) no vocabulary — what
transformers 5 quietly builds when a folder has no tokenizer files — is refused too, with one line naming the
folder and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from stillroom import files
from stillroom.errors import ConfigError, MissingPathError, ModelError
from stillroom.progress import spinner

# Files from which transformers can build a tokenizer (fast JSON, SentencePiece, GPT-2 BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tokenizer.tiktoken")


def resolve_model(path: str | os.PathLike, what: str = "model", *, weights: bool = True,
                  tokenizer: bool = True) -> Path:
    """The Hugging Face folder for ``path`` (a folder, or a ``.gguf`` file converted once by :func:`gguf_folder`),
    checked by :func:`check_model_dir`."""
    p = Path(os.path.expanduser(str(path)))
    if p.suffix.lower() == ".gguf" and p.is_file():
        p = gguf_folder(p, what)
    return check_model_dir(p, what, weights=weights, tokenizer=tokenizer)


def is_model_path(path: str | os.PathLike) -> bool:
    """``path`` is something :func:`resolve_model` may accept: a folder with ``config.json`` or a ``.gguf`` file
    (a cheap check for recipe validation; loading checks the rest)."""
    p = Path(os.path.expanduser(str(path)))
    return (p / "config.json").is_file() or (p.suffix.lower() == ".gguf" and p.is_file())


# --- GGUF -----------------------------------------------------------------------------------------------------

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (memoised per path, size and mtime within the process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def gguf_folder(path: str | os.PathLike, what: str = "model", cache_dir: str | os.PathLike | None = None,
                progress: bool = True, name: str | None = None) -> Path:
    """The safetensors Hugging Face folder converted from the GGUF file ``path``, converting it on first use.

    The folder is ``<cache>/<name>`` for a named model (``stillroom models get``: tables then read
    ``smollm2-135m-instruct``), else ``<cache>/gguf-<first 16 hex of sha256>``: the same bytes under another file
    name reuse it, a changed file gets a new one (a named folder holding other bytes is converted again). Conversion (transformers' GGUF reader: dequantise every tensor to float32, rebuild the
    tokenizer from the file's metadata) is written to a temporary folder and renamed into place, so an interrupted
    run leaves no half-written model behind.
    """
    src = Path(os.path.expanduser(str(path)))
    if not src.is_file():
        raise MissingPathError(f"{what} {src} does not exist; pass a .gguf file or a model folder")
    root = Path(cache_dir) if cache_dir is not None else files.cache_dir("models")
    sha = file_sha256(src)
    folder = root / (name or f"gguf-{sha[:16]}")
    if converted_from(folder) == sha:
        return folder
    hashed = root / f"gguf-{sha[:16]}"
    if name and converted_from(hashed) == sha and not folder.exists():  # converted before folders had names
        os.replace(hashed, folder)
        return folder
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ModelError(f"{what} {src}: reading GGUF files needs the gguf package; pip install gguf") from None
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{sha[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        with spinner(f"converting {src.name} to safetensors (dequantising to float32)", progress):
            _convert_gguf(src, tmp)
        (tmp / "stillroom-gguf.json").write_text(json.dumps(
            {"source": str(src), "sha256": sha, "bytes": src.stat().st_size,
             "seconds": round(time.perf_counter() - t0, 1)}, indent=1) + "\n", encoding="utf-8")
        if folder.exists() and converted_from(folder) != sha:  # a named folder from other bytes: replaced
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted the same file first: keep its folder
            if converted_from(folder) != sha:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def converted_from(folder: Path) -> str | None:
    """The sha256 of the GGUF file ``folder`` was converted from (None: not a finished conversion)."""
    try:
        return json.loads((folder / "stillroom-gguf.json").read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError):
        return None


def gguf_tokenizer(src: Path):
    """The tokenizer in a GGUF file's metadata (transformers' GGUF reader; the weights are not read)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)


def _convert_gguf(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        tok = gguf_tokenizer(src)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    except Exception as e:  # unsupported architecture or quantisation, truncated file: all mean "unusable"
        raise ModelError(f"model {src}: transformers cannot convert this GGUF file ({_first_line(e)}); "
                         "use a GGUF of a supported architecture (llama, qwen2, gemma3, gpt2, ...) or a "
                         "model folder") from None
    # Every weight is a plain float32 tensor now; drop the GGUF quantizer so the model saves as an ordinary one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def has_safetensors(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file() or any(
        folder.glob("*.safetensors"))


def check_model_dir(path: str | os.PathLike, what: str = "model", *, weights: bool = True,
                    tokenizer: bool = True) -> Path:
    """``path`` as a usable model folder, else a :class:`ModelError` naming what is missing and what to do.
    A ``.gguf`` file passes as it is: :func:`resolve_model` converts (and checks) it when it is loaded."""
    p = Path(os.path.expanduser(str(path)))
    if p.suffix.lower() == ".gguf" and p.is_file():
        return p
    if not p.exists():
        raise MissingPathError(f"{what} {p} does not exist; pass a folder saved with save_pretrained")
    if not p.is_dir():
        raise ModelError(f"{what} {p} is a file, not a model folder; pass the folder saved with save_pretrained (or a .gguf file)")
    if not (p / "config.json").is_file():
        raise ModelError(f"{what} {p} has no config.json; pass a folder saved with save_pretrained")
    if weights and not has_safetensors(p):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise ModelError(f"{what} {p} has only pickle weights (.bin/.pt), which stillroom does not load; "
                             "re-save it with save_pretrained(..., safe_serialization=True)")
        raise ModelError(f"{what} {p} has no model.safetensors; save the model there with save_pretrained")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{what} {p} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
                         "save the tokenizer there too: tokenizer.save_pretrained(folder)")
    return p


def load_tokenizer(path: str | os.PathLike, what: str = "model", *, model: bool = True):
    """The folder's tokenizer (offline-friendly, no remote code); refuses empty or unloadable ones.
    ``model=False`` accepts a tokenizer-only folder (no config.json, no weights) or reads a ``.gguf`` file's
    tokenizer alone (its weights are neither read nor converted: a served teacher's GGUF may be 40 GB)."""
    from transformers import AutoTokenizer

    if not model and Path(path).suffix.lower() == ".gguf" and Path(path).is_file():
        try:
            return gguf_tokenizer(Path(path))
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means the same to the user
            raise ModelError(f"{what} {path}: its tokenizer does not load from the GGUF metadata ({_first_line(e)}); "
                             "give the teacher's tokenizer folder instead") from None
    if model:
        folder = resolve_model(path, what, weights=False)
    else:
        folder = Path(path)
        if not folder.is_dir():
            raise MissingPathError(f"{what} {folder} is not a folder; pass a tokenizer folder (tokenizer.json, ...)")
        if not any((folder / f).is_file() for f in TOKENIZER_FILES):
            raise ModelError(f"{what} {folder} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, "
                             "...); save one there with tokenizer.save_pretrained(folder)")
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise ModelError(f"{what} {folder}: its tokenizer does not load ({_first_line(e)}); re-save it with "
                         "tokenizer.save_pretrained(folder)") from None
    if len(tok) < 2:
        raise ModelError(f"{what} {folder}: its tokenizer has {len(tok)} token(s); save the real tokenizer "
                         "there with tokenizer.save_pretrained(folder)")
    return tok


def check_vocab_fits(model_or_config, tokenizer, what: str = "model") -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    config = getattr(model_or_config, "config", model_or_config)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > int(vocab):
        raise ModelError(f"{what}: the tokenizer has {len(tokenizer):,} ids but the model's vocab_size is "
                         f"{int(vocab):,}; they do not belong together (save the model's own tokenizer with it)")


def load_causal_lm(path: str | os.PathLike, what: str = "model", *, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = None, tokenizer=None):
    """``AutoModelForCausalLM`` from a checked folder: safetensors only, no remote code; loading errors (corrupt
    weights, unknown architecture) become one-line :class:`ModelError`\\ s. With ``tokenizer``, checks it fits."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(path, what, tokenizer=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except Exception as e:  # safetensors, OSError, ValueError, KeyError: all mean "unusable"
        raise ModelError(f"{what} {folder}: the model does not load ({_first_line(e)}); check that its "
                         "config.json and safetensors weights are complete (re-save with save_pretrained)") from None
    if tokenizer is not None:
        check_vocab_fits(model, tokenizer, f"{what} {folder}")
    if device is not None:
        model = model.to(device)
    return model


def model_context(model_or_config, default: int | None = None) -> int | None:
    """The longest sequence a model's position embeddings allow, from the model or its config (its text config
    for multimodal ones): ``max_position_embeddings`` / ``n_positions`` / ``n_ctx`` / ``seq_length``; ``default``
    when the config does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return int(value)
    return default


def check_device(device: str | torch.device | None, option: str = "--device") -> torch.device | None:
    """``device`` parsed and present on this machine, else a :class:`ConfigError` saying which to use."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{option} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device}: this machine has no usable CUDA GPU; use {option} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) here; "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type not in ("cpu", "mps"):
        raise ConfigError(f"{option} {device!r}: stillroom runs on cpu or cuda; use one of those")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")
    return dev


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
