"""Alignment and projection, checked against independent references: a two-pointer byte-offset aligner,
FuseLLM's plain-Python DTW (bench/align.py), hand-worked examples, and the tokenizers themselves."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.align import fusellm_dtw_reference
from stillroom.testing import SHARED_TOKENIZERS
from stillroom.tokenization.align import align, dtw_path, fusellm_strings, path_to_groups
from stillroom.tokenization.project import project
from stillroom.tokenization.tokens import TokenTable
from tests.test_tokens import ADVERSARIAL, passages

LOSSLESS = ("gpt2", "llama3", "qwen2.5", "deepseek-coder", "mistral-spm")
SPECIAL_ONLY = ["<|endoftext|>", "<s></s>", "[CLS][SEP]", "<｜begin▁of▁sentence｜><|im_end|>"]


# ---------------------------------------------------------------------------------------------- helpers
def tok_and_table(shared_tokenizer, name):
    tok = shared_tokenizer(name)
    return tok, TokenTable.from_tokenizer(tok)


def check_partition(al, n_src, n_tgt):
    """Groups cover both sequences, in order, with no gaps, overlaps or empty groups."""
    g = al.groups
    assert g.dtype == np.int64 and g.ndim == 2 and g.shape[1] == 4 and al.exact.shape == (g.shape[0],)
    s = t = 0
    for s0, s1, t0, t1 in g.tolist():
        assert (s0, t0) == (s, t) and s1 >= s0 and t1 >= t0 and (s1 > s0 or t1 > t0), g.tolist()
        s, t = s1, t1
    assert (s, t) == (n_src, n_tgt)


def check_exact_bytes(al):
    """Exact groups spell identical bytes (bytes from each tokenizer's own stream, sliced by token)."""
    a, a_off = al.src_table.pieces(al.src_ids)
    b, b_off = al.tgt_table.pieces(al.tgt_ids)
    for (s0, s1, t0, t1), ex in zip(al.groups.tolist(), al.exact.tolist(), strict=True):
        if ex:
            assert a[a_off[s0]:a_off[s1]].tobytes() == b[b_off[t0]:b_off[t1]].tobytes()


def text_groups_exact(al) -> bool:
    """Every group holding a non-special token is exact (unpaired BOS/EOS groups are not)."""
    sa = ~al.src_table.is_special[al.src_ids]
    sb = ~al.tgt_table.is_special[al.tgt_ids]
    for (s0, s1, t0, t1), ex in zip(al.groups.tolist(), al.exact.tolist(), strict=True):
        if (sa[s0:s1].any() or sb[t0:t1].any()) and not ex:
            return False
    return True


def reference_exact_groups(a_lens, b_lens):
    """Plain two-pointer walk: cut wherever both running byte totals agree (non-empty tokens only)."""
    groups, i, j, pa, pb, si, sj = [], 0, 0, 0, 0, 0, 0
    while i < len(a_lens) or j < len(b_lens):
        if pa <= pb and i < len(a_lens):
            pa += a_lens[i]
            i += 1
        else:
            pb += b_lens[j]
            j += 1
        if pa == pb and (i == len(a_lens) or a_lens[i] > 0) and (j == len(b_lens) or b_lens[j] > 0):
            groups.append((si, i, sj, j))
            si, sj = i, j
    return groups


def exact_bytes_map(src: TokenTable, tgt: TokenTable):
    """A simple VocabMap stand-in: source id -> target id with identical bytes, else -1."""
    index = {}
    for i, b in enumerate(tgt.token_bytes):
        if b and not tgt.is_special[i]:
            index.setdefault(b, i)
    return SimpleNamespace(mapping=np.array([index.get(b, -1) if b else -1 for b in src.token_bytes], dtype=np.int64))


@pytest.fixture(scope="module")
def texts(shared):
    return passages(shared, n=4, size=400) + ADVERSARIAL + SPECIAL_ONLY


# ---------------------------------------------------------------------------------------------- exact mode
def test_all_pairs_partition_and_exact_bytes(shared_tokenizer, texts):
    tables = {n: tok_and_table(shared_tokenizer, n) for n in SHARED_TOKENIZERS}
    encoded = {n: [np.array(tok(t).input_ids) for t in texts] for n, (tok, _) in tables.items()}
    for s_name, t_name in itertools.product(SHARED_TOKENIZERS, repeat=2):
        for k, text in enumerate(texts):
            a, b = encoded[s_name][k], encoded[t_name][k]
            al = align(a, b, tables[s_name][1], tables[t_name][1])
            check_partition(al, len(a), len(b))
            check_exact_bytes(al)
            if s_name in LOSSLESS and t_name in LOSSLESS and text not in SPECIAL_ONLY and "\u0301" not in text \
                    and "\u0308" not in text:
                assert text_groups_exact(al), (s_name, t_name, text)  # same text, lossless: all text exact


@pytest.mark.parametrize("pair", [("llama3", "mistral-spm"), ("qwen2.5", "gpt2"), ("deepseek-coder", "llama3")])
def test_exact_matches_two_pointer_reference(pair, shared_tokenizer, texts):
    (ta, A), (tb, B) = (tok_and_table(shared_tokenizer, n) for n in pair)
    for text in texts[:4] + ADVERSARIAL:
        if "\u0301" in text or "\u0308" in text:
            continue
        a = [i for i in ta(text).input_ids if not A.is_special[i]]
        b = [i for i in tb(text).input_ids if not B.is_special[i]]
        al = align(a, b, A, B)
        ref = reference_exact_groups(np.diff(A.pieces(a)[1]).tolist(), np.diff(B.pieces(b)[1]).tolist())
        if not ref and (a or b):
            ref = [(0, len(a), 0, len(b))]
        assert [tuple(g) for g in al.groups.tolist()] == ref, text


def test_fixture_tokenizers(tiny_models, shared_tokenizer, texts):
    from transformers import AutoTokenizer

    toks = {n: AutoTokenizer.from_pretrained(tiny_models[n]) for n in ("gpt2-bpe", "llama-spm")}
    toks["llama3"] = shared_tokenizer("llama3")
    tables = {n: TokenTable.from_tokenizer(t) for n, t in toks.items()}
    for s_name, t_name in itertools.permutations(toks, 2):
        for text in texts:
            a, b = toks[s_name](text).input_ids, toks[t_name](text).input_ids
            al = align(a, b, tables[s_name], tables[t_name])
            check_partition(al, len(a), len(b))
            check_exact_bytes(al)
            if text not in SPECIAL_ONLY:  # those are text to one tokenizer and a special to the other
                assert text_groups_exact(al), (s_name, t_name, text)


def test_newline_byte_tokens_and_split_characters(shared_tokenizer):
    """FuseLLM compares strings: `<0x0A>` never matches `Ċ`, byte pieces of a character never match it."""
    (tl, L), (tm, M) = tok_and_table(shared_tokenizer, "llama3"), tok_and_table(shared_tokenizer, "mistral-spm")
    a, b = tl("a\nb").input_ids, tm("a\nb").input_ids
    assert tm.convert_ids_to_tokens(b) == ["<s>", "▁a", "<0x0A>", "b"]
    al = align(a, b, L, M)
    newline = [i for i, g in enumerate(al.groups.tolist()) if M.token_strings[b[g[2]]] == "<0x0A>"]
    assert len(newline) == 1 and al.exact[newline[0]] and al.one_to_one[newline[0]]
    assert fusellm_strings(L, np.array([a[1]])) == ["Ċ"]  # what FuseLLM's cost function would compare
    (tg, G) = tok_and_table(shared_tokenizer, "gpt2")
    a, b = tg(" 東京").input_ids, tl(" 東京").input_ids
    al = align(a, b, G, L)
    assert al.exact.all() and al.groups.tolist()[0][1] - al.groups.tolist()[0][0] >= 2  # bytes of 東 in one group


def test_digit_splits(shared_tokenizer):
    (tl, L), (tq, Q) = tok_and_table(shared_tokenizer, "llama3"), tok_and_table(shared_tokenizer, "qwen2.5")
    a, b = tl("year 1850.").input_ids, tq("year 1850.").input_ids
    assert tl.convert_ids_to_tokens(a) == ["year", "Ġ", "185", "0", "."]
    assert tq.convert_ids_to_tokens(b) == ["year", "Ġ", "1", "8", "5", "0", "."]
    al = align(a, b, L, Q)
    # FuseLLM's string DTW pairs "185" with one of "1", "8", "5"; bytes give 185 = 1|8|5 and 0 = 0
    assert al.groups.tolist() == [[0, 1, 0, 1], [1, 2, 1, 2], [2, 3, 2, 5], [3, 4, 5, 6], [4, 5, 6, 7]]
    assert al.exact.all()


def test_lossy_tokenizers_mark_differences(shared_tokenizer):
    (tb, B), (tg, G) = tok_and_table(shared_tokenizer, "bert-uncased"), tok_and_table(shared_tokenizer, "gpt2")
    text = "The Naïve CAFÉ opened in 1850 😀 ok"
    a, b = tb(text).input_ids, tg(text).input_ids
    al = align(a, b, B, G)
    check_partition(al, len(a), len(b))
    groups = al.to_dict()["groups"]
    by_src = {" ".join(g["src_tokens"]): g for g in groups}
    assert by_src["opened"]["exact"] and by_src["1850"]["exact"] and by_src["1850"]["tgt_tokens"] == ["Ġ1850"]
    assert by_src["naive"]["tgt_text"] == " Naïve" and not by_src["naive"]["exact"]  # accents stripped
    assert not by_src["the"]["exact"]  # lowercased
    assert groups[0]["src_tokens"] == ["[CLS]"] and groups[-1]["src_tokens"] == ["[SEP]"]  # specials alone
    unk = [g for g in groups if "[UNK]" in g["src_tokens"]]
    assert len(unk) == 1 and not unk[0]["exact"] and "😀" in "".join(unk[0]["tgt_text"])
    assert 0.2 < al.exact_fraction < 1.0


def test_special_tokens_get_own_groups(shared_tokenizer):
    (tm, M), (tl, L) = tok_and_table(shared_tokenizer, "mistral-spm"), tok_and_table(shared_tokenizer, "llama3")
    bos_l = tl.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")
    a = tm("Hello world").input_ids + [tm.eos_token_id]
    b = [bos_l] + tl("Hello world").input_ids
    al = align(a, b, M, L)
    assert al.groups.tolist() == [[0, 1, 0, 1], [1, 2, 1, 2], [2, 3, 2, 3], [3, 4, 3, 3]]
    assert al.exact.tolist() == [True, True, True, False]


# ---------------------------------------------------------------------------------------------- dtw mode
@pytest.mark.parametrize("pair", [("llama3", "mistral-spm"), ("qwen2.5", "gpt2"), ("bert-uncased", "t5-unigram-1k")])
def test_dtw_identical_to_fusellm_reference(pair, shared_tokenizer, texts):
    (ta, A), (tb, B) = (tok_and_table(shared_tokenizer, n) for n in pair)
    for text in texts[:2] + ["a\nb 1850 東京", "Hello, it's  é\n1850 😀"]:
        a, b = np.array(ta(text).input_ids[:120]), np.array(tb(text).input_ids[:120])
        sa, sb = fusellm_strings(A, a), fusellm_strings(B, b)
        assert dtw_path(sa, sb) == fusellm_dtw_reference(sa, sb)
        al = align(a, b, A, B, mode="dtw")
        check_partition(al, len(a), len(b))
        check_exact_bytes(al)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "ab", "ba", "", "abc", "Ġa", "▁b"]), min_size=1, max_size=10),
       st.lists(st.sampled_from(["a", "b", "ab", "ba", "", "abc", "c"]), min_size=1, max_size=10))
