"""Packing: how much of every training block is padding, per ``.txt`` document rule, packed or not.

    python -m bench.packing

Data: the demo's training works (``stillroom/data/corpus/train``) read with each ``data.documents`` rule; the
demo's student tokenizer; blocks of 128 tokens. Peer: the same documents one per block (``pack=False``) — with
``documents="line"`` that is what a ``.txt`` got before packing (one example per line, each its own block).
"""

from __future__ import annotations

import time
import warnings

from bench.common import machine, print_table, summary


def main() -> None:
    from transformers import AutoTokenizer

    from stillroom.demo import CORPUS, DEFAULT
    from stillroom.inputs.blocks import make_blocks, padding_fraction
    from stillroom.inputs.text import load_texts

    tok = AutoTokenizer.from_pretrained(DEFAULT / "student-tokenizer")
    rows_out, pad = [], {}
    for docs, pack in (("line", False), ("line", True), ("paragraph", True), ("file", False), ("file", True)):
        rows = load_texts(CORPUS / "train", documents=docs)
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = make_blocks(rows, tok, 128, pack=pack)
        sec = time.perf_counter() - t
        pad[docs, pack] = padding_fraction(blocks, 128)
        rows_out.append([docs, pack, f"{len(rows):,}", f"{len(blocks):,}",
                         f"{sum(len(b.input_ids) for b in blocks) / len(blocks):.1f}", f"{pad[docs, pack]:.1%}",
                         f"{sec:.1f} s"])
    print(machine())
    print_table("blocks of 128 student tokens", ["documents", "packing", "documents", "blocks", "tokens/block",
                                                  "padding", "time"], rows_out)
    summary(f"padding one line per block {pad['line', False]:.1%} -> packed {pad['line', True]:.1%} "
            f"(file documents packed {pad['file', True]:.1%})")


if __name__ == "__main__":
    main()
