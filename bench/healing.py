"""Token healing: quality (does the continuation of a prompt cut mid-word come out right?) and speed.

    flock /tmp/stillroom-heavy.lock python -m bench.healing                  # everything
    python -m bench.healing --only speed --speed-prompts 10                  # a subset

Quality. Models (``--models``): by default the two shipped pretrained teachers in ``stillroom/data/default/``
(GPT-2 on a byte-level BPE of 4,096 tokens; Llama on a ▁ BPE with byte fallback of 3,200 tokens); ``train``
trains a small GPT-2 here on the corpus' train split with a byte-level BPE of 8,192 tokens
(``--train-seconds``, cached under ``runs/bench-healing/``). Held-out text (the test
split) is cut at random character positions; each prompt is the 300 characters before the cut. Greedy
continuations (8 new tokens) are scored by

- next-word match: the generated text reproduces the true text through the end of the next word (the rest
  of the cut word, or the next word when the cut falls between words), over all cuts and over the cuts that
  fall inside a token of the text's own tokenization;
- log-likelihood (nats) of the true next 32 characters: unhealed, the prompt's ids then the continuation's
  own tokenization; healed, the canonical tokenization of the backed-off bytes + continuation after the kept
  ids, with the steps that reproduce the backed-off bytes renormalised over the allowed tokens, as
  generation does. (transformers' healing is a soft logit bias and defines no likelihood: match rate only.
  SentencePiece tokenizers give the continuation alone a virtual leading space, so no unhealed likelihood.)

for: unhealed, stillroom healing, and transformers' token healing (``heal_tokens`` then ``generate``: what
``generate(token_healing=True)`` does, minus its crash on prompts whose re-tokenization changes length; a
crash of the peer on a prompt counts as a miss and is reported).

Speed. Per-prompt overhead, median over random cuts of held-out text (200-character prompts), 8 new tokens,
batch 1, a tiny GPT-2 with the tokenizer's vocabulary (so the model is cheap and healing's cost shows), for
the gpt2, llama3 and qwen2.5 vocabularies:

- machinery: ``prepare`` + the logits processor's calls, timed alone (what healing itself costs);
- same steps: (prepare + healed ``model.generate``) - (the same unhealed), both 8 decoding steps;
- +k steps: ``stillroom.generate(heal=True) - stillroom.generate(heal=False)``, where healing also decodes
  the k backed-off tokens again (as transformers' healing also spends a decoding step);
- hf: transformers' healing - plain ``model.generate`` (it rebuilds a prefix trie of the vocabulary on
  every call, re-tokenizes, and runs a one-token ``generate``);
- hf/machinery and hf/+k: the ratios.

Differences are medians of back-to-back pairs (healed, plain), then the median over prompts.

Also the one-time index build per tokenizer (TokenTable + sorted byte strings). torch runs on one thread
for the timings (the benchmark machine is shared; multi-threaded small ops there are noise).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.common import console, machine, median_seconds, print_table, summary  # noqa: E402

RUN_DIR = Path("runs/bench-healing")
DEFAULT_MODELS = "stillroom/data/default/teacher-bpe,stillroom/data/default/teacher-spm"
WORD = re.compile(r"\s*(\w+|[^\w\s]+)")


# ------------------------------------------------------------------------------------------------ model
def trained_model(train_seconds: float, vocab_size: int = 8192):
    """A GPT-2 trained for ``train_seconds`` on the train split (cached on disk by its settings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from stillroom.testing import corpus_texts, save_pair, train_byte_bpe

    folder = RUN_DIR / f"gpt2-v{vocab_size}-t{int(train_seconds)}"
    if (folder / "model.safetensors").exists():
        return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), folder
    texts = corpus_texts("train")
    chunks = [t[i:i + 4000] for t in texts for i in range(0, len(t), 4000)]
    tok = train_byte_bpe(chunks, vocab_size=vocab_size)
    ids = torch.tensor([i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]])
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=4, n_embd=192, n_head=4, n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    ctx, bs, step, t0 = 128, 16, 0, time.perf_counter()
    while time.perf_counter() - t0 < train_seconds:
        starts = torch.randint(0, len(ids) - ctx - 1, (bs,))
        x = torch.stack([ids[s:s + ctx] for s in starts])
        lr = 2e-3 * min(1.0, (step + 1) / 100) * max(0.1, 1 - (time.perf_counter() - t0) / train_seconds)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"  train step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"  trained {step} steps of {bs}x{ctx} tokens in {train_seconds:.0f}s; last loss {loss.item():.3f}")
    model.eval()
    save_pair(model, tok, folder)
    return model, tok, folder


