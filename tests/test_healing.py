"""Token healing: the prefix index against naive scans, hand-built vocabularies with fixed-logit models where
the right continuation is known, and a property test over random cut points with every shared tokenizer."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import stillroom
from stillroom.generation.healing import PrefixIndex, generate, index_for, prepare
from stillroom.testing import SHARED_TOKENIZERS, corpus_texts, tiny_gpt2

# --------------------------------------------------------------------------------------------------------
# Naive references


def naive_allowed(vocab: list[bytes], special: list[bool], r: bytes) -> set[int]:
    """Tokens that start with r, or are a proper piece of r after which the rest of r is still reachable."""

    def reachable(s: bytes) -> bool:
        if not s:
            return True
        return any(not special[i] and t and (t.startswith(s) or (s.startswith(t) and reachable(s[len(t):])))
                   for i, t in enumerate(vocab))

    return {i for i, t in enumerate(vocab) if not special[i] and t
            and (t.startswith(r) or (r.startswith(t) and len(t) < len(r) and reachable(r[len(t):])))}


def naive_backoff(vocab: list[bytes], special: list[bool], ids: list[int], cap: int) -> int:
    best = 0
    for k in range(1, min(cap, len(ids)) + 1):
        tail = ids[len(ids) - k:]
        if any(special[t] or not vocab[t] for t in tail):
            break
        r = b"".join(vocab[t] for t in tail)
        covering = [t for i, t in enumerate(vocab) if not special[i] and t.startswith(r)]
        if (k == 1 and any(len(t) > len(r) for t in covering)) or (k > 1 and covering):
            best = k
    return best


def test_prefix_index_matches_naive_scan():
    rng = random.Random(0)
    alphabet = b"ab \xc3\xa9\xff"
    for trial in range(30):
        vocab = [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(5, 40))]
        vocab += [b"", b"a"]  # an empty (special-like) token and a duplicate byte string
        special = [rng.random() < 0.1 for _ in vocab]
        index = PrefixIndex(vocab, special)
        for _ in range(20):
            r = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
            assert set(index.allowed(r).tolist()) == naive_allowed(vocab, special, r), (trial, r)
            ids = [rng.randrange(len(vocab)) for _ in range(rng.randint(0, 6))]
            assert index.backoff(ids, 3) == naive_backoff(vocab, special, ids, 3), (trial, ids)


def test_prefix_index_high_bytes_and_dead_ends():
    # b"\xff" has no successor string: the "starts with" range must run to the end of the sorted keys
    index = PrefixIndex([b"\xff", b"\xff\xff", b"\xfe", b"x"])
    assert set(index.allowed(b"\xff").tolist()) == {0, 1}
    # "ab" then "c" is a dead end (no token starts with "c"); "a" then "bc" is not
    index = PrefixIndex([b"a", b"ab", b"bc", b"abcd", b"z"])
    assert set(index.allowed(b"abc").tolist()) == {0, 3}


# --------------------------------------------------------------------------------------------------------
# Hand-built vocabularies and a model with fixed logits (a unigram model: the context does not matter)

EOT = "<|endoftext|>"


def _byte_char_table() -> dict[int, str]:
    # GPT-2's byte -> printable character table, written out independently of stillroom.tokenization.tokens
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


B2C = _byte_char_table()


def _chain(text: str) -> list[tuple[str, str]]:
    """Merges that build ``text`` left to right, so every prefix of two or more symbols is a token too."""
    syms = [B2C[b] for b in text.encode("utf-8")]
    return [("".join(syms[:i]), syms[i]) for i in range(1, len(syms))]


def byte_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE: "Hello", " world" (so " wo" is a token), " the", "https" + "://", and "白云" built so
    that "白" alone tokenizes into two pieces of the character."""
    merges = _chain("Hello") + _chain(" world") + _chain(" the") + _chain("https")
    merges += [(B2C[ord(":")], B2C[ord("/")]), (B2C[ord(":")] + B2C[ord("/")], B2C[ord("/")])]
    merges += [("https", "://"), ("\u010a", "\u010a")]  # "https://" (never produced by the tokenizer), "\n\n"
    c = [B2C[b] for b in "白云".encode()]
    merges += [(c[0], c[1]), (c[2], c[3]), (c[4], c[5]), (c[2] + c[3], c[4] + c[5]),
               (c[0] + c[1], c[2] + c[3] + c[4] + c[5])]
    vocab = {EOT: 0}
    for b in range(256):
        vocab[B2C[b]] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)


