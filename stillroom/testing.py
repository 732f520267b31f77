"""Tiny, locally built models and tokenizers: for tests, examples and the embedded default.

Nothing here touches a model hub. Tokenizers are trained with the ``tokenizers`` library on the corpus
shipped in ``stillroom/data/corpus``; models are random-initialised (or briefly trained by callers) and saved
with ``save_pretrained`` (safetensors) so they reload with ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(path)`` offline.

Two tokenizer families are built, the two that real teachers most often use:
- ``byte_bpe``: GPT-2-style byte-level BPE (``Ġ`` marks a space);
- ``spm_bpe``: Llama-2/Mistral-style BPE over ``▁``-marked text with byte fallback (``<0x0A>`` tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from stillroom.data_io import PACKAGE_DATA

CORPUS_DIR = PACKAGE_DATA / "corpus"


def corpus_texts(split: str = "train") -> list[str]:
    """The shipped public-domain corpus (whole Shakespeare works), one string per work, sorted by name."""
    folder = CORPUS_DIR / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no corpus split {split!r} in {CORPUS_DIR} (expected train/validation/test)")
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]


def shared_dir() -> Path | None:
    """``../shared`` beside the project root (real tokenizers and corpus), or None when absent.

    ``STILLROOM_SHARED`` overrides the location.
    """
    env = os.environ.get("STILLROOM_SHARED")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared")
    candidates.append(Path.cwd().parent / "shared")
    for c in candidates:
        if (c / "tokenizers").is_dir():
            return c
    return None


SHARED_TOKENIZERS = ("gpt2", "llama3", "qwen2.5", "deepseek-coder", "mistral-spm", "t5-unigram-1k", "bert-uncased")


def _wrap(tok: Tokenizer, **special: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def train_byte_bpe(texts: Iterable[str], vocab_size: int = 1000):
    """GPT-2-style byte-level BPE; ``<|endoftext|>`` is BOS, EOS and UNK. Returns a HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eot = "<|endoftext|>"
    return _wrap(tok, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def train_spm_bpe(texts: Iterable[str], vocab_size: int = 1200):
    """Llama-2/Mistral-style BPE: ``▁`` for spaces, a prepended ``▁``, byte fallback ``<0xNN>`` tokens.

    Special tokens: ``<unk>`` 0, ``<s>`` 1 (BOS, added by the post-processor), ``</s>`` 2; then the 256
    byte tokens, then learned merges.
    """
    import json

    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Split at word starts while learning, as SentencePiece does; at run time there is no pre-tokenizer.
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator(texts, trainer)
    learned = json.loads(learner.to_str())["model"]
    # Real SentencePiece layout: specials, then the 256 byte tokens as *ordinary* vocabulary, then pieces.
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.normalizer = learner.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_gpt2(vocab_size: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 512,
              seed: int = 0, bos_token_id: int | None = None, eos_token_id: int | None = None):
    """A random-initialised GPT-2 causal LM (float32)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                     n_positions=n_positions, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab_size: int, n_layer: int = 2, hidden: int = 64, n_head: int = 4, intermediate: int = 128,
               max_positions: int = 512, seed: int = 0, bos_token_id: int | None = None,
               eos_token_id: int | None = None, tie_word_embeddings: bool = False):
    """A random-initialised Llama causal LM (float32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=n_layer,
                      num_attention_heads=n_head, num_key_value_heads=n_head, intermediate_size=intermediate,
                      max_position_embeddings=max_positions, bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(cfg).eval()


def save_pair(model, tokenizer, path: str | os.PathLike) -> Path:
    """Save a model (safetensors) and its tokenizer into one folder; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def build_fixture_models(root: str | os.PathLike, text_chars: int = 200_000) -> dict[str, Path]:
    """Build the standard tiny fixture set under ``root``; returns name -> folder.

    - ``gpt2-bpe``:   GPT-2 student, byte-level BPE (vocab 1,000), seed 0
    - ``gpt2-bpe-teacher``: a bigger GPT-2 on the *same* tokenizer, seed 1 (same-vocabulary KD)
    - ``llama-spm``:  Llama teacher, ▁ BPE with byte fallback (vocab 1,200), seed 2 (cross-tokenizer)
    """
    root = Path(root)
    text = "\n".join(corpus_texts("train"))[:text_chars]
    chunks = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    out: dict[str, Path] = {}
    bpe = train_byte_bpe(chunks, vocab_size=1000)
    spm = train_spm_bpe(chunks, vocab_size=1200)
    eot = bpe.convert_tokens_to_ids("<|endoftext|>")
    out["gpt2-bpe"] = save_pair(tiny_gpt2(len(bpe), seed=0, bos_token_id=eot, eos_token_id=eot), bpe,
                                root / "gpt2-bpe")
    out["gpt2-bpe-teacher"] = save_pair(
        tiny_gpt2(len(bpe), n_layer=3, n_embd=96, seed=1, bos_token_id=eot, eos_token_id=eot), bpe,
        root / "gpt2-bpe-teacher")
    out["llama-spm"] = save_pair(
        tiny_llama(len(spm), seed=2, bos_token_id=spm.bos_token_id, eos_token_id=spm.eos_token_id), spm,
        root / "llama-spm")
    return out