# ------------------------------------------------------------------------------------------------ quality
def _next_word_end(text: str, cut: int) -> int | None:
    m = WORD.match(text, cut)
    return m.end() if m else None


def _matches(full: str, truth: str) -> bool:
    """``full`` reproduces ``truth`` and the word ends where it ends in the true text."""
    if not full.startswith(truth):
        return False
    nxt = full[len(truth):len(truth) + 1]
    return not (nxt and truth[-1:].isalnum() and (nxt.isalnum() or nxt == "_"))


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def healed_loglik(model, tok, prompt: str, cont: str) -> float | None:
    """None when the canonical tokenization of prompt + continuation changes before the backed-off tail."""
    from stillroom.generation.healing import prepare

    batch = prepare(tok, prompt)
    kept = batch.input_ids[0].tolist()
    full = tok(prompt + cont)["input_ids"]
    if batch.backed_off[0] == 0:
        return unhealed_loglik(model, tok, prompt, cont)
    if full[:len(kept)] != kept:
        return None  # the canonical tokenization of prompt + continuation changes before the backed-off tail
    tail = full[len(kept):]
    lp = _logprobs(model, kept + tail)
    r, used, total = batch.removed[0], 0, 0.0
    for j, t in enumerate(tail):
        row = lp[len(kept) - 1 + j]
        if used < len(r):
            allowed = batch.index.allowed(r[used:])
            total += (row[t] - torch.logsumexp(row[allowed], 0)).item()
            used += len(batch.index.token_bytes[t])
        else:
            total += row[t].item()
    return total


def unhealed_loglik(model, tok, prompt: str, cont: str) -> float | None:
    """None when the continuation's own tokens do not spell it exactly (SentencePiece adds a leading space)."""
    from stillroom.generation.healing import index_for

    p = tok(prompt)["input_ids"] or [tok.eos_token_id]
    c = tok(cont, add_special_tokens=False)["input_ids"]
    if b"".join(index_for(tok).token_bytes[t] for t in c) != cont.encode("utf-8"):
        return None
    lp = _logprobs(model, p + c)
    return sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(c))


def tf_heal_generate(model, tok, ids: torch.Tensor, new: int) -> torch.Tensor:
    """transformers' ``generate(token_healing=True)``, done in its two steps.

    ``generate`` builds the attention mask before ``heal_tokens`` strips and re-tokenizes the prompt, so any
    prompt whose length changes (one ending in whitespace) crashes with a shape mismatch in 5.23; calling
    ``heal_tokens`` first, as ``generate`` does internally, avoids that and costs the same.
    """
    healed = model.heal_tokens(ids, tokenizer=tok)
    return model.generate(healed, attention_mask=torch.ones_like(healed), max_new_tokens=new, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=None)


def quality(model, tok, n_prompts: int, seed: int = 0) -> dict:
    from stillroom.generation.healing import generate, prepare
    from stillroom.testing import corpus_texts

    text = corpus_texts("test")[0]
    rng = random.Random(seed)
    cuts = []
    while len(cuts) < n_prompts:
        c = rng.randrange(400, len(text) - 100)
        end = _next_word_end(text, c)
        if end is not None and end - c <= 40:
            cuts.append((c, end))
    prompts = [text[c - 300:c] for c, _ in cuts]
    truths = [text[c - 300:end] for c, end in cuts]
    # which cuts fall inside a token of the prompt + continuation's own tokenization
    mid_token = []
    for c, _ in cuts:
        enc = tok(text[c - 300:c + 40], add_special_tokens=False, return_offsets_mapping=True)
        mid_token.append(any(s < 300 < e for s, e in enc["offset_mapping"]))
    new = 8
    res = {}
    for name, heal in (("unhealed", False), ("stillroom", True)):
        outs = []
        for i in range(0, len(prompts), 16):
            outs += generate(model, tok, prompts[i:i + 16], heal=heal, max_new_tokens=new)
        res[name] = [_matches(o, t) for o, t in zip(outs, truths, strict=True)]
    tf, tf_errors = [], 0
    tok.pad_token = tok.pad_token or tok.eos_token
    for p, t in zip(prompts, truths, strict=True):
        ids = tok(p, return_tensors="pt")["input_ids"]
        try:
            with torch.no_grad():
                out = tf_heal_generate(model, tok, ids, new)
            # it strips the prompt (both ends) before healing: compare without the leading whitespace
            tf.append(_matches(tok.decode(out[0], skip_special_tokens=True).lstrip(), t.lstrip()))
        except Exception:  # noqa: BLE001 - a crash of the peer counts as a miss, and is reported
            tf.append(False)
            tf_errors += 1
    res["transformers"] = tf
    ll_plain, ll_heal = [], []
    healed_flags = prepare(tok, prompts).backed_off
    for (c, _), p in zip(cuts, prompts, strict=True):
        cont = text[c:c + 32]
        h, u = healed_loglik(model, tok, p, cont), unhealed_loglik(model, tok, p, cont)
        if h is None or u is None:
            continue
        ll_heal.append(h)
        ll_plain.append(u)
    mid = [i for i, m in enumerate(mid_token) if m]
    return {
        "n": len(prompts), "n_mid_token": len(mid), "tf_errors": tf_errors, "n_healed": sum(k > 0 for k in healed_flags),
        "match": {k: statistics.mean(v) for k, v in res.items()},
        "match_mid": {k: statistics.mean([v[i] for i in mid]) if mid else float("nan") for k, v in res.items()},
        "ll": {"unhealed": statistics.mean(ll_plain) if ll_plain else float("nan"),
               "stillroom": statistics.mean(ll_heal) if ll_heal else float("nan"), "n": len(ll_heal)},
    }


