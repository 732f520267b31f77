"""Distillation losses at Qwen2.5-0.5B shapes on CPU: peak memory and time of forward + backward.

    python -m bench.losses                      # the full table (N = 1,024 and 4,096; heavy: run under flock)
    python -m bench.losses --n 1024 --only jsd  # a subset

Shapes: H = 896, V = 151,936, float32; student hidden [N, H] and head [V, H] with grad, a same-vocabulary
online teacher's hidden [N, H] and head [V, H] without. Each (loss, implementation, N) runs in a fresh child
process (``bench.common.run_child``) so its peak RSS is its own; the child times ``--repeats`` forward +
backward passes and reports the median.

Implementations:
- ``stillroom``: ``fused_linear_distill_loss`` / ``fused_linear_emo_loss`` (chunked, never N×V);
- ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss`` on materialised logits (skipped at N >= 2,048: it needs
  more than the 24 GB machine has);
- ``dense``: plain PyTorch on materialised logits (log_softmax, the formula, autograd);
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (``compiled=False`` on CPU), only when importable
  (``pip install --no-deps --target DIR liger-kernel`` and ``LIGER_PATH=DIR``);
- for EMO, ``reference``: the EMO authors' formulation with a materialised one-hot ``[N, V]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

H, V = 896, 151_936
IMPLS = {
    "jsd": ["stillroom", "liger", "trl", "dense"],
    "forward_kl": ["stillroom", "liger", "trl", "dense"],
    "reverse_kl": ["stillroom", "liger", "trl", "dense"],
    "sparse_topk": ["stillroom", "dense"],
    "emo": ["stillroom", "reference"],
}
BETA = {"jsd": 0.5, "forward_kl": 0.0, "reverse_kl": 1.0}
TOPK = 64
MATERIALISED = ("trl", "dense", "reference")


def _inputs(n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, H, generator=g).requires_grad_(True)
    w = torch.randn(V, H, generator=g).mul_(0.03).requires_grad_(True)
    th = torch.randn(n, H, generator=g)
    tw = torch.randn(V, H, generator=g).mul_(0.03)
    labels = torch.randint(0, V, (n,), generator=g)
    return h, w, th, tw, labels


def _sparse_target(th, tw, chunk: int = 128):
    """Top-k of the teacher distribution, built chunk by chunk (not part of the timed step)."""
    import torch

    from stillroom.targets import SparseTarget

    ids, lps = [], []
    with torch.no_grad():
        for a in range(0, th.shape[0], chunk):
            lp = torch.log_softmax(th[a:a + chunk] @ tw.T, -1)
            top = lp.topk(TOPK, -1)
            ids.append(top.indices)
            lps.append(top.values)
    ids, lps = torch.cat(ids), torch.cat(lps)
    tail = (1 - lps.exp().sum(-1)).clamp_min(0)
    return SparseTarget(ids, lps, tail, torch.ones(ids.shape[0], dtype=torch.bool))


def _step_fn(loss: str, impl: str, n: int):
    import torch
    import torch.nn.functional as F

    h, w, th, tw, labels = _inputs(n)
    beta = BETA.get(loss, 0.5)
    if loss == "sparse_topk":  # the teacher's head is not needed once its top-k target exists
        target = _sparse_target(th, tw)
        th = tw = None
    if loss == "emo":
        cost = tw  # a frozen cost embedding of head shape (the "fixed" copy)

    def run():
        if impl == "stillroom":
            from stillroom.losses import fused_linear_distill_loss, fused_linear_emo_loss

            if loss == "emo":
                out = fused_linear_emo_loss(h, w, cost, labels=labels, mode=1)
            elif loss == "sparse_topk":
                out = fused_linear_distill_loss(h, w, target=target, kind="forward_kl")
            else:
                out = fused_linear_distill_loss(h, w, teacher_hidden=th, teacher_weight=tw, kind="jsd", beta=beta)
        elif impl == "liger":
            sys.path.insert(0, os.environ["LIGER_PATH"])
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=False)
            out = fn(h, w, th, tw, labels)
        elif impl == "trl":
            from trl.experimental.gkd.gkd_trainer import GKDTrainer

            z = (h @ w.T).unsqueeze(0)
            with torch.no_grad():
                zt = (th @ tw.T).unsqueeze(0)
            out = GKDTrainer.generalized_jsd_loss(z, zt, labels=labels.unsqueeze(0), beta=beta)
        elif impl == "dense" and loss == "sparse_topk":  # materialised logits, gather the support, tail bucket
            logq = torch.log_softmax(h @ w.T, -1)
            lq_s = logq.gather(-1, target.ids)
            q_tail = (1 - lq_s.exp().sum(-1)).clamp_min(1e-30)
            p = target.logprobs.exp()
            per = (p * (target.logprobs - lq_s)).sum(-1) + torch.xlogy(target.tail, target.tail) \
                - target.tail * q_tail.log()
            out = per.mean()
        elif impl == "dense":
            logq = torch.log_softmax(h @ w.T, -1)
            with torch.no_grad():
                logp = torch.log_softmax(th @ tw.T, -1)
            if beta == 0.0:
                per = (logp.exp() * (logp - logq)).sum(-1)
            elif beta == 1.0:
                per = (logq.exp() * (logq - logp)).sum(-1)
            else:
                logm = torch.logaddexp(logp + torch.log(torch.tensor(beta)), logq + torch.log(torch.tensor(1 - beta)))
                per = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
            out = per.mean()
        elif impl == "reference":  # EMO authors' formulation: materialised one-hot [N, V], mode 1
            z = h @ w.T
            mle = F.cross_entropy(z, labels, reduction="none")
            one_hot = F.one_hot(labels, V).to(z.dtype)
            emb = cost / torch.linalg.vector_norm(cost, dim=1, keepdim=True)
            p_repr = one_hot @ emb
            q_repr = torch.softmax(z, -1) @ emb
            emo = 1 - (p_repr * q_repr).sum(-1)
            out = ((torch.clamp((mle / (emo + 1e-10)).detach(), max=3.0) * emo + mle) * 0.5).mean()
        else:
            raise ValueError(f"unknown implementation {impl} for {loss}")
        out.backward()
        value = float(out)
        h.grad = None
        w.grad = None
        return value

    return run


def child(loss: str, impl: str, n: int, repeats: int) -> dict:
    import torch

    from bench.common import peak_rss_gb

    torch.manual_seed(0)
    run = _step_fn(loss, impl, n)
    inputs_gb = peak_rss_gb()
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = run()
        times.append(time.perf_counter() - t)
    return {"loss": loss, "impl": impl, "n": n, "seconds": statistics.median(times), "peak_gb": peak_rss_gb(),
            "inputs_gb": inputs_gb, "value": value}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--only", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--impls", nargs="+", default=None, help="restrict implementations")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-n-materialised", type=int, default=1024,
                    help="largest N for peers that materialise N×V logits (TRL needs > 24 GB at 2,048)")
    ap.add_argument("--max-n-liger", type=int, default=1024)
    ap.add_argument("--child", nargs=3, metavar=("LOSS", "IMPL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        loss, impl, n = args.child
        print(json.dumps(child(loss, impl, int(n), args.repeats)), flush=True)
        return

    from bench.common import machine, print_table, run_child, summary

    have_liger = bool(os.environ.get("LIGER_PATH"))
    rows, results = [], {}
    for loss in args.only:
        for n in args.n:
            for impl in IMPLS[loss]:
                if args.impls and impl not in args.impls:
                    continue
                if impl == "liger" and not have_liger:
                    continue
                if impl in MATERIALISED and n > args.max_n_materialised:
                    rows.append([loss, n, impl, "skipped (N×V logits: out of the shared 24 GB)", "", "", ""])
                    continue
                if impl == "liger" and n > args.max_n_liger:
                    rows.append([loss, n, impl, "skipped (--max-n-liger)", "", "", ""])
                    continue
                r = run_child("bench.losses", ["--child", loss, impl, str(n), "--repeats", str(args.repeats)])
                results[(loss, n, impl)] = r
                if "error" in r:
                    rows.append([loss, n, impl, f"error: {r['error']}", "", "", ""])
                else:
                    rows.append([loss, n, impl, r["peak_gb"], r["inputs_gb"], r["seconds"], r["value"]])
                print(json.dumps({"loss": loss, "n": n, "impl": impl, **r}), flush=True)
    print_table(f"forward + backward at H={H}, V={V}, fp32 — {machine()}",
                ["loss", "N", "impl", "peak RSS GB", "after inputs GB", "median s", "loss value"], rows)
    parts = []
    for (loss, n, impl), r in results.items():
        if impl == "stillroom" and "error" not in r:
            parts.append(f"{loss}@{n} {r['peak_gb']:.2f}GB {r['seconds']:.1f}s")
    summary("stillroom " + "; ".join(parts))


if __name__ == "__main__":
    main()