def test_dtw_random_strings(a, b):
    path = dtw_path(a, b)
    assert path == fusellm_dtw_reference(a, b)
    groups = path_to_groups(path, len(a), len(b))
    assert groups[0, 0] == 0 and groups[-1, 1] == len(a) and groups[-1, 3] == len(b)
    assert (groups[1:, 0] == groups[:-1, 1]).all() and (groups[1:, 2] == groups[:-1, 3]).all()


# ---------------------------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), pair=st.sampled_from(list(itertools.product(SHARED_TOKENIZERS, repeat=2))),
       seed=st.integers(0, 2**16))
def test_properties_random_unicode(text, pair, seed, shared_tokenizer):
    (ta, A), (tb, B) = (tok_and_table(shared_tokenizer, n) for n in pair)
    a, b = np.array(ta(text).input_ids, dtype=np.int64), np.array(tb(text).input_ids, dtype=np.int64)
    al = align(a, b, A, B)
    check_partition(al, len(a), len(b))
    check_exact_bytes(al)
    self_al = align(a, a, A, A)  # a tokenization aligned with itself is the identity
    assert self_al.groups.tolist() == [[i, i + 1, i, i + 1] for i in range(len(a))] and self_al.exact.all()
    # projection: mass preserved, ids inside the student vocabulary
    rng = np.random.default_rng(seed)
    k = 4
    logits = torch.tensor(rng.normal(size=(len(a), 64)) * 2)
    cand = torch.tensor(rng.integers(0, A.vocab_size, size=(len(a), 64)))
    lp = torch.log_softmax(logits, -1)
    top_lp, top_i = lp.topk(k, -1)
    top_ids = torch.gather(cand, 1, top_i)
    for fallback in ("onehot", "bytes", "none"):
        out = project(top_ids, top_lp, al, exact_bytes_map(A, B), b, fallback=fallback)
        assert out.ids.shape == (len(b), k)
        assert ((out.ids >= 0) & (out.ids < B.vocab_size)).all()
        total = out.logprobs.exp().sum(-1) + out.tail
        assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


