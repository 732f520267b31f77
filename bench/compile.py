"""Does ``train.compile`` (torch.compile of each decoder layer) pay on this machine? Training tokens/s with and
without, and the compile time it costs first.

    flock /tmp/stillroom-heavy.lock python -m bench.compile [--steps 5] [--batch 4] [--seq 256]

The step is the trainer's plain-CE step: the student's forward up to its last hidden states (``last_hidden``,
as :class:`stillroom.training.trainer.DistillTrainer` runs it), the chunked fused-linear CE, backward and an AdamW step.
Students: a tiny GPT-2 (2 layers, 128 wide, the fixture tokenizer's vocabulary) and, when SmolLM2-135M is
converted here (``stillroom models get smollm2-135m-instruct``), the student cut from it to 6 of its 30 layers
(``stillroom.models.cut``). Both arms are built and warmed up (``--warmup`` steps: compilation happens here; their time
beyond as many steady steps is reported as the compile cost), then ``--steps`` steps of each run round robin,
eager and compiled alternating, so that a busy machine slows both alike; medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import cpu_line, print_table, summary
from stillroom import losses
from stillroom.models.registry import converted_folder
from stillroom.training import switches
from stillroom.training.recipe import TrainSpec
from stillroom.training.trainer import last_hidden

CUT_LAYERS = [0, 6, 12, 18, 24, 29]


def tiny_student():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=4096, n_positions=512, n_embd=128, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def cut_student():
    from stillroom.models.cut import cut_from

    folder = converted_folder("smollm2-135m-instruct")
    return None if folder is None else cut_from(folder, CUT_LAYERS)


def make_step(model, compile_: bool, batch: int, seq: int):
    """A function running one plain-CE training step of ``model`` (compiled per layer or not); returns seconds."""
    from stillroom.models import runtime as modeling

    modeling.fast_activations(model)
    switches.apply(model, TrainSpec(compile=compile_))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    weight = model.get_output_embeddings().weight

    def step() -> float:
        start = time.perf_counter()
        h = last_hidden(model, inputs)[:, :-1].reshape(-1, weight.shape[1])
        loss = losses.fused_linear_distill_loss(h, weight, labels=ids[:, 1:].reshape(-1), ce_weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--tiny-only", action="store_true")
    a = ap.parse_args()
    rows, ratios = [], {}
    for name, make in (("tiny GPT-2", tiny_student), ("SmolLM2 cut 6/30", cut_student)):
        if a.tiny_only and name != "tiny GPT-2":
            continue
        models = [make(), make()]
        if models[0] is None:
            continue
        steps = [make_step(m, c, a.batch, a.seq) for m, c in zip(models, (False, True), strict=True)]
        warm = [[step() for _ in range(a.warmup)] for step in steps]  # compilation happens in the first calls
        timed: list[list[float]] = [[], []]
        for _ in range(a.steps):  # round robin: a busy machine slows both arms alike
            for j, step in enumerate(steps):
                timed[j].append(step())
        med = [statistics.median(t) for t in timed]
        for j, arm in enumerate(("eager", "compiled")):
            extra = sum(warm[j]) - a.warmup * med[j]  # what the first steps cost beyond steady-state steps
            rows.append([name, arm, f"{a.batch * a.seq / med[j]:.0f}",
                         " ".join(f"{a.batch * a.seq / t:.0f}" for t in timed[j]), f"{max(extra, 0):.1f}"])
            print(rows[-1], flush=True)
        ratios[name] = med[0] / med[1]
        del models, steps
    print_table(f"train.compile, batch {a.batch}x{a.seq} (machine: {cpu_line()})",
                ["student", "arm", "tokens/s (median)", "per step", "compile s"], rows)
    summary(", ".join(f"{n}: compiled {r:.2f}x eager tokens/s" for n, r in ratios.items()) + f" [{cpu_line()}]")


if __name__ == "__main__":
    main()