def spm_bpe() -> PreTrainedTokenizerFast:
    """Llama-2-style BPE over "▁" text with byte fallback and a BOS template."""
    specials = ["<unk>", "<s>", "</s>"]
    words = ["▁Hello", "▁world", "▁the"]
    merges = [m for w in words for m in [(w[:i], w[i]) for i in range(1, len(w))]]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for ch in sorted({ch for w in words for ch in w}):
        vocab.setdefault(ch, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def unigram_model(tokenizer, logits: dict[str, float]) -> GPT2LMHeadModel:
    """A GPT-2 whose next-token logits are the same at every position: ln_f outputs a constant vector e_0
    (weight 0, bias e_0) and the untied LM head's column 0 holds the wanted logit per token (0 if unnamed)."""
    cfg = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=8, n_head=2, n_positions=128,
                     tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = -10.0
        for token, value in logits.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            assert tid is not None and tid != tokenizer.unk_token_id, token
            model.lm_head.weight[tid, 0] = value
    return model


def _g(text: str) -> str:  # byte-level piece for text
    return "".join(B2C[b] for b in text.encode("utf-8"))


@pytest.fixture(scope="module")
def bpe_pair():
    tok = byte_bpe()
    model = unigram_model(tok, {_g(" the"): 6.0, _g(" world"): 5.0, _g("https://"): 4.0, _g("白云"): 4.0,
                                _g("\n\n"): 3.0})
    return model, tok


def _no_token_starts_with(tok, text: str) -> bool:
    """Checked with the tokenizer's own decoder, one id at a time."""
    return not any(tok.decode([i]).startswith(text) for i in range(len(tok)))


def test_hand_built_byte_bpe_unhealed_cannot_healed_can(bpe_pair):
    model, tok = bpe_pair
    cases = {  # prompt -> (true continuation of the last word, what follows greedily)
        "Hello wo": ("rld", " the"),
        "https:": ("//", " the"),
        "白": ("云", " the"),
    }
    for prompt, (rest, after) in cases.items():
        # the prompt ends inside a longer vocabulary token, and no single token continues it
        assert _no_token_starts_with(tok, rest), rest
        unhealed = generate(model, tok, prompt, heal=False, max_new_tokens=2)[0]
        healed = generate(model, tok, prompt, heal=True, max_new_tokens=2)[0]
        assert unhealed == prompt + " the the"  # the global favourite, glued to the cut word
        assert healed.startswith(prompt + rest + after), (prompt, healed)  # best token consistent with the cut


def test_hand_built_backoff_counts(bpe_pair):
    _, tok = bpe_pair
    batch = prepare(tok, ["Hello wo", "https:", "白", "Hello", "Hello wo" + EOT, "", EOT + " wo"])
    assert batch.backed_off == [1, 2, 2, 0, 0, 0, 1]
    assert batch.removed == [b" wo", b"https:", "白".encode(), b"", b"", b"", b" wo"]


def test_whitespace_and_newline_prompts(bpe_pair):
    model, tok = bpe_pair
    # trailing space: healing regenerates it inside " the" instead of adding a second space
    assert generate(model, tok, "Hello ", heal=False, max_new_tokens=1) == ["Hello  the"]
    assert generate(model, tok, "Hello ", heal=True, max_new_tokens=1) == ["Hello the the"]  # 1 + backed off
    # trailing newline: "\n\n" extends it; the prompt text is kept exactly, whitespace included
    assert generate(model, tok, "Hello\n", heal=True, max_new_tokens=1) == ["Hello\n\n the"]
    assert generate(model, tok, "  Hello \t", heal=True, max_new_tokens=1)[0].startswith("  Hello \t")


def test_special_and_empty_prompts(bpe_pair):
    model, tok = bpe_pair
    # a special token at the end is never backed off; one before the tail stops the back-off there
    assert generate(model, tok, "Hello wo" + EOT, max_new_tokens=1) == ["Hello wo" + EOT + " the"]
    assert generate(model, tok, EOT + " wo", max_new_tokens=1) == [EOT + " world the"]
    # empty prompt: starts from BOS
    assert generate(model, tok, "", max_new_tokens=2) == [" the the"]
    # single-token prompt: backs off all of it, conditioning on BOS
    batch = prepare(tok, " wo")
    assert batch.backed_off == [1] and batch.input_ids.tolist() == [[tok.bos_token_id]]
    assert generate(model, tok, " wo", max_new_tokens=1) == [" world the"]


def test_batch_with_left_padding_matches_single_prompts(bpe_pair):
    model, tok = bpe_pair
    prompts = ["Hello wo", "https:", "白", "Hello ", "", "Hello wo" + EOT, "  Hello \t"]
    singles = [generate(model, tok, p, max_new_tokens=3)[0] for p in prompts]
    assert generate(model, tok, prompts, max_new_tokens=3) == singles
    batch = prepare(tok, prompts)
    assert (batch.attention_mask.sum(1) > 0).all() and batch.attention_mask[:, -1].all()  # left padding


def test_inside_model_generate_with_sampling_and_beams(bpe_pair):
    model, tok = bpe_pair
    prompts = ["Hello wo", "https:", "白"]
    batch = prepare(tok, prompts)
    for seed in range(5):
        torch.manual_seed(seed)
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True,
                             logits_processor=[batch.processor], max_new_tokens=6, pad_token_id=tok.pad_token_id,
                             top_k=0, temperature=3.0)
        for b, prompt in enumerate(prompts):
            # independent check: the tokenizer's own decoder on the generated ids reproduces the prompt
            assert tok.decode(out[b], skip_special_tokens=True).startswith(prompt)
        assert all(t.startswith(p) for t, p in zip(batch.decode(out), prompts, strict=True))
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, num_beams=3,
                         logits_processor=[batch.processor], max_new_tokens=3, pad_token_id=tok.pad_token_id)
    assert [tok.decode(o, skip_special_tokens=True) for o in out][0].startswith("Hello world")