# ---------------------------------------------------------------------------------------------- projection
def test_projection_shift_hand_checked(shared_tokenizer):
    """Teacher llama3, student qwen2.5 on "year 1850." — hand-worked rows.

    teacher: year | Ġ | 185 | 0 | .        student: year | Ġ | 1 | 8 | 5 | 0 | .
    groups: year=year, Ġ=Ġ, 185=1|8|5, 0=0, .=.
    Student row j predicts student token j+1; teacher row i predicts teacher token i+1.
    row 0 -> "Ġ": 1-to-1 group starting at teacher token 1, so teacher row 0 transfers;
    row 1 -> "1": starts the 185=1|8|5 group (not 1-to-1): one-hot on "1" (FuseLLM fallback, next token);
    rows 2, 3 -> "8", "5": inside that group, one-hot; row 4 -> "0": 1-to-1 with teacher token 3, so teacher
    row 2; row 5 -> ".": teacher row 3; row 6 has nothing to predict (invalid).
    """
    (tl, L), (tq, Q) = tok_and_table(shared_tokenizer, "llama3"), tok_and_table(shared_tokenizer, "qwen2.5")
    a, b = tl("year 1850.").input_ids, tq("year 1850.").input_ids
    al = align(a, b, L, Q)
    vm = exact_bytes_map(L, Q)
    # teacher row i puts 0.6 on a marker token and 0.3 on its true next token; 0.1 is in the tail
    t = tl.convert_tokens_to_ids
    nxt = torch.tensor([t(x) for x in ("Ġ", "185", "0", ".", "year")])
    markers = torch.tensor([t(x) for x in ("a", "b", "c", "d", "e")])
    t_ids = torch.stack([markers, nxt], 1)
    t_lp = torch.log(torch.tensor([[0.6, 0.3]] * 5))
    tail = torch.full((5,), 0.1)
    out = project(t_ids, t_lp, al, vm, b, fallback="onehot", teacher_tail=tail)
    assert out.valid.tolist() == [True] * 6 + [False]
    q = tq.convert_tokens_to_ids

    def row(target, j):
        return {i: p for i, p in zip(target.ids[j].tolist(), target.logprobs[j].exp().tolist(), strict=True) if p > 0}

    def close(got, want):
        return got.keys() == want.keys() and all(abs(got[x] - want[x]) < 1e-6 for x in want)

    assert close(row(out, 0), {q("a"): 0.6, q("Ġ"): 0.3}) and abs(out.tail[0] - 0.1) < 1e-6
    for j, gold in [(1, "1"), (2, "8"), (3, "5")]:  # one-hot on the NEXT student token
        assert close(row(out, j), {q(gold): 1.0}) and out.tail[j] == 0
    assert close(row(out, 4), {q("c"): 0.6, q("0"): 0.3})  # teacher row 2
    assert close(row(out, 5), {q("d"): 0.6, q("."): 0.3})  # teacher row 3
    # "bytes": row 1 uses teacher row 1 (predicting "185"); "185" starts with the gold "1", so its 0.3 goes there
    out_b = project(t_ids, t_lp, al, vm, b, fallback="bytes", teacher_tail=tail)
    assert close(row(out_b, 1), {q("b"): 0.6, q("1"): 0.3}) and abs(out_b.tail[1] - 0.1) < 1e-6
    assert close(row(out_b, 2), {q("8"): 1.0})
    out_n = project(t_ids, t_lp, al, vm, b, fallback="none")
    assert out_n.valid.tolist() == [True, False, False, False, True, True, False]
    # "prefix": the group start also uses teacher row 1, and "185" gives its mass to the student token that
    # begins it ("1"), whatever the vocabulary map says; inside the group, one-hot
    out_p = project(t_ids, t_lp, al, np.zeros(L.vocab_size, np.int64), b, fallback="prefix", teacher_tail=tail)
    assert close(row(out_p, 1), {q("b"): 0.6, q("1"): 0.3}) and abs(out_p.tail[1] - 0.1) < 1e-6
    assert close(row(out_p, 2), {q("8"): 1.0}) and close(row(out_p, 4), {q("c"): 0.6, q("0"): 0.3})
    assert out_p.valid.tolist() == out.valid.tolist()
    # fill=False: the rows the fallback would make one-hot are left to other teachers (valid=False);
    # fill_onehot with the next student tokens puts them back as they were
    out_f = project(t_ids, t_lp, al, vm, b, fallback="onehot", teacher_tail=tail, fill=False)
    assert out_f.valid.tolist() == [True, False, False, False, True, True, False]
    refilled = out_f.fill_onehot(torch.tensor([*b[1:], -100]))
    assert refilled.valid.tolist() == out.valid.tolist()
    assert all(close(row(refilled, j), row(out, j)) for j in range(6))
    out_pf = project(t_ids, t_lp, al, np.zeros(L.vocab_size, np.int64), b, fallback="prefix", fill=False)
    assert out_pf.valid.tolist() == [True, True, False, False, True, True, False]
    assert close(row(out_pf, 1), row(out_p, 1))


