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

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from stillroom.files import PACKAGE_DATA

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


# --- GGUF ---------------------------------------------------------------------------------------------------

GGUF_SHAPE = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 48}


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (written out here, not imported)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_llama_gguf(path: str | os.PathLike, seed: int = 0) -> None:
    """A tiny Llama written as a GGUF file (llama.cpp's format) with the ``gguf`` package: 2 layers, a byte-level
    BPE vocabulary of 260 ids (256 bytes + 3 merges + end-of-text), f32 and f16 tensors. For tests: no download."""
    import gguf
    import numpy as np

    HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = (GGUF_SHAPE[k] for k in ("hidden", "layers", "heads", "kv_heads", "ffn"))
    rng = np.random.default_rng(seed)
    alphabet = _byte_alphabet()
    tokens = alphabet + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)

    def t(*shape, dtype="float32"):
        return (rng.standard_normal(shape) * 0.2).astype(dtype)

    head_dim = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", t(vocab, HIDDEN))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(HIDDEN))
        w.add_tensor(f"blk.{i}.attn_q.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_k.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_v.weight", t(KV_HEADS * head_dim, HIDDEN))
        w.add_tensor(f"blk.{i}.attn_output.weight", t(HIDDEN, HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(FFN, HIDDEN, dtype="float16"))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(FFN, HIDDEN, dtype="float16"))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(HIDDEN, FFN, dtype="float16"))
    w.add_tensor("output_norm.weight", 1 + t(HIDDEN))
    w.add_tensor("output.weight", t(vocab, HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- a real llama.cpp server --------------------------------------------------------------------------------


def probe_teacher(root: str | os.PathLike, probe: str, steps: int = 200) -> tuple[Path, Path]:
    """A tiny Llama (byte-level BPE, vocabulary 400, no BOS added) trained until the next tokens of ``probe``
    (a served teacher's, :data:`stillroom.teachers.served.PROBE`) are nearly certain, as a real teacher's are;
    returns its folder and its f32 GGUF (written by :func:`stillroom.models.export.export_gguf`)."""
    import torch

    from stillroom.models.export import export_gguf

    root = Path(root)
    tok = train_byte_bpe([t[:20_000] for t in corpus_texts("train")] + [probe] * 20, vocab_size=400)
    model = tiny_llama(len(tok), n_layer=2, hidden=64, n_head=4, intermediate=128, seed=3)
    texts = [probe, probe, probe, corpus_texts("train")[0][:300]]
    batch = [torch.tensor([tok(t)["input_ids"]]) for t in texts]
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x = batch[step % len(batch)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = save_pair(model, tok, root / "probe-teacher")
    return folder, export_gguf(folder, root / "probe-teacher.gguf", dtype="f32", progress=False)


@contextlib.contextmanager
def llama_server(gguf: str | os.PathLike, *args: str, n_ctx: int = 512, threads: int = 1,
                 timeout: float = 120.0) -> Iterator[str]:
    """Serve ``gguf`` with llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on a free
    port of 127.0.0.1; yields its URL once ``/v1/models`` answers and stops it on exit. ``args``: more server
    options (e.g. ``"--logits_all", "false"``)."""
    import json
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
           str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), *args]
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill and stall the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llama_cpp.server exited ({proc.returncode}): {log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    if json.loads(r.read()).get("data"):
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"llama_cpp.server on {url} did not answer in {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
