"""A same-tokenizer teacher made clearly weaker than Gemma-3: SmolLM2-135M-Instruct with middle layers removed.

``bench.real_fusion``'s bar — a stronger teacher of another tokenizer teaches at least as much as a weaker one of
the student's own — needs two teachers that differ as models *on the text they teach from*; SmolLM2 and
Gemma-3-270M differ there by 0.034 bits/byte (``bench.held_out_slices``), less than the price of any projection.
This script builds the weaker same-tokenizer teacher the bar can be tested with, by a rule fixed before any run:

- candidates: SmolLM2 without its ``n`` middle layers (:func:`dropped`), ``n`` = 1, 2, 3, …;
- scored on the *validation* works (``--chars`` characters from the middle of each; never the test works) beside
  Gemma-3 and the whole SmolLM2, in bits/byte;
- chosen: the smallest ``n`` whose candidate is worse than Gemma-3 by at least ``--gap`` (0.10 bits/byte: Gemma's
  lead where it is largest, the test works' openings) — a teacher still far better than any student here.

The chosen teacher is saved (safetensors, SmolLM2's tokenizer) to ``OUT/smollm2-minus-N``, ready for
``bench.real_fusion --smollm2``. Writes ``OUT/probe.json`` (every score, reused on a rerun) and ends with a
``SUMMARY:`` line.

    python -m bench.weaker_teacher --out runs/weaker-teacher
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import console, machine, summary  # noqa: E402
from bench.real_fusion import CORPUS, GEMMA3, SMOLLM2, VALIDATION_WORKS  # noqa: E402


def dropped(n_layers: int, n: int) -> list[int]:
    """The ``n`` contiguous layers in the middle of a stack of ``n_layers`` (the first of them at
    ``(n_layers − n) // 2``)."""
    start = (n_layers - n) // 2
    return list(range(start, start + n))


def kept(n_layers: int, n: int) -> list[int]:
    """The layers a candidate keeps: all but :func:`dropped`."""
    gone = set(dropped(n_layers, n))
    return [i for i in range(n_layers) if i not in gone]


def validation_text(corpus: Path, chars: int) -> list[str]:
    """``chars`` characters from the middle of each validation work."""
    from stillroom.inputs.text import load_texts

    works = ["".join(t for _, t in load_texts(corpus / w)) for w in VALIDATION_WORKS]
    return [w[len(w) // 2: len(w) // 2 + chars] for w in works]


def choose(scores: dict[str, float], gap: float) -> int | None:
    """The smallest ``n`` whose ``"minus N"`` score is ≥ Gemma-3's + ``gap``; None when no scored one is."""
    ok = [int(k.split()[1]) for k, v in scores.items() if k.startswith("minus ") and v >= scores["gemma3"] + gap]
    return min(ok) if ok else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gap", type=float, default=0.10, help="Gemma-3's lead the weaker teacher must leave, bits/byte")
    ap.add_argument("--chars", type=int, default=8000, help="characters from the middle of each validation work")
    ap.add_argument("--max-drop", type=int, default=12, help="give up past this many layers removed")
    ap.add_argument("--smollm2", default=SMOLLM2)
    ap.add_argument("--gemma3", default=GEMMA3)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/weaker-teacher"))
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoConfig

    from bench.real_fusion import bits_per_byte
    from stillroom.errors import ConfigError
    from stillroom.evaluation import load_model
    from stillroom.models.cut import cut_layers
    from stillroom.models.loading import load_tokenizer

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(f"machine: {machine()}")
    texts = validation_text(args.corpus, args.chars)
    path = args.out / "probe.json"
    scores = json.loads(path.read_text()) if path.exists() else {}

    def score(label: str, build) -> float:
        if label not in scores:
            model, tok = build()
            scores[label] = bits_per_byte(model, tok, texts, label)
            path.write_text(json.dumps(scores, indent=1))
            console.print(f"{label}: {scores[label]:.4f} bits/byte")
        return scores[label]

    score("gemma3", lambda: load_model(args.gemma3))
    score("smollm2", lambda: load_model(args.smollm2))
    n_layers = AutoConfig.from_pretrained(args.smollm2).num_hidden_layers  # no second load of the weights
    n = 0
    while choose(scores, args.gap) is None:
        n += 1
        if n > args.max_drop:
            raise ConfigError(f"no SmolLM2 without ≤ {args.max_drop} middle layers is {args.gap} bits/byte behind "
                              "Gemma-3; raise --max-drop or lower --gap")
        score(f"minus {n}", lambda n=n: (cut_layers(load_model(args.smollm2)[0], kept(n_layers, n)),
                                         load_tokenizer(args.smollm2)))
    n = choose(scores, args.gap)
    folder = args.out / f"smollm2-minus-{n}"
    if not (folder / "model.safetensors").exists():
        model = cut_layers(load_model(args.smollm2)[0], kept(n_layers, n))
        model.save_pretrained(folder)  # safetensors
        load_tokenizer(args.smollm2).save_pretrained(folder)
    summary(f"SmolLM2 without layers {dropped(n_layers, n)}: {scores[f'minus {n}']:.4f} bits/byte on the validation "
            f"works against Gemma-3's {scores['gemma3']:.4f} and SmolLM2's {scores['smollm2']:.4f} → {folder}")


if __name__ == "__main__":
    main()