def test_projection_same_tokenizer_is_shifted_copy(shared_tokenizer):
    tok, G = tok_and_table(shared_tokenizer, "gpt2")
    ids = tok("To be, or not to be").input_ids
    al = align(ids, ids, G, G)
    T = len(ids)
    t_ids = torch.tensor([[ids[(i + 1) % T], 40000, 40001] for i in range(T)])
    t_lp = torch.log(torch.tensor([[0.5, 0.25, 0.125]] * T))
    out = project(t_ids, t_lp, al, SimpleNamespace(mapping=np.arange(G.vocab_size)), ids)
    for j in range(T - 1):
        got = dict(zip(out.ids[j].tolist(), out.logprobs[j].exp().tolist(), strict=True))
        want = {ids[j + 1]: 0.5, 40000: 0.25, 40001: 0.125}
        for key, v in want.items():
            assert abs(got.get(key, 0) - v) < 1e-6
        assert abs(out.tail[j] - 0.125) < 1e-6
    assert not out.valid[-1]


def test_projection_sums_duplicates_and_keeps_unmapped_mass_in_tail(shared_tokenizer):
    tok, G = tok_and_table(shared_tokenizer, "gpt2")
    ids = tok("one two").input_ids
    al = align(ids, ids, G, G)
    mapping = np.arange(G.vocab_size)
    mapping[5] = 7  # two teacher ids land on student id 7
    mapping[9] = -1  # unmappable
    t_ids = torch.tensor([[5, 7, 9]] * len(ids))
    t_lp = torch.log(torch.tensor([[0.4, 0.3, 0.2]] * len(ids)))
    out = project(t_ids, t_lp, al, SimpleNamespace(mapping=mapping), ids)
    assert out.ids[0].tolist() == [7, 0, 0]
    assert abs(out.logprobs[0, 0].exp() - 0.7) < 1e-6 and torch.isinf(out.logprobs[0, 1:]).all()
    assert abs(out.tail[0] - 0.3) < 1e-6  # 0.1 outside the top-k + 0.2 unmapped


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input(shared_tokenizer):
    (tg, G), (tm, M) = tok_and_table(shared_tokenizer, "gpt2"), tok_and_table(shared_tokenizer, "mistral-spm")
    a, b = tg("Hello world").input_ids, tm("Hello world").input_ids
    with pytest.raises(ValueError, match="src_ids.*outside the vocabulary"):
        align([50257], b, G, M)
    with pytest.raises(ValueError, match="tgt_ids.*outside the vocabulary"):
        align(a, [32000], G, M)
    with pytest.raises(ValueError, match="mode"):
        align(a, b, G, M, mode="fast")
    with pytest.raises(ValueError, match="does not match the given text"):
        align(a, b, G, M, text="Completely different words entirely")
    assert text_groups_exact(align(a, b, G, M, text="Hello world"))
    other = tm("Goodbye moon, farewell").input_ids  # no text given: aligns, but visibly inexact
    al = align(a, other, G, M)
    check_partition(al, len(a), len(other))
    assert al.exact_fraction < 0.5
    al = align(a, b, G, M)
    vm = exact_bytes_map(G, M)
    with pytest.raises(ValueError, match="rows"):
        project(torch.zeros(len(a) + 1, 2, dtype=torch.long), torch.zeros(len(a) + 1, 2), al, vm, b)
    with pytest.raises(ValueError, match="student_ids"):
        project(torch.zeros(len(a), 2, dtype=torch.long), torch.zeros(len(a), 2), al, vm, b[:-1])
    with pytest.raises(ValueError, match="mapping"):
        project(torch.zeros(len(a), 2, dtype=torch.long), torch.zeros(len(a), 2), al,
                SimpleNamespace(mapping=np.zeros(10, dtype=np.int64)), b)
    with pytest.raises(ValueError, match="fallback"):
        project(torch.zeros(len(a), 2, dtype=torch.long), torch.zeros(len(a), 2), al, vm, b, fallback="x")
    assert len(align([], [], G, M)) == 0
    check_partition(align([], b, G, M), 0, len(b))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_align_json_and_table(tiny_models, tmp_path):
    import json

    from typer.testing import CliRunner

    from stillroom.cli import app

    runner = CliRunner()
    src, tgt = str(tiny_models["gpt2-bpe"]), str(tiny_models["llama-spm"])
    text = "To be, or not to be:\nthat is the question 1850."
    res = runner.invoke(app, ["align", "--source", src, "--target", tgt, "--text", text, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    groups = out["groups"]
    assert groups[0]["tgt_tokens"] == ["<s>"] and not groups[0]["exact"]  # BOS alone
    assert all(g["exact"] for g in groups[1:])
    assert "".join(g["src_text"] for g in groups) == text == "".join(g["tgt_text"] for g in groups)
    assert [x for g in groups for x in g["tgt_ids"]] == out["tgt_ids"]
    file = tmp_path / "t.txt"
    file.write_text(text, encoding="utf-8")
    res = runner.invoke(app, ["align", "--source", src, "--target", tgt, "--file", str(file)])
    assert res.exit_code == 0, res.output
    assert "gpt2-bpe" in res.output and "✓" in res.output and "'.'" in res.output
    res = runner.invoke(app, ["align", "--source", src, "--target", tgt, "--text", text, "--mode", "dtw", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["mode"] == "dtw"


def test_cli_align_bad_input(tiny_models, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    runner = CliRunner()
    src = str(tiny_models["gpt2-bpe"])
    res = runner.invoke(app, ["align", "--source", src, "--target", src])
    assert res.exit_code != 0 and "--text or --file" in res.output
    res = runner.invoke(app, ["align", "--source", str(tmp_path / "nope"), "--target", src, "--text", "x"])
    assert res.exit_code != 0 and "tokenizer folder" in res.output
    res = runner.invoke(app, ["align", "--source", src, "--target", src, "--text", "x", "--mode", "fast"])
    assert res.exit_code != 0 and "--mode" in res.output


def test_projection_with_vocabmap(tiny_models):
    """Teacher llama-spm -> student gpt2-bpe with the real VocabMap: where a 1-to-1 group's teacher token
    has a same-bytes student token, the teacher's mass on it lands on the student's gold token."""
    from transformers import AutoTokenizer

    from stillroom.testing import corpus_texts
    from stillroom.tokenization.vocab import VocabMap

    tt, ts = (AutoTokenizer.from_pretrained(tiny_models[n]) for n in ("llama-spm", "gpt2-bpe"))
    T, S = TokenTable.from_tokenizer(tt), TokenTable.from_tokenizer(ts)
    vm = VocabMap.build(T, S, progress=False)
    text = corpus_texts("validation")[0][2000:3500]
    a, b = tt(text).input_ids, ts(text).input_ids
    al = align(a, b, T, S)
    # the teacher puts 0.9 on its true next token, 0.05 on token 300 and 0.05 on token 301
    nxt = torch.tensor(a[1:] + [tt.eos_token_id])
    t_ids = torch.stack([nxt, torch.full_like(nxt, 300), torch.full_like(nxt, 301)], 1)
    t_lp = torch.log(torch.tensor([[0.9, 0.05, 0.05]] * len(a)))
    out = project(t_ids, t_lp, al, vm, b)
    total = out.logprobs.exp().sum(-1) + out.tail
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5) and out.ids.max() < S.vocab_size
    checked = 0
    for s0, _, t0, _ in al.groups[al.one_to_one & al.exact].tolist():
        if s0 >= 1 and t0 >= 1 and vm.exact[a[s0]] and vm.valid[a[s0]]:
            row = dict(zip(out.ids[t0 - 1].tolist(), out.logprobs[t0 - 1].exp().tolist(), strict=True))
            assert row.get(b[t0], 0) >= 0.9 - 1e-6
            checked += 1
    assert checked > 50
    other = VocabMap.build(S, T, progress=False)
    with pytest.raises(ValueError, match="built for other tokenizers"):
        project(t_ids, t_lp, al, other, b)


def test_gemma_space_runs_align_with_byte_level_spaces(shared_tokenizer):
    """Gemma 3's ids 138-167 (runs of 2-31 spaces) align exactly with Llama 3's byte-level space tokens."""
    (tg, G), (tl, L) = tok_and_table(shared_tokenizer, "gemma3"), tok_and_table(shared_tokenizer, "llama3")
    text = "def f(x):\n    if x:\n        return  x\n\n\treturn 0   # done  "
    a, b = tg(text, add_special_tokens=False).input_ids, tl(text, add_special_tokens=False).input_ids
    assert sum(138 <= i < 168 for i in a) >= 4
    al = align(a, b, G, L, text=text)
    check_partition(al, len(a), len(b))
    assert al.exact.all() and al.exact_fraction == 1.0
    for s0, s1, t0, t1 in al.groups.tolist():  # each group: the same text by both tokenizers' own decoders
        assert tg.decode(a[s0:s1]) == tl.decode(b[t0:t1])


def _year_1850(shared_tokenizer):
    """The hand-checked example below: llama3 teacher rows over "year 1850.", the qwen2.5 student, its alignment;
    returns ``(project's positional args, tail, teacher token → id, student token → id, teacher ids)``."""
    (tl, L), (tq, Q) = tok_and_table(shared_tokenizer, "llama3"), tok_and_table(shared_tokenizer, "qwen2.5")
    a, b = tl("year 1850.").input_ids, tq("year 1850.").input_ids
    assert tl.convert_ids_to_tokens(a)[-5:] == ["year", "Ġ", "185", "0", "."]
    al = align(a, b, L, Q)
    t, q = tl.convert_tokens_to_ids, tq.convert_tokens_to_ids
    rows = [("a", "Ġ", "c"), ("b", "185", "18"), ("c", "0", "d"), ("d", ".", "e"), ("e", "year", "f")]
    t_ids = torch.tensor([[t(x) for x in r] for r in rows])
    t_lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]] * 5))
    tail = torch.full((5,), 0.1)
    return (t_ids, t_lp, al, np.zeros(L.vocab_size, np.int64), b), tail, t, q, t_ids


