"""A student exported to GGUF and run by llama.cpp, side by side with transformers on the original folder.

Each ``--models LABEL=FOLDER`` (default: SmolLM2-135M-Instruct's converted folder, a Llama with a byte-level BPE
tokenizer; also e.g. Gemma-3-270M's, SentencePiece-style, or a student bench.real_fusion kept with
``--keep-models``) written by ``stillroom.models.export.export_gguf`` as f16 and q8_0; each file loaded by llama.cpp
(llama-cpp-python, ``n_threads`` = ``--threads``). Per dtype: export seconds, file size, held-out bits per
byte through llama.cpp and through transformers (float32) on the same token ids — the first ``--eval-chars``
characters of bench.real_fusion's four test works, BOS first, every text token scored — the tokenization
check (llama.cpp's own tokenizer on those texts equals the Hugging Face one), and greedy generation speed
(``--new-tokens`` tokens after a short prompt, median of ``--repeats``) next to transformers' ``generate``.

    python -m bench.export_gguf --out runs/bench-export
    python -m bench.export_gguf --models gemma3=$(stillroom models get gemma3-270m) cut=runs/rf-200/seed1/ce-only/model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import console, machine, real_model, summary  # noqa: E402

SMOLLM2 = real_model("smollm2-135m-instruct")
PROMPT = "To be, or not to be, that is the question:"


def sequences(tok, texts: list[str]) -> list[list[int]]:
    bos = tok.bos_token_id
    return [([bos] if bos is not None else []) + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def nll_transformers(model, seqs: list[list[int]]) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([s])
            lp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
            total -= float(lp.gather(1, x[0, 1:, None]).sum())
    return total


def nll_llama(llm, seqs: list[list[int]]) -> float:
    import numpy as np

    total = 0.0
    for s in seqs:
        llm.reset()
        llm.eval(s)
        z = np.asarray(llm.scores[: len(s) - 1], dtype=np.float64)
        m = z.max(-1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(z - m).sum(-1)))
        total -= float((z[np.arange(len(s) - 1), s[1:]] - lse).sum())
    return total


def measure(label: str, folder: str, texts: list[str], args) -> dict:
    """One model: transformers' bits/byte and greedy speed on the folder, then per dtype the export, the file,
    llama.cpp's tokenization, bits/byte, greedy speed and greedy tokens."""
    import torch
    from llama_cpp import Llama

    from stillroom.evaluation import load_model
    from stillroom.models.export import export_gguf

    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    model, tok = load_model(folder)
    model.eval()
    seqs = sequences(tok, texts)
    res = {"folder": str(folder), "bytes": n_bytes, "tokens": sum(len(s) for s in seqs),
           "folder_mb": sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 1e6}
    res["transformers_bpb"] = nll_transformers(model, seqs) / math.log(2) / n_bytes
    prompt = tok(PROMPT)["input_ids"]
    hf_s = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.no_grad():
            hf_out = model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                                    min_new_tokens=args.new_tokens)[0, len(prompt):].tolist()
        hf_s.append(time.perf_counter() - t)
    res["transformers_gen_tok_s"] = args.new_tokens / statistics.median(hf_s)
    del model
    for dtype in args.dtypes:
        path = args.out / f"{label}-{dtype}.gguf"
        t = time.perf_counter()
        export_gguf(folder, path, dtype=dtype, overwrite=True, progress=False)
        r = {"export_s": time.perf_counter() - t, "mb": path.stat().st_size / 1e6}
        llm = Llama(model_path=str(path), n_ctx=1024, logits_all=True, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
        r["same_tokens"] = all(llm.tokenize(x.encode(), add_bos=False, special=False) == s[len(s) - len(
            tok(x, add_special_tokens=False)["input_ids"]):] for x, s in zip(texts, seqs, strict=True))
        r["llama_cpp_bpb"] = nll_llama(llm, seqs) / math.log(2) / n_bytes
        del llm
        gen = Llama(model_path=str(path), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads,
                    verbose=False)
        secs, out = [], []
        for _ in range(args.repeats):
            gen.reset()
            t = time.perf_counter()
            out = []
            for tok_id in gen.generate(prompt, temp=0.0):
                out.append(tok_id)
                if len(out) == args.new_tokens:
                    break
            secs.append(time.perf_counter() - t)
        r["gen_tok_s"] = args.new_tokens / statistics.median(secs)
        r["greedy_tokens_agreeing"] = next((i for i, (a, b) in enumerate(zip(out, hf_out, strict=False))
                                           if a != b), len(out))  # how many first tokens both engines agree on
        res[dtype] = r
        del gen
        if not args.keep_files:
            path.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[f"smollm2={SMOLLM2}"], help="LABEL=FOLDER, one or more")
    ap.add_argument("--eval-chars", type=int, default=2000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--keep-files", action="store_true", help="keep the exported GGUF files in OUT")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-export"))
    args = ap.parse_args()

    import torch

    from bench.real_fusion import CORPUS, TEST_WORKS

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    texts = [(CORPUS / w).read_text(encoding="utf-8")[: args.eval_chars] for w in TEST_WORKS]
    res = {"machine": machine(), "threads": args.threads, "new_tokens": args.new_tokens}
    for spec in args.models:
        label, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--models {spec!r}: write LABEL=FOLDER")
        res[label] = measure(label, folder, texts, args)
        (args.out / "results.json").write_text(json.dumps(res, indent=1))
        console.print_json(json.dumps(res[label]))
    summary("; ".join(f"{m} {d}: {res[m][d]['mb']:.0f} MB, {res[m][d]['llama_cpp_bpb']:.4f} bits/byte via llama.cpp "
                      f"vs {res[m]['transformers_bpb']:.4f} via transformers, {res[m][d]['gen_tok_s']:.0f} tok/s "
                      f"greedy (transformers {res[m]['transformers_gen_tok_s']:.0f})"
                      for m in (s.partition("=")[0] for s in args.models) for d in args.dtypes))


if __name__ == "__main__":
    main()