# ------------------------------------------------------------------------------------------------ speed
def _paired(fn_a, fn_b, repeats: int) -> float:
    """Median over ``repeats`` of time(fn_a) - time(fn_b), run back to back (pairs cancel slow drift)."""
    fn_a(), fn_b()
    diffs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn_a()
        t_a = time.perf_counter() - t
        t = time.perf_counter()
        fn_b()
        diffs.append(t_a - (time.perf_counter() - t))
    return statistics.median(diffs)


def speed(name: str, n_prompts: int, repeats: int, tf_repeats: int) -> dict:
    from transformers import AutoTokenizer

    from stillroom.generation import healing
    from stillroom.testing import corpus_texts, shared_dir, tiny_gpt2

    shared = shared_dir()
    if shared is None:
        raise SystemExit("../shared is absent: the speed benchmark needs ../shared/tokenizers (gpt2, llama3, qwen2.5)")
    tok = AutoTokenizer.from_pretrained(shared / "tokenizers" / name)
    tok.pad_token = tok.pad_token or tok.eos_token
    if tok.bos_token is None:  # transformers' healing crashes without one (Qwen has none): lend it the EOS
        tok.bos_token = tok.eos_token
    t = time.perf_counter()
    healing.index_for(tok)
    build = time.perf_counter() - t
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=64, n_head=4, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    text = corpus_texts("test")[0]
    rng = random.Random(1)
    prompts = []
    for _ in range(n_prompts):
        c = rng.randrange(400, len(text))
        prompts.append(text[c - 200:c])
    new = 8

    def plain(p):
        return healing.generate(model, tok, p, heal=False, max_new_tokens=new, eos_token_id=None)

    def healed(p):
        return healing.generate(model, tok, p, heal=True, max_new_tokens=new, eos_token_id=None)

    def tf_plain(ids):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new, pad_token_id=tok.pad_token_id, eos_token_id=None)

    def tf_healed(ids):
        with torch.no_grad():
            return tf_heal_generate(model, tok, ids, new)

    def same_steps(p, heal):  # prepare + model.generate with the same number of decoding steps either way
        batch = healing.prepare(tok, p, heal=heal)
        with torch.no_grad():
            out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=new,
                                 logits_processor=[batch.processor] if batch.processor else None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)
        return batch.decode(out)

    same, extra, theirs, machinery, base, healed_n = [], [], [], [], [], 0
    proc_time = [0.0]
    original_call = healing.TokenHealingLogitsProcessor.__call__

    def timed_call(self, input_ids, scores):
        t0 = time.perf_counter()
        out = original_call(self, input_ids, scores)
        proc_time[0] += time.perf_counter() - t0
        return out

    for p in prompts:
        ids = tok(p, return_tensors="pt")["input_ids"]
        base.append(median_seconds(lambda p=p: plain(p), repeats))
        extra.append(_paired(lambda p=p: healed(p), lambda p=p: plain(p), repeats))
        same.append(_paired(lambda p=p: same_steps(p, True), lambda p=p: same_steps(p, False), repeats))
        theirs.append(_paired(lambda ids=ids: tf_healed(ids), lambda ids=ids: tf_plain(ids), tf_repeats))
        # the machinery alone: prepare + the processor's calls during one healed generation
        healing.TokenHealingLogitsProcessor.__call__ = timed_call
        proc_time[0] = 0.0
        t0 = time.perf_counter()
        batch = healing.prepare(tok, p)
        prep = time.perf_counter() - t0
        healed(p)
        healing.TokenHealingLogitsProcessor.__call__ = original_call
        machinery.append(prep + proc_time[0])
        healed_n += batch.backed_off[0] > 0
    med = {k: statistics.median(v) * 1e3 for k, v in
           {"same": same, "extra": extra, "tf": theirs, "machinery": machinery, "plain": base}.items()}
    return {"vocab": len(tok), "build_s": build, **med, "ratio": med["tf"] / med["machinery"],
            "ratio_extra": med["tf"] / max(med["extra"], 1e-3), "healed": healed_n, "n": len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["speed", "quality"], default=None)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="quality: comma-separated model folders, or 'train' "
                    "for a GPT-2 trained here (default: the shipped teachers, byte-level BPE and ▁ BPE)")
    ap.add_argument("--train-seconds", type=float, default=300)
    ap.add_argument("--prompts", type=int, default=300, help="quality: cut points")
    ap.add_argument("--speed-prompts", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tf-repeats", type=int, default=1)
    ap.add_argument("--tokenizers", default="gpt2,llama3,qwen2.5")
    args = ap.parse_args()
    console.width = max(console.width, 150)  # wide tables; this process only
    print(f"machine: {machine()}")
    lines = []
    if args.only in (None, "quality"):
        for spec in args.models.split(","):
            if spec == "train":
                model, tok, folder = trained_model(args.train_seconds)
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                folder = Path(spec)
                model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
                card = folder / "training.json"
                if card.exists():
                    import json

                    print(f"{folder}: trained {json.loads(card.read_text()).get('steps')} steps (training.json)")
            torch.set_num_threads(1)
            q = quality(model, tok, args.prompts)
            rows = [[k, q["match"][k], q["match_mid"][k]] for k in ("unhealed", "stillroom", "transformers")]
            print_table(f"next-word match, {q['n']} random cuts of held-out text ({q['n_mid_token']} inside a token; "
                        f"stillroom healed {q['n_healed']}; transformers failed on {q['tf_errors']}), model {folder}",
                        ["method", "all cuts", "cuts inside a token"], rows)
            print_table(f"log-likelihood of the true next 32 characters (nats, mean over {q['ll']['n']})",
                        ["method", "mean log-likelihood"],
                        [["unhealed", q["ll"]["unhealed"]], ["stillroom", q["ll"]["stillroom"]]])
            lines.append(f"{folder.name}: next-word match unhealed {q['match']['unhealed']:.1%} / stillroom "
                         f"{q['match']['stillroom']:.1%} / transformers {q['match']['transformers']:.1%} (inside-token "
                         f"cuts: {q['match_mid']['unhealed']:.1%} / {q['match_mid']['stillroom']:.1%} / "
                         f"{q['match_mid']['transformers']:.1%}); LL {q['ll']['unhealed']:.2f} -> "
                         f"{q['ll']['stillroom']:.2f}")
            torch.set_num_threads(os.cpu_count() or 1)
    if args.only in (None, "speed"):
        torch.set_num_threads(1)
        rows = []
        for name in args.tokenizers.split(","):
            s = speed(name, args.speed_prompts, args.repeats, args.tf_repeats)
            rows.append([name, s["vocab"], s["build_s"], s["plain"], s["machinery"], s["same"], s["extra"], s["tf"],
                         s["ratio"], s["ratio_extra"], f"{s['healed']}/{s['n']}"])
            lines.append(f"{name}: healing {s['machinery']:.2f} ms/prompt (end to end {s['same']:.2f} ms at equal "
                         f"steps, {s['extra']:.2f} ms with the re-decoded token) vs transformers {s['tf']:.0f} ms "
                         f"({s['ratio']:.0f}x; {s['ratio_extra']:.0f}x end to end)")
        print_table("per-prompt healing overhead, ms (median; 8 new tokens, batch 1, tiny GPT-2 with that vocabulary)",
                    ["tokenizer", "vocab", "build s", "plain", "machinery", "same steps", "+k steps", "hf",
                     "hf/machinery", "hf/+k", "healed"], rows)
    summary("; ".join(lines))


if __name__ == "__main__":
    main()
