"""Decoding kernels on CPU: why ``stillroom.generation.rollout`` computes a decoding step's linear layers as ``(W @ xᵀ)ᵀ``
and draws tokens by inverse CDF.

    flock /tmp/stillroom-heavy.lock python -m bench.decode_kernels [--threads 2] [--repeats 5]

Side by side, in one process, medians of ``--repeats`` timed calls after two warm-ups:

- **linear**: ``torch.nn.functional.linear(x, W)`` (what ``nn.Linear`` runs) vs ``(W @ xᵀ)ᵀ`` for a decoding step's
  few rows (x: rows × in) through the weight shapes of the SmolLM2-135M family (576 → 49,152 head, 576 ↔ 1,536 MLP,
  576 → 576 attention) and Gemma-3-270M's 640 → 262,144 head; the outputs agree to float rounding (checked);
- **draw**: ``torch.multinomial(p, 1)`` vs :func:`stillroom.generation.rollout.next_tokens_draw` (float64 cumulative sum,
  one uniform per row) for 4 rows of 49,152 / 262,144 probabilities;
- **decode**: :func:`stillroom.generation.rollout.generate_ids` for 4 prompts of 33 tokens × 32 new tokens on a random
  Llama of the cut student's shape (6 layers, hidden 576, 49,152 ids; speed does not depend on the weights), with
  the skinny form (as stillroom runs) vs with it switched off (``max_rows=0``: every linear is ``nn.Linear``'s).

Ends with a ``SUMMARY:`` line of the ratios.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, median_seconds

SHAPES = {"smollm2 head 576→49152": (49152, 576), "mlp up 576→1536": (1536, 576), "mlp down 1536→576": (576, 1536),
          "attn 576→576": (576, 576), "gemma3 head 640→262144": (262144, 640)}


def linear_rows(repeats: int, rows: tuple[int, ...] = (1, 4, 8, 16)) -> list[dict]:
    res = []
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g)
        for m in rows:
            x = torch.randn(m, k, generator=g)
            torch.testing.assert_close((w @ x.T).T, torch.nn.functional.linear(x, w), rtol=1e-4, atol=1e-4)
            plain = median_seconds(lambda: torch.nn.functional.linear(x, w), repeats, warmup=2)  # noqa: B023
            skinny = median_seconds(lambda: (w @ x.T).T.contiguous(), repeats, warmup=2)  # noqa: B023
            res.append({"shape": name, "rows": m, "linear_ms": plain * 1e3, "skinny_ms": skinny * 1e3,
                        "ratio": plain / skinny})
    return res


def draw_rows(repeats: int) -> list[dict]:
    from stillroom.generation.rollout import next_tokens_draw

    res = []
    for v in (49152, 262144):
        p = torch.softmax(torch.randn(4, v), -1)
        g = torch.Generator().manual_seed(0)
        multi = median_seconds(lambda: torch.multinomial(p, 1, generator=g), repeats, warmup=2)  # noqa: B023
        inv = median_seconds(lambda: next_tokens_draw(p, g), repeats, warmup=2)  # noqa: B023
        res.append({"vocab": v, "multinomial_ms": multi * 1e3, "inverse_cdf_ms": inv * 1e3, "ratio": multi / inv})
    return res


def decode_row(repeats: int) -> dict:
    from stillroom.generation import rollout
    from stillroom.testing import tiny_llama

    model = tiny_llama(49152, n_layer=6, hidden=576, n_head=9, intermediate=1536, seed=0).eval()
    prompts = [list(range(100 + 40 * r, 133 + 40 * r)) for r in range(4)]

    def run():
        return rollout.generate_ids(model, prompts, [], 0, max_new_tokens=32, do_sample=False)

    skinny = median_seconds(run, repeats, warmup=2)
    original = rollout.skinny_linears
    rollout.skinny_linears = lambda m: original(m, max_rows=0)  # every linear on nn.Linear's own path
    try:
        plain = median_seconds(run, repeats, warmup=2)
    finally:
        rollout.skinny_linears = original
    return {"plain_s": plain, "skinny_s": skinny, "ratio": plain / skinny}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--skip-decode", action="store_true", help="kernels only (a test)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print("machine:", machine())
    lin = linear_rows(a.repeats, tuple(a.rows))
    print("| weight | rows | F.linear ms | (W @ xᵀ)ᵀ ms | speed-up |\n|---|---|---|---|---|")
    for r in lin:
        print(f"| {r['shape']} | {r['rows']} | {r['linear_ms']:.2f} | {r['skinny_ms']:.2f} | {r['ratio']:.2f}× |")
    draws = draw_rows(a.repeats)
    print("\n| vocabulary | multinomial ms | inverse CDF ms | speed-up |\n|---|---|---|---|")
    for r in draws:
        print(f"| {r['vocab']:,} | {r['multinomial_ms']:.2f} | {r['inverse_cdf_ms']:.2f} | {r['ratio']:.1f}× |")
    dec = None if a.skip_decode else decode_row(max(1, a.repeats // 2))
    if dec:
        print(f"\ndecode 4 × (33 + 32 tokens), 6 × 576 Llama, 49k ids: nn.Linear {dec['plain_s']:.2f} s, "
              f"skinny {dec['skinny_s']:.2f} s ({dec['ratio']:.2f}×)")
    heads = [r for r in lin if "head" in r["shape"] and r["rows"] == 4]
    parts = [f"{r['shape'].split()[0]} head 4 rows {r['ratio']:.2f}x" for r in heads]
    parts += [f"draw {r['vocab']} {r['ratio']:.1f}x" for r in draws]
    if dec:
        parts.append(f"decode loop {dec['ratio']:.2f}x")
    print("SUMMARY: " + "; ".join(parts))
    return {"linear": lin, "draw": draws, "decode": dec}


if __name__ == "__main__":
    main()
