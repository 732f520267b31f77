"""What a bf16 teacher costs in quality and buys in speed, on real models and real text.

    flock /tmp/stillroom-heavy.lock python -m bench.precision [--tokens 512] [--gemma-tokens 256] [--k 16]

For each real teacher (SmolLM2-135M-Instruct, Gemma-3-270M: ``stillroom models get ...``) one forward over the
same tokens of a held-aside play of the shared corpus, once with the weights in float32 and once in bfloat16:

- **top-k KL**: KL(p ‖ q) per token in nats over the k + 1 bins the cache stores — the fp32 teacher's top-k ids
  and the tail — with p from fp32 and q the bf16 teacher's probabilities of the *same* ids (and its remaining
  mass as the tail), so a top-k set that changes under bf16 is charged, not ignored;
- **full KL**: KL(fp32 ‖ bf16) over the whole vocabulary, for reference;
- **top-1 agreement**: the fraction of positions where both pick the same most likely token;
- **cache 8-bit KL**: what the teacher cache's own encoding of the fp32 top-k costs (``stillroom.teachers.codec.topk_kl``
  of the exact vs the decoded entries), so the total (bf16 + cache) can be stated;
- forward tokens/s in each dtype (after a warm-up; fp32 best of 3, bf16 one run; a busy machine makes them noisy).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import cpu_line, print_table, summary
from stillroom.models.loading import load_causal_lm, load_tokenizer
from stillroom.models.registry import converted_folder
from stillroom.targets import TeacherOutput
from stillroom.teachers.codec import Encoding, topk_kl
from stillroom.testing import shared_dir

TEXT = "corpus/shakespeare/hamlet_gut.txt"  # any fixed prose: the models trained on none of these files' bytes


def corpus_ids(tokenizer, n: int) -> torch.Tensor:
    """``[1, n]`` token ids of a fixed stretch of the shared corpus (past the Gutenberg header)."""
    root = shared_dir()
    if root is None:
        raise SystemExit("../shared is absent: this benchmark reads its corpus")
    text = (root / TEXT).read_text(encoding="utf-8")[20_000:]
    ids = tokenizer(text[: 12 * n], add_special_tokens=True)["input_ids"][:n]
    return torch.tensor([ids])


def forward_logprobs(model, ids: torch.Tensor, repeats: int = 1) -> tuple[torch.Tensor, float]:
    """Log-softmax of the model's logits in float32 ``[n, V]`` and the forward's tokens/s (best of ``repeats``,
    after a warm-up)."""
    best = float("inf")
    with torch.no_grad():
        model(input_ids=ids[:, :16])  # warm-up: kernel selection, allocator, weights paged in
        for _ in range(repeats):
            start = time.perf_counter()
            logits = model(input_ids=ids).logits[0]
            best = min(best, time.perf_counter() - start)
    return torch.log_softmax(logits.float(), -1), ids.shape[1] / best


def compare(exact: torch.Tensor, approx: torch.Tensor, k: int) -> dict[str, float]:
    """top-k KL, full KL and top-1 agreement of ``approx`` against ``exact`` (both ``[n, V]`` log-probs)."""
    top = exact.topk(k, -1)
    p_tail = (1 - top.values.double().exp().sum(-1)).clamp_min(0)
    q_lp = approx.gather(-1, top.indices)
    q_tail = (1 - q_lp.double().exp().sum(-1)).clamp_min(0)
    kl_topk = topk_kl(top.values.numpy(), p_tail.numpy(), q_lp.numpy(), q_tail.numpy())
    kl_full = (exact.exp() * (exact - approx)).sum(-1)
    agree = (exact.argmax(-1) == approx.argmax(-1)).double()
    return {"kl_topk": float(kl_topk.mean()), "kl_full": float(kl_full.double().mean()),
            "top1_agree": float(agree.mean())}


def cache_kl(exact: torch.Tensor, ids: torch.Tensor, k: int) -> float:
    """Mean KL per token of the teacher cache's encoding (8-bit codes at this vocabulary) of the fp32 top-k."""
    top = exact.topk(k, -1)
    tail = (1 - top.values.double().exp().sum(-1)).clamp_min(0).float()
    out = TeacherOutput("x", ids[0], top.indices, top.values, tail, torch.zeros(ids.shape[1]))
    enc = Encoding.for_vocab(exact.shape[-1], k)
    dec = enc.decode(enc.encode(out))
    return float(topk_kl(top.values.numpy(), tail.numpy(), dec.topk_logprobs.numpy(), dec.tail.numpy()).mean())


def bench_model(name: str, folder: Path, n: int, k: int) -> dict:
    tok = load_tokenizer(folder, name)
    ids = corpus_ids(tok, n)
    model = load_causal_lm(folder, name, dtype=torch.float32).eval()
    exact, fp32_tps = forward_logprobs(model, ids, repeats=3)
    approx, bf16_tps = forward_logprobs(model.to(torch.bfloat16), ids)
    return {"model": name, "tokens": ids.shape[1], "vocab": exact.shape[-1], "k": k, **compare(exact, approx, k),
            "cache_kl": cache_kl(exact, ids, k), "fp32_tok_s": fp32_tps, "bf16_tok_s": bf16_tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens scored by SmolLM2")
    ap.add_argument("--gemma-tokens", type=int, default=256, help="tokens scored by Gemma-3 (its bf16 is slow "
                    "on CPUs without native bf16); 0 skips it")
    ap.add_argument("--k", type=int, default=16, help="top-k kept per position (the cache's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, n in (("smollm2-135m-instruct", a.tokens), ("gemma3-270m", a.gemma_tokens)):
        folder = converted_folder(name)
        if n <= 0:
            continue
        if folder is None:
            print(f"{name}: not converted here (stillroom models get {name}); skipped")
            continue
        rows.append(bench_model(name, folder, n, a.k))
        print(json.dumps(rows[-1]), flush=True)
    print_table(f"bf16 vs fp32 teacher, top-{a.k} (machine: {cpu_line()})",
                ["model", "tokens", "top-k KL", "full KL", "top-1 agree", "cache 8-bit KL", "total KL",
                 "fp32 tok/s", "bf16 tok/s"],
                [[r["model"], r["tokens"], f"{r['kl_topk']:.2e}", f"{r['kl_full']:.2e}", f"{r['top1_agree']:.4f}",
                  f"{r['cache_kl']:.2e}", f"{r['kl_topk'] + r['cache_kl']:.2e}", f"{r['fp32_tok_s']:.0f}",
                  f"{r['bf16_tok_s']:.1f}"] for r in rows])
    if a.json:
        a.json.write_text(json.dumps({"machine": cpu_line(), "rows": rows}, indent=1))
    summary("; ".join(f"{r['model']}: bf16 top-{a.k} KL {r['kl_topk']:.1e} nats/token (+ cache {r['cache_kl']:.1e}),"
                      f" top-1 agree {r['top1_agree']:.3f}, bf16 {r['bf16_tok_s'] / r['fp32_tok_s']:.2f}x fp32 speed"
                      for r in rows) + f" [{cpu_line()}]")


if __name__ == "__main__":
    main()
