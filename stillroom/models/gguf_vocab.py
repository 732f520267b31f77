"""A Hugging Face tokenizer written into a GGUF file as llama.cpp reads it back.

llama.cpp tokenizes with its own code, so the file must describe the tokenizer in llama.cpp's terms or text
comes out as other ids. Two kinds are written, both from the folder's ``tokenizer.json``:

- **byte-level BPE** (GPT-2, SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = gpt2``, tokens, merges, and the
  pre-tokenizer under the name llama.cpp implements its regex by (``gpt-2``, ``llama-bpe``, ``qwen2``);
  a split llama.cpp does not know is refused.
- **SentencePiece-style BPE** (Gemma 3, Llama 2 / Mistral: ``▁`` for spaces, ``<0xNN>`` byte fallback):
  ``tokenizer.ggml.model = llama``. llama.cpp merges by *score* (the adjacent pair whose joined text is the
  vocabulary entry of highest score goes first) where Hugging Face merges by *rank* of the pair; a token made by
  merge r scores −r, so both merge in the same order. Whether a space is put before the text
  (``add_space_prefix``) follows the normalizer's ``Prepend("▁")``.

Token kinds follow llama.cpp's enum: 1 normal, 3 control (special added tokens), 4 user-defined (other added
tokens, split out before merging by both), 5 unused (ids no token holds), 6 byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stillroom.errors import ConfigError

NORMAL, CONTROL, USER, UNUSED, BYTE = 1, 3, 4, 5, 6
_BYTE = re.compile(r"^<0x[0-9A-F]{2}>$")

#: llama.cpp's names for the pre-tokenizer regexes it implements, keyed by the tokenizer.json Split pattern
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def read_spec(folder: Path) -> tuple[str, dict]:
    """``(kind, tokenizer.json)`` of the folder: kind ``byte_bpe`` or ``spm_bpe``; anything else is refused."""
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = spec.get("model", {})
    if model.get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in _pre_tokenizers(spec)):
        return "byte_bpe", spec
    if model.get("type") == "BPE" and model.get("byte_fallback") and _spaces_as_metaspace(spec):
        return "spm_bpe", spec
    raise ConfigError(f"--model {folder}: export supports BPE tokenizers in a tokenizer.json, byte-level (GPT-2, "
                      "SmolLM2, Llama 3, Qwen2 style) or SentencePiece-style with byte fallback (Gemma 3, Llama 2 "
                      "style); this one is neither")


def _normalizers(spec: dict) -> list[dict]:
    norm = spec.get("normalizer") or {}
    return norm.get("normalizers", [norm]) if norm else []


def _spaces_as_metaspace(spec: dict) -> bool:
    """Spaces become ``▁`` in the normalizer and nothing else splits the text (what llama.cpp's SPM path does)."""
    replace = any(n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == "▁"
                  for n in _normalizers(spec))
    others = [n for n in _normalizers(spec) if n.get("type") not in ("Replace", "Prepend")]
    pres = _pre_tokenizers(spec)
    # Gemma's pre-tokenizer splits on " ", which the normalizer has already replaced: a no-op
    inert = all(p.get("type") == "Split" and p.get("pattern", {}).get("String") == " " for p in pres)
    return replace and not others and inert


def _pre_tokenizers(spec: dict) -> list[dict]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", [pre]) if pre else []


def pre_name(spec: dict) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer: GPT-2's regex (a ByteLevel that splits) or
    one of the Split patterns it knows; anything else is refused rather than tokenized differently there."""
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


def _tokens(spec: dict, size: int, spm: bool) -> tuple[list[str], list[int]]:
    """Tokens in id order (``size`` of them: ids no token holds are unused placeholders) and their kinds."""
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    vocab.update({text: t["id"] for text, t in added.items()})
    size = max(size, max(vocab.values()) + 1)
    tokens, kinds = [f"[PAD{i}]" for i in range(size)], [UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            kinds[i] = CONTROL if added[text].get("special", False) else USER
        else:
            kinds[i] = BYTE if spm and _BYTE.match(text) else NORMAL
    return tokens, kinds


def spm_scores(spec: dict, tokens: list[str], kinds: list[int]) -> list[float]:
    """llama.cpp's merge scores from Hugging Face's merge ranks: the token first made by merge r scores −r (the
    pair of lowest rank merges first on both sides); a normal token no merge makes is never reached by merging
    there either and scores below all; control tokens −1000 and bytes 0, as llama.cpp's own converter writes them."""
    rank: dict[str, int] = {}
    for r, m in enumerate(spec["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    floor = -float(len(rank) + 1)
    out = []
    for text, kind in zip(tokens, kinds, strict=True):
        if kind == CONTROL:
            out.append(-1000.0)
        elif kind in (BYTE, USER, UNUSED):
            out.append(0.0)
        else:
            out.append(-float(rank[text]) if text in rank else floor)
    return out


def write_tokenizer(writer, tokenizer, kind: str, spec: dict, n_vocab: int) -> None:
    """Tokens, kinds (and merges or scores), special ids, BOS/EOS policy and chat template into ``writer``."""
    spm = kind == "spm_bpe"
    tokens, kinds = _tokens(spec, n_vocab, spm)
    if spm:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(any(n.get("type") == "Prepend" and n.get("prepend") == "▁"
                                        for n in _normalizers(spec)))
        writer.add_token_list(tokens)
        writer.add_token_scores(spm_scores(spec, tokens, kinds))
        writer.add_token_types(kinds)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_name(spec))
        writer.add_token_list(tokens)
        writer.add_token_types(kinds)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])])
    probe = "Hello world"
    plain, full = tokenizer(probe, add_special_tokens=False)["input_ids"], tokenizer(probe)["input_ids"]
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    writer.add_add_bos_token(bool(len(full) > len(plain) and full[0] == bos))  # llama.cpp adds what HF adds
    writer.add_add_eos_token(bool(len(full) > len(plain) and full[-1] == eos and full[:len(plain)] == plain))
    ids = [("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
           ("pad_token_id", writer.add_pad_token_id)]
    if spm:  # a byte-level BPE never needs one
        ids.append(("unk_token_id", writer.add_unk_token_id))
    for name, add in ids:
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
