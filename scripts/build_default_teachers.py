"""Build the embedded default: two tiny pretrained teachers with different tokenizer families, plus the
student's tokenizer, all trained from the shipped corpus with fixed seeds.

    flock /tmp/stillroom-heavy.lock .venv/bin/python scripts/build_default_teachers.py

Writes into ``stillroom/data/default/``:

- ``teacher-bpe/``: GPT-2 on a GPT-2-style byte-level BPE (vocab 4,096; ``Ġ`` marks a space), trained on
  ``corpus/teacher-a`` (14 works: 7 comedies and romances, 7 histories and tragedies);
- ``teacher-spm/``: Llama on a Llama-2-style ``▁`` BPE with byte fallback (vocab 3,200), trained on
  ``corpus/teacher-b`` (13 works: 6 comedies and romances, 7 histories and tragedies);
- ``student-tokenizer/``: a third tokenizer, byte-level BPE with vocab 2,048 (trained on ``corpus/train``), so
  the student shares its vocabulary with neither teacher and both teachers need the cross-tokenizer path.

Why separate corpora: like FuseLLM's source models, each teacher knows text the student never reads and the
two know different things. Teachers trained on the student's own train split (the first version of this
script) had memorised it: on that text their distributions were nearly one-hot on the gold token, so
distillation added little to plain CE, and sequence-level MinCE always chose the teacher that memorised
better. Every split (teacher-a, teacher-b, train, validation, test) is a disjoint set of whole works; the
teachers' halves alternate through each genre (sorted by name), so neither teacher is the expert of the
held-out comedies. (A genre split — all comedies to one teacher — made that teacher the only useful one on the
comedy test set, and any fusion with the other could only dilute it.)

Each teacher folder holds safetensors weights stored as float16 (to keep the package small; ``config.json`` says
float32 so ``AutoModelForCausalLM.from_pretrained`` loads them as float32), the tokenizer, and a model card
(README.md) with its validation bits per byte measured by ``stillroom.evaluation`` after the float16 round trip.

Training is a plain loop: AdamW, linear warm-up then cosine decay, random windows of the token stream,
float32 (``--precision bf16`` for bfloat16 autocast, which is much slower on CPUs without a bf16 unit). Steps are fixed (not time-based) so a run is
reproducible on the same machine. ``--cards-only`` re-measures and rewrites the model cards;
``--student-baseline SECONDS`` trains a small from-scratch student on the student tokenizer for that long and
prints its validation bits per byte (the yardstick the teachers must clearly beat).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from stillroom.testing import (  # noqa: E402
    PACKAGE_DATA,
    corpus_texts,
    tiny_gpt2,
    tiny_llama,
    train_byte_bpe,
    train_spm_bpe,
)

OUT = PACKAGE_DATA / "default"
SEQ_LEN = 256
BATCH = 16

TEACHERS = {
    "teacher-bpe": dict(family="byte_bpe", vocab=4096, seed=11, steps=1500, lr=2e-3, corpus="teacher-a",
                        arch=dict(kind="gpt2", n_layer=4, n_embd=256, n_head=4)),
    "teacher-spm": dict(family="spm_bpe", vocab=3200, seed=12, steps=1500, lr=2e-3, corpus="teacher-b",
                        arch=dict(kind="llama", n_layer=4, hidden=256, n_head=4, intermediate=688)),
}
STUDENT_TOKENIZER = dict(family="byte_bpe", vocab=2048)
CORPUS_NOTE = {"teacher-a": "14 Shakespeare plays, 7 comedies/romances and 7 histories/tragedies",
               "teacher-b": "13 Shakespeare plays, 6 comedies/romances and 7 histories/tragedies",
               "train": "eight Shakespeare plays"}


def chunks(texts: list[str], size: int = 2000) -> list[str]:
    """Tokenizer-training input: the works cut into fixed-size pieces (same recipe as the test fixtures)."""
    text = "\n".join(texts)
    return [text[i:i + size] for i in range(0, len(text), size)]


def train_tokenizer(family: str, vocab: int, texts: list[str]):
    if family == "byte_bpe":
        return train_byte_bpe(chunks(texts), vocab_size=vocab)
    if family == "spm_bpe":
        return train_spm_bpe(chunks(texts), vocab_size=vocab)
    raise ValueError(f"unknown tokenizer family {family!r}")


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All works as one stream of ids, each work preceded by BOS (as evaluation conditions on BOS)."""
    ids: list[int] = []
    for t in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def build_model(arch: dict, tokenizer, seed: int):
    kind = arch["kind"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if kind == "gpt2":
        model = tiny_gpt2(len(tokenizer), n_layer=arch["n_layer"], n_embd=arch["n_embd"], n_head=arch["n_head"],
                          n_positions=SEQ_LEN, seed=seed, bos_token_id=bos, eos_token_id=eos)
        # Short training on a small corpus: dropout only slows it down.
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            setattr(model.config, name, 0.0)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        return model
    if kind == "llama":
        return tiny_llama(len(tokenizer), n_layer=arch["n_layer"], hidden=arch["hidden"], n_head=arch["n_head"],
                          intermediate=arch["intermediate"], max_positions=SEQ_LEN, seed=seed, bos_token_id=bos,
                          eos_token_id=eos, tie_word_embeddings=True)
    raise ValueError(f"unknown architecture {kind!r}")


def lr_at(step: int, steps: int, peak: float, warmup: int = 50, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay from ``peak`` to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(stream: torch.Tensor, gen: torch.Generator, batch: int = BATCH, seq_len: int = SEQ_LEN) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def quick_val(model, stream: torch.Tensor, n: int = 32) -> float:
    """Mean next-token loss (nats) on ``n`` fixed windows of the validation stream (a progress signal only)."""
    model.eval()
    starts = torch.linspace(0, len(stream) - SEQ_LEN - 2, n).long().tolist()
    x = torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts])
    logits = model(input_ids=x[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    model.train()
    return loss.item()


def train(model, stream: torch.Tensor, val_stream: torch.Tensor, *, steps: int, lr: float, seed: int,
          precision: str, time_limit: float | None = None, log_every: int = 100) -> dict:
    """Plain causal-LM training; returns a summary (steps done, seconds, final quick validation loss)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    use_bf16 = precision == "bf16"
    start = time.time()
    step = 0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        x = batches(stream, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"  step {step + 1}/{steps}  loss {loss.item():.3f}  val {quick_val(model, val_stream):.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)
        if time_limit is not None and time.time() - start > time_limit:
            break
    model.eval()
    return {"steps": step + 1, "seconds": round(time.time() - start, 1), "quick_val_loss": quick_val(model, val_stream)}


def save_float16(model, tokenizer, folder: Path) -> None:
    """safetensors in float16, config saying float32 so from_pretrained gives a float32 model."""
    folder.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(folder, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def measure(folder: Path) -> dict:
    """Validation and test bits per byte of the saved model, with stillroom.evaluation."""
    from stillroom.evaluation import evaluate, load_model

    model, tokenizer = load_model(folder)
    out = {}
    for split in ("validation", "test"):
        report = evaluate(model, tokenizer, corpus_texts(split), name=folder.name)
        out[split] = report.to_dict()
    return out


def write_card(folder: Path, spec: dict, info: dict, metrics: dict) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    arch = ", ".join(f"{k}={v}" for k, v in spec["arch"].items())
    val, test = metrics["validation"], metrics["test"]
    family = {"byte_bpe": "GPT-2-style byte-level BPE", "spm_bpe": "Llama-2-style ▁ BPE with byte fallback"}
    card = f"""# {folder.name} — a tiny teacher of the stillroom embedded default

A {type(model).__name__} ({params:,} parameters; {arch}) with a {family[spec['family']]} tokenizer
(vocabulary {spec['vocab']:,}), trained from scratch on `stillroom/data/corpus/{spec.get('corpus', 'train')}`
({CORPUS_NOTE.get(spec.get('corpus', 'train'), 'Shakespeare plays')}, public domain; no work the student trains or is
evaluated on).

Built by `scripts/build_default_teachers.py` (seed {spec['seed']}): {info.get('steps', '?')} steps of AdamW
(peak learning rate {spec['lr']}, warm-up then cosine), batch {BATCH} × {SEQ_LEN} tokens,
{'bfloat16 autocast' if info.get('precision') == 'bf16' else 'float32'} on CPU, {info.get('seconds', '?')} s. Weights are stored as float16 and load as float32.

| split (held-out works) | bits per byte | token perplexity | tokens | bytes |
|---|---|---|---|---|
| validation (`twelfth_night.txt`) | {val['bits_per_byte']:.4f} | {val['token_perplexity']:.2f} | {val['tokens']:,} | {val['bytes']:,} |
| test (`as_you_like_it.txt`) | {test['bits_per_byte']:.4f} | {test['token_perplexity']:.2f} | {test['tokens']:,} | {test['bytes']:,} |

Measured with
`stillroom eval --model stillroom/data/default/{folder.name} --data stillroom/data/corpus/validation`
(sliding window, context {val['context']}, stride {val['stride']}, first token conditioned on BOS).
A toy for demonstrations and tests, not a useful language model.
"""
    (folder / "README.md").write_text(card)
    (folder / "training.json").write_text(json.dumps({**info, "spec": spec, "metrics": {
        s: {k: metrics[s][k] for k in ("bits_per_byte", "token_perplexity", "tokens", "bytes")} for s in metrics
    }}, indent=2) + "\n")


def student_baseline(seconds: float, precision: str, steps: int | None = None) -> None:
    """A from-scratch student (GPT-2, 2 layers × 128) on the student tokenizer, trained for ``seconds``
    (or exactly ``steps`` steps with a cosine schedule over them, when given)."""
    from stillroom.evaluation import evaluate

    tokenizer = _load_tokenizer(OUT / "student-tokenizer")
    train_s = token_stream(tokenizer, corpus_texts("train"))
    val_s = token_stream(tokenizer, corpus_texts("validation"))
    model = build_model(dict(kind="gpt2", n_layer=2, n_embd=128, n_head=4), tokenizer, seed=0)
    info = train(model, train_s, val_s, steps=steps or 10_000, lr=3e-3, seed=0, precision=precision,
                 time_limit=None if steps else seconds, log_every=100)
    params = sum(p.numel() for p in model.parameters())
    report = evaluate(model, tokenizer, corpus_texts("validation"), name="student-from-scratch")
    print(f"from-scratch student: {params:,} params, {info['steps']} steps in {info['seconds']} s, "
          f"validation bits/byte {report.bits_per_byte:.4f}")


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("--only", choices=sorted(TEACHERS), action="append", help="build only these teachers")
    ap.add_argument("--steps", type=int, help="override the number of training steps (for quick trials)")
    ap.add_argument("--cards-only", action="store_true", help="re-measure and rewrite the model cards")
    ap.add_argument("--student-baseline", type=float, metavar="SECONDS",
                    help="train a from-scratch student for SECONDS and print its validation bits per byte")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.student_baseline:
        student_baseline(args.student_baseline, args.precision, args.steps)
        return
    train_texts, val_texts = corpus_texts("train"), corpus_texts("validation")
    names = args.only or sorted(TEACHERS)
    if not args.cards_only:
        if not args.only:
            spec = STUDENT_TOKENIZER
            tok = train_tokenizer(spec["family"], spec["vocab"], train_texts)
            tok.save_pretrained(OUT / "student-tokenizer")
            print(f"student tokenizer: {spec['family']} vocab {len(tok)} -> {OUT / 'student-tokenizer'}")
        for name in names:
            spec = dict(TEACHERS[name])
            if args.steps:
                spec["steps"] = args.steps
            texts = corpus_texts(spec["corpus"])
            tok = train_tokenizer(spec["family"], spec["vocab"], texts)
            stream, val_stream = token_stream(tok, texts), token_stream(tok, val_texts)
            model = build_model(spec["arch"], tok, spec["seed"])
            params = sum(p.numel() for p in model.parameters())
            print(f"{name}: {params:,} params, vocab {len(tok)}, {len(stream):,} train tokens", flush=True)
            info = train(model, stream, val_stream, steps=spec["steps"], lr=spec["lr"], seed=spec["seed"],
                         precision=args.precision)
            info["precision"] = args.precision
            folder = OUT / name
            save_float16(model, tok, folder)
            (folder / "training.json").write_text(json.dumps({**info, "spec": spec}, indent=2) + "\n")
            print(f"{name}: saved to {folder} ({info})", flush=True)
    for name in names:
        folder = OUT / name
        info = json.loads((folder / "training.json").read_text())
        spec = info.pop("spec", TEACHERS[name])
        info.pop("metrics", None)
        metrics = measure(folder)
        write_card(folder, spec, info, metrics)
        print(f"{name}: validation bits/byte {metrics['validation']['bits_per_byte']:.4f}, "
              f"test {metrics['test']['bits_per_byte']:.4f}", flush=True)


if __name__ == "__main__":
    main()