def test_projection_next_bytes_hand_checked(shared_tokenizer):
    """``next_bytes`` on "year 1850." (llama3 teacher, qwen2.5 student): inside the 185 = 1|8|5 group, each row
    gets the teacher's belief about the next bytes given the digits the group already spelled.

    Teacher row 1 (after "year Ġ") says: "b" 0.5, "185" 0.3, "18" 0.1, tail 0.1.
    row 1 -> "1" (group start): as ``prefix``: b 0.5, "1" 0.3 + 0.1 (both begin with "1"), tail 0.1;
    row 2 -> "8" (pre "1"): "185" and "18" continue "1" with "85" / "8", both begin with "8": mass 0.4;
        nothing ends inside "1"; Z = 0.4 + tail 0.1 → "8" 0.8, tail 0.2;
    row 3 -> "5" (pre "18"): "185" continues with "5" (0.3); "18" ends exactly at "18" (0.1: unknown what
        follows) and the tail (0.1) stay in the tail; Z = 0.5 → "5" 0.6, tail 0.4.
    """
    args, tail, t, q, t_ids = _year_1850(shared_tokenizer)
    out = project(*args, fallback="next_bytes", teacher_tail=tail)

    def row(j):
        return {i: round(p, 6) for i, p in zip(out.ids[j].tolist(), out.logprobs[j].exp().tolist(), strict=True)
                if p > 0}

    assert row(1) == {q("b"): 0.5, q("1"): 0.4} and abs(float(out.tail[1]) - 0.1) < 1e-6
    assert row(2) == {q("8"): 0.8} and abs(float(out.tail[2]) - 0.2) < 1e-6
    assert row(3) == {q("5"): 0.6} and abs(float(out.tail[3]) - 0.4) < 1e-6
    assert row(0) == {q("a"): 0.5, q("Ġ"): 0.3, q("c"): 0.1}  # 1-to-1 rows: as prefix
    prefix = project(*args, fallback="prefix", teacher_tail=tail)
    for j in (0, 1, 4, 5):  # the rows where the teacher's tokens are the student's: as prefix
        want = {i: round(p, 6) for i, p in zip(prefix.ids[j].tolist(), prefix.logprobs[j].exp().tolist(),
                                                strict=True) if p > 0}
        assert row(j) == want and abs(float(out.tail[j] - prefix.tail[j])) < 1e-6
    assert out.valid.tolist() == [True] * 6 + [False]
    # no teacher candidate continues "1" inside the group: those rows fall back (one-hot, or invalid without fill)
    t_ids[1] = torch.tensor([t("b"), t("c"), t("d")])
    none = project(*args, fallback="next_bytes", teacher_tail=tail, fill=False)
    assert none.valid.tolist() == [True, True, False, False, True, True, False]