def test_spm_byte_fallback_tokenizer():
    tok = spm_bpe()
    model = unigram_model(tok, {"▁the": 6.0, "▁world": 5.0})
    assert tok("Hello wo", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(["▁Hello", "▁wo"])
    assert _no_token_starts_with(tok, "rld")
    assert generate(model, tok, "Hello wo", heal=False, max_new_tokens=1) == ["Hello wo the"]
    assert generate(model, tok, "Hello wo", max_new_tokens=1) == ["Hello world the"]
    assert generate(model, tok, "Hello ", max_new_tokens=1) == ["Hello the the"]
    # "é" and "\n" are not in the vocabulary: they end the prompt as <0xC3><0xA9> / <0x0A> byte tokens
    for prompt in ["Hello é", "Hello\n", "wo"]:
        batch = prepare(tok, prompt)
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=4,
                             logits_processor=[batch.processor] if batch.processor else None,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0], skip_special_tokens=True).startswith(prompt), prompt
        assert batch.decode(out)[0].startswith(prompt)
    assert generate(model, tok, "wo", max_new_tokens=1) == ["world the"]  # whole prompt backed off, after <s>


def test_generate_is_exported_lazily():
    assert stillroom.generate is generate


def test_cli_generate(tmp_path, bpe_pair):
    from typer.testing import CliRunner

    from stillroom.cli import app
    from stillroom.testing import save_pair

    model, tok = bpe_pair
    folder = save_pair(model, tok, tmp_path / "m")
    runner = CliRunner()
    healed = runner.invoke(app, ["generate", "--model", str(folder), "--prompt", "Hello wo", "--max-new-tokens", "1"])
    assert healed.exit_code == 0, healed.output
    assert healed.stdout.strip().splitlines()[-1] == "Hello world the"
    plain = runner.invoke(app, ["generate", "--model", str(folder), "--prompt", "Hello wo", "--no-heal",
                                "--max-new-tokens", "1"])
    assert plain.exit_code == 0 and plain.stdout.strip().splitlines()[-1] == "Hello wo the"
    missing = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.exit_code != 0


# --------------------------------------------------------------------------------------------------------
# Property: random character cut points of corpus text, every shared tokenizer, a tiny random model


