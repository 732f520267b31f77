"""bench.served and bench.export_gguf: the agreement measure checked by hand, and the llama.cpp scoring against
transformers on a tiny GGUF (the real-model runs are in docs/benchmarks/served.md and export_gguf.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest


def test_shared_bins_kl_by_hand():
    from bench.served import shared_bins_kl

    # a: {1: .5, 2: .3} tail .2; b: {2: .4, 3: .5} tail .1. Shared id 2: bins (2, rest): a (.3, .7), b (.4, .6)
    a_ids, a_lp = np.array([1, 2]), np.log([0.5, 0.3])
    b_ids, b_lp = np.array([2, 3]), np.log([0.4, 0.5])
    want = 0.3 * math.log(0.3 / 0.4) + 0.7 * math.log(0.7 / 0.6)
    assert shared_bins_kl(a_ids, a_lp, 0.2, b_ids, b_lp) == pytest.approx(want, rel=1e-9)
    assert shared_bins_kl(a_ids, a_lp, 0.2, a_ids, a_lp) == pytest.approx(0.0, abs=1e-12)
    # padding entries (-inf) are not ids
    pad = np.array([2, 0]), np.array([math.log(0.3), -np.inf])
    assert shared_bins_kl(a_ids, a_lp, 0.2, *pad) == pytest.approx(0.0, abs=1e-12)


def test_llama_cpp_scoring_equals_transformers(probe_teacher):
    """bench.export_gguf's two scorers on the same ids: llama.cpp on the f32 GGUF, transformers on the folder."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.export_gguf import nll_llama, nll_transformers, sequences

    folder, gguf = probe_teacher
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seqs = sequences(tok, ["To be, or not to be, that is the question.", "1, 2, 3, 4, 5"])
    llm = Llama(model_path=str(gguf), n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0)
    assert nll_llama(llm, seqs) == pytest.approx(nll_transformers(model, seqs), rel=1e-4)