def test_projection_next_bytes_pruned_hand_checked(shared_tokenizer):
    """``next_bytes_pruned`` on the example above: inside the group, the tail counts in Z only at the share of the
    top-k that agrees with the bytes already spelled ("b" 0.5 disagrees with "1" and "18"; "185", "18" agree: 4/9).

    row 2 (pre "1"): Z = 0.4 + 0.1 · 4/9 → "8" 0.9, tail 0.1;
    row 3 (pre "18"): "18" ends at the seen bytes (0.1, unknown), the tail 0.1 · 4/9; Z = 0.3 + 0.1 + 0.4/9 →
    "5" 0.675, tail 0.325. The rows at a shared cut are ``next_bytes``'s.
    """
    args, tail, _, q, _ = _year_1850(shared_tokenizer)
    out = project(*args, fallback="next_bytes_pruned", teacher_tail=tail)
    plain = project(*args, fallback="next_bytes", teacher_tail=tail)
    p = out.logprobs.exp()
    assert out.ids[2, 0] == q("8") and abs(float(p[2, 0]) - 0.9) < 1e-6 and abs(float(out.tail[2]) - 0.1) < 1e-6
    assert out.ids[3, 0] == q("5") and abs(float(p[3, 0]) - 0.675) < 1e-6 and abs(float(out.tail[3]) - 0.325) < 1e-6
    for j in (0, 1, 4, 5):
        assert torch.equal(out.ids[j], plain.ids[j]) and torch.equal(out.logprobs[j], plain.logprobs[j])
        assert torch.equal(out.tail[j], plain.tail[j])
    assert torch.equal(out.valid, plain.valid)