@pytest.mark.parametrize("name", SHARED_TOKENIZERS)
def test_random_cut_points_reproduce_the_prompt(name, shared_tokenizer):
    tok = shared_tokenizer(name)
    rng = random.Random(zlib.crc32(name.encode()))  # str hash() changes per process
    text = corpus_texts("validation")[0]
    extra = ["广州的白", "print('Hello, wo", "https:", "naïve café 東", "x\n", "end  \n\t", "🙂🙂"]
    prompts = []
    for _ in range(12):
        start = rng.randrange(len(text) - 200)
        prompts.append(text[start:start + rng.randint(1, 120)])
    prompts += extra
    # a tiny model whose vocabulary is padded past the tokenizer's (as Qwen's configs do)
    model = tiny_gpt2(len(tok) + 5, n_layer=1, n_embd=16, n_head=2, seed=1)
    batch = prepare(tok, prompts)
    assert sum(k > 0 for k in batch.backed_off) >= 3, batch.backed_off
    # each token spells at least one byte, so 4 + len(backed-off bytes) new tokens always heal the prompt
    limits = [4 + len(r) for r in batch.removed]
    pad = batch.input_ids[0, 0].item()
    greedy = None
    for sample in (False, True):
        torch.manual_seed(0)
        out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=sample,
                             logits_processor=[batch.processor], max_new_tokens=max(limits), pad_token_id=pad,
                             eos_token_id=None)
        texts = batch.decode(out, limits)
        greedy = greedy or texts
        for b, prompt in enumerate(prompts):
            assert texts[b].startswith(prompt)
            # independent check with the tokenizer's own decoder: the generated ids spell the prompt out
            # again (as the tokenizer decodes the prompt's own ids) before going on
            want = tok.decode(tok(prompt, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
            real = out[b][batch.prompt_length - int(batch.attention_mask[b].sum()):]
            got = tok.decode(real, skip_special_tokens=True)
            assert got.startswith(want.rstrip()), (name, prompt, got)
    # the same prompts one at a time give the same greedy texts as the left-padded batch
    for b, p in enumerate(prompts[:3]):
        one = prepare(tok, p)
        out = model.generate(input_ids=one.input_ids, attention_mask=one.attention_mask,
                             logits_processor=[one.processor] if one.processor else None,
                             max_new_tokens=limits[b], pad_token_id=pad, eos_token_id=None)
        assert one.decode(out)[0] == greedy[b]
    assert index_for(tok) is index_for(tok)  # built once per tokenizer


def test_index_rebuilt_when_tokens_are_added():
    tok = byte_bpe()
    model = unigram_model(tok, {_g(" the"): 6.0})
    before = index_for(tok)
    tok.add_tokens([" wonder"])  # a new ordinary token extending " wo"
    after = index_for(tok)
    assert after is not before and after.vocab_size == len(tok)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[len(tok) - 1, 0] = 7.0
    assert generate(model, tok, "Hello wo", max_new_tokens=1) == ["Hello wonder wonder"]


# --------------------------------------------------------------------------------------------------------
# Gemma 3: ids 138-167 are runs of 2-31 spaces (non-special added tokens that are also model pieces)


@pytest.fixture(scope="module")
def gemma(shared_tokenizer):
    tok = shared_tokenizer("gemma3")
    return unigram_model(tok, {"▁▁▁": 6.0, "▁the": 5.0}), tok  # three spaces, then " the", are the favourites


def test_gemma_space_runs_are_healed_and_allowed(gemma):
    _, tok = gemma
    runs = list(range(138, 168))
    decoded = tok.backend_tokenizer.decode_batch([[i] for i in range(len(tok))], skip_special_tokens=True)
    assert [decoded[i] for i in runs] == [" " * n for n in range(2, 32)]  # the tokenizer's own decoder
    prompts = ["if x:\n    ", "The answer is  ", "The answer is "]
    batch = prepare(tok, prompts)
    assert batch.backed_off == [1, 1, 1] and batch.removed == [b"    ", b"  ", b" "]
    kept = batch.processor(batch.input_ids, torch.zeros(len(prompts), len(tok))).isfinite()
    for b, r in enumerate(["    ", "  ", " "]):
        allowed = set(kept[b].nonzero().flatten().tolist())
        assert set(runs) <= allowed, (r, sorted(set(runs) - allowed))
        # independent check with the decoder: allowed = tokens that start with r or are a piece of it (spaces
        # only, so the rest of r is always reachable)
        want = {i for i, s in enumerate(decoded) if s and (s.startswith(r) or r.startswith(s))}
        assert allowed == want, (r, sorted(allowed ^ want)[:10])


def test_gemma_generated_space_runs_are_spaces(gemma):
    model, tok = gemma
    # unhealed, the trailing space stays and the favourite "   " follows it
    assert generate(model, tok, "The answer is ", heal=False, max_new_tokens=1) == ["The answer is " + " " * 3]
    # healed: the backed-off " " is regenerated inside "   " (allowed: it starts with " "), then "   " again
    assert generate(model, tok, "The answer is ", max_new_tokens=1) == ["The answer is " + " " * 5]
    # indentation: "    " backed off, regenerated as "   " + "   " (6 spaces), 2 beyond the prompt
    assert generate(model, tok, "if x:\n    ", max_new_tokens=1) == ["if x:\n    " + " " * 2]
    batch = prepare(tok, ["if x:\n    "])
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=2,
                         logits_processor=[batch.processor], pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert out[0, batch.prompt_length:].tolist() == [139, 139]
    assert tok.decode(out[0], skip_special_tokens=True) == "if x:\n" + " " * 6  # the tokenizer agrees