def test_projection_next_bytes_keeps_every_row_a_distribution(shared_tokenizer):
    """On real text across tokenizer families, every valid row's kept mass plus tail is 1."""
    text = "Tokyo 東京, naïve café 1850! The quick brown fox — jumped over 12,345 lazy dogs.\n\tdone"
    (tg, G), (ts, S) = tok_and_table(shared_tokenizer, "gemma3"), tok_and_table(shared_tokenizer, "qwen2.5")
    a, b = tg(text).input_ids, ts(text).input_ids
    al = align(a, b, G, S)
    rng = np.random.default_rng(0)
    t_ids = torch.tensor(rng.integers(0, G.vocab_size, size=(len(a), 8)))
    t_ids[:-1, 0] = torch.tensor(a[1:])  # the true next token among the candidates
    p = torch.tensor(rng.dirichlet(np.ones(9), size=len(a))[:, :8], dtype=torch.float32)
    out = project(t_ids, p.log(), al, np.zeros(G.vocab_size, np.int64), b, fallback="next_bytes")
    total = out.logprobs.exp().sum(1) + out.tail
    assert torch.allclose(total[out.valid], torch.ones(int(out.valid.sum())), atol=1e-5)
    assert int(out.valid.sum()) == len(b) - 1


def test_projection_next_bytes_chains_a_finer_teacher_along_the_text(shared_tokenizer):
    """A teacher that splits finer than the student (qwen2.5 digits 1|8|5 under llama3's "185"): the student row
    predicting "185" gets p("1") · p("8" | 1) · p("5" | 18) from the teacher's own rows along the text.

    Teacher row 1 (after "year Ġ"): "1" 0.6, "2" 0.2, "x" 0.1, tail 0.1; its row 2 gives "8" 0.5, row 3 "5" 0.4.
    "1" agrees with the text but ends inside "185": 0.6 · 0.5 · 0.4 = 0.12 to "185", 0.48 to the tail;
    "2" and "x" depart from the text: to the student tokens they begin with. Z = 1: "185" 0.12, "2" 0.2,
    "x" 0.1, tail 0.58.
    """
    (tq, Q), (tl, L) = tok_and_table(shared_tokenizer, "qwen2.5"), tok_and_table(shared_tokenizer, "llama3")
    a, b = tq("year 1850.").input_ids, tl("year 1850.").input_ids
    assert tq.convert_ids_to_tokens(a)[-7:] == ["year", "Ġ", "1", "8", "5", "0", "."]
    assert tl.convert_ids_to_tokens(b)[-5:] == ["year", "Ġ", "185", "0", "."]
    al = align(a, b, Q, L)
    q, l_ = tq.convert_tokens_to_ids, tl.convert_tokens_to_ids
    t_ids = torch.tensor([[q("x"), q("y"), q("z")]] * len(a))
    t_ids[1] = torch.tensor([q("1"), q("2"), q("x")])
    t_lp = torch.log(torch.tensor([[0.6, 0.2, 0.1]] * len(a)))
    gold = torch.log(torch.tensor([0.9, 0.9, 0.5, 0.4, 0.9, 0.9, 0.9]))
    out = project(t_ids, t_lp, al, np.zeros(Q.vocab_size, np.int64), b, fallback="next_bytes",
                  teacher_tail=torch.full((len(a),), 0.1), teacher_gold_logprobs=gold)
    got = {i: round(p, 6) for i, p in zip(out.ids[1].tolist(), out.logprobs[1].exp().tolist(), strict=True) if p > 0}
    assert got == {l_("185"): 0.12, l_("2"): 0.2, l_("x"): 0.1} and abs(float(out.tail[1]) - 0.58) < 1e-6
    # without the teacher's gold path, its top-k is read for it: here its rows hold no "8" / "5", so the
    # chain through "1" carries nothing to "185"
    plain = project(t_ids, t_lp, al, np.zeros(Q.vocab_size, np.int64), b, fallback="next_bytes",
                    teacher_tail=torch.full((len(a),), 0.1))
    got = {i: round(p, 6) for i, p in zip(plain.ids[1].tolist(), plain.logprobs[1].exp().tolist(), strict=True)
           if p > 0}
    assert got == {l_("2"): 0.2, l_("x"): 0.1}
