"""VocabMap / min_edit_distance_map against independent references.

References: a pure-Python Levenshtein DP over bytes with a brute-force argmin (small vocabularies), and a
brute-force rapidfuzz ``cdist`` over the *whole* candidate vocabulary (real tokenizers, sampled sources).
Both use the documented rule: smallest distance, then smallest target id.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stillroom.tokenization.vocab import VocabMap, min_edit_distance_map, prefix_map


def naive_lev(a: bytes, b: bytes) -> int:
    """Textbook Levenshtein DP over bytes (unit costs)."""
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


def naive_map(src, tgt, candidates=None):
    """Brute force: for every source, min over candidate targets of (distance, id)."""
    ok = [i for i, t in enumerate(tgt) if t and (candidates is None or candidates[i])]
    out = [min((naive_lev(s, tgt[i]), i) for i in ok) for s in src]
    return np.array([i for _, i in out]), np.array([d for d, _ in out])


def brute_rapidfuzz(src, tgt, candidates):
    """Brute force with a C library over every candidate: cdist, first minimum in id order."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    ids = np.array([i for i, t in enumerate(tgt) if t and candidates[i]])
    D = process.cdist([s.decode("latin-1") for s in src], [tgt[i].decode("latin-1") for i in ids],
                      scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
    arg = D.argmin(1)
    return ids[arg], D[np.arange(len(src)), arg]


# --- the pure function ------------------------------------------------------------------------------------
def test_hand_checked_examples():
    tgt = [b"", b" the", b"\n", b"cat", b"cart", b"cut", b"\xc3\xaf", b"ca"]
    src = [b" the", b"\n", b"cat", b"cats", b"ct", b"cbt", b"\xc3", b"i", b""]
    mapping, dist = min_edit_distance_map(src, tgt)
    # exact; exact; exact; deletion; insertion (tie "cat"/"cut"/"ca" at 1 -> smallest id 3); substitution
    # (tie "cat" 3 and "cut" 5 -> 3); a lone lead byte is one insertion from "ï"(6) but also one from "\n"
    # (2) by substitution -> 2; "i" is 1 from "\n" by substitution (smallest id of all length-1 targets);
    # b"" is one insertion from "\n".
    assert mapping.tolist() == [1, 2, 3, 3, 3, 3, 2, 2, 2]
    assert dist.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_empty_target_and_mask_are_never_chosen():
    mapping, dist = min_edit_distance_map([b"ab"], [b"", b"ab", b"abc"], candidates=np.array([True, False, True]))
    assert mapping.tolist() == [2] and dist.tolist() == [1]
    with pytest.raises(ValueError, match="no candidate target"):
        min_edit_distance_map([b"a"], [b"", b"x"], candidates=np.array([True, False]))
    with pytest.raises(ValueError, match="candidates must be"):
        min_edit_distance_map([b"a"], [b"x"], candidates=np.array([True, False]))


def test_long_distances_beyond_uint8():
    """Distances >= 255 (long whitespace runs) still come out exact."""
    src = [b" " * 300, b"x" * 3]
    tgt = [b"ab", b" " * 20, b"y" * 290]
    mapping, dist = min_edit_distance_map(src, tgt)
    ref_m, ref_d = naive_map(src, tgt)
    assert mapping.tolist() == ref_m.tolist() and dist.tolist() == ref_d.tolist()


# alphabet spanning every byte class of the lower bound (space, letters, digits, punctuation, UTF-8 bytes)
_ALPHABET = [0x20, ord("a"), ord("b"), ord("A"), ord("7"), ord("."), 0x0A, 0x80, 0xAF, 0xC3, 0xE4, 0xF0]
_token = st.lists(st.sampled_from(_ALPHABET), min_size=0, max_size=7).map(bytes)


@settings(max_examples=150, deadline=None)
@given(src=st.lists(_token, min_size=1, max_size=25), tgt=st.lists(_token, min_size=1, max_size=40),
       seed=st.integers(0, 2**31))
def test_matches_naive_brute_force(src, tgt, seed):
    rng = np.random.default_rng(seed)
    tgt = [*tgt, b"a"]  # at least one non-empty candidate
    mask = rng.random(len(tgt)) < 0.85
    mask[-1] = True
    ticks = []
    mapping, dist = min_edit_distance_map(src, tgt, candidates=mask, max_cells=rng.choice([7, 1 << 20]),
                                          progress=ticks.append)
    assert sum(ticks) == len(src)  # every source reported done exactly once
    ref_m, ref_d = naive_map(src, tgt, mask)
    assert dist.tolist() == ref_d.tolist()
    assert mapping.tolist() == ref_m.tolist()


# --- VocabMap on TokenTables ------------------------------------------------------------------------------
def _table(path_or_tok):
    from transformers import AutoTokenizer

    from stillroom.tokenization.tokens import TokenTable

    tok = AutoTokenizer.from_pretrained(path_or_tok) if not hasattr(path_or_tok, "backend_tokenizer") else path_or_tok
    return TokenTable.from_tokenizer(tok)


@pytest.fixture(scope="module")
def tables(tiny_models):
    return _table(tiny_models["llama-spm"]), _table(tiny_models["gpt2-bpe"])


def test_fixture_tokenizers_match_brute_force(tables):
    spm, bpe = tables
    for src_t, tgt_t in ((spm, bpe), (bpe, spm)):
        vmap = VocabMap.build(src_t, tgt_t, progress=False)
        ordinary = np.flatnonzero(~src_t.is_special & np.array([len(b) > 0 for b in src_t.token_bytes]))
        src = [src_t.token_bytes[i] for i in ordinary]
        ref_m, ref_d = brute_rapidfuzz(src, tgt_t.token_bytes, ~tgt_t.is_special)
        assert vmap.mapping[ordinary].tolist() == ref_m.tolist()
        assert vmap.distance[ordinary].tolist() == ref_d.tolist()
        assert (vmap.exact[ordinary] == (ref_d == 0)).all()
        # the C library agrees with the textbook DP on a sample (bytes as latin-1 text is byte distance)
        rng = np.random.default_rng(0)
        for k in rng.choice(len(src), 20, replace=False):
            assert naive_lev(src[k], tgt_t.token_bytes[ref_m[k]]) == ref_d[k]
        assert ((vmap.mapping >= 0) & (vmap.mapping < tgt_t.vocab_size)).all()


def test_newline_byte_token_maps_exactly(tables):
    """FuseLLM compares strings, so ``<0x0A>`` never meets ``Ċ``; over bytes they are the same token."""
    spm, bpe = tables
    vmap = VocabMap.build(spm, bpe, progress=False)
    nl_spm = spm.token_strings.index("<0x0A>")
    nl_bpe = bpe.token_strings.index("Ċ")
    assert vmap.mapping[nl_spm] == nl_bpe and vmap.exact[nl_spm] and vmap.distance[nl_spm] == 0
    back = VocabMap.build(bpe, spm, progress=False)
    assert back.mapping[nl_bpe] == nl_spm
    # "▁the" and "Ġthe" are both b" the"
    if "▁the" in spm.token_strings and "Ġthe" in bpe.token_strings:
        assert vmap.mapping[spm.token_strings.index("▁the")] == bpe.token_strings.index("Ġthe")


def test_specials_map_by_string_or_role(tables):
    spm, bpe = tables
    vmap = VocabMap.build(spm, bpe, progress=False)
    eot = bpe.token_strings.index("<|endoftext|>")
    eos = spm.token_strings.index("</s>")
    assert vmap.mapping[eos] == eot and vmap.valid[eos] and vmap.distance[eos] == -1
    bos = spm.token_strings.index("<s>")  # no begin-of-text special in the GPT-2 fixture: flagged
    assert not vmap.valid[bos] and vmap.masked_mapping[bos] == -1
    assert 0 <= vmap.mapping[bos] < bpe.vocab_size  # still a usable index
    stats = vmap.stats()
    assert stats["special"] == int(spm.is_special.sum()) and stats["unmapped"] == int((~vmap.valid).sum())


def test_identity_when_source_equals_target(tables):
    for t in tables:
        vmap = VocabMap.build(t, t, progress=False)
        assert vmap.exact.all() and vmap.valid.all() and (vmap.distance[~t.is_special] == 0).all()
        # identity, except that a token whose bytes an earlier id also has (SentencePiece "<0x41>" and "A")
        # maps to that earlier id
        first: dict[bytes, int] = {}
        for i, b in enumerate(t.token_bytes):
            expect = i if t.is_special[i] else first.setdefault(b, i)
            assert vmap.mapping[i] == expect
        assert vmap.stats()["exact_pct"] == 100.0


def test_save_load_checks_hashes(tables, tmp_path):
    spm, bpe = tables
    vmap = VocabMap.build(spm, bpe, progress=False)
    path = vmap.save(tmp_path / "m.safetensors")
    assert path.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header
    back = VocabMap.load(path, spm, bpe)
    for name in ("mapping", "distance", "exact", "valid"):
        np.testing.assert_array_equal(getattr(back, name), getattr(vmap, name))
    assert back.mapping.dtype == np.int64 and back.distance.dtype == np.int32
    with pytest.raises(ValueError, match="built for source tokenizer"):
        VocabMap.load(path, bpe, bpe)
    with pytest.raises(ValueError, match="built for target tokenizer"):
        VocabMap.load(path, spm, spm)
    with pytest.raises(FileNotFoundError, match="stillroom vocab-map"):
        VocabMap.load(tmp_path / "missing.safetensors", spm, bpe)


def test_cached_builds_once(tables, tmp_path, monkeypatch):
    spm, bpe = tables
    calls = []
    real_build = VocabMap.build.__func__

    def counting_build(cls, *a, **k):
        calls.append(1)
        return real_build(cls, *a, **k)

    monkeypatch.setattr(VocabMap, "build", classmethod(counting_build))
    first = VocabMap.cached(spm, bpe, cache_dir=tmp_path)
    second = VocabMap.cached(spm, bpe, cache_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.mapping, second.mapping)
    assert len(list(tmp_path.glob("vocab-*.safetensors"))) == 1


# --- real tokenizers from ../shared: sampled sources against the full target vocabulary -------------------
@pytest.mark.parametrize("src_name,tgt_name", [("qwen2.5", "llama3"), ("llama3", "mistral-spm"),
                                               ("bert-uncased", "gpt2")])
def test_real_pairs_sample_matches_brute_force(shared_tokenizer, src_name, tgt_name):
    src_t, tgt_t = _table(shared_tokenizer(src_name)), _table(shared_tokenizer(tgt_name))
    ordinary = np.flatnonzero(~src_t.is_special & np.array([len(b) > 0 for b in src_t.token_bytes]))
    sample = np.random.default_rng(0).choice(ordinary, 400, replace=False)
    src = [src_t.token_bytes[i] for i in sample]
    mapping, dist = min_edit_distance_map(src, tgt_t.token_bytes, candidates=~tgt_t.is_special)
    ref_m, ref_d = brute_rapidfuzz(src, tgt_t.token_bytes, ~tgt_t.is_special)
    np.testing.assert_array_equal(dist, ref_d)
    np.testing.assert_array_equal(mapping, ref_m)
    assert (dist >= 2).sum() > 20  # the sample exercises the bounded search, not only the look-ups


def test_real_newline_byte_fallback(shared_tokenizer):
    spm, bpe = _table(shared_tokenizer("mistral-spm")), _table(shared_tokenizer("llama3"))
    src = [spm.token_bytes[spm.token_strings.index("<0x0A>")]]
    mapping, dist = min_edit_distance_map(src, bpe.token_bytes, candidates=~bpe.is_special)
    assert bpe.token_strings[mapping[0]] == "Ċ" and dist[0] == 0


# --- CLI --------------------------------------------------------------------------------------------------
def test_cli_vocab_map(tiny_models, tmp_path, tables):
    from typer.testing import CliRunner

    from stillroom.cli import app

    out = tmp_path / "map.safetensors"
    runner = CliRunner()
    res = runner.invoke(app, ["vocab-map", "--source", str(tiny_models["llama-spm"]), "--target",
                              str(tiny_models["gpt2-bpe"]), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "exact byte match" in res.output and "saved" in res.output
    spm, bpe = tables
    vmap = VocabMap.load(out, spm, bpe)
    np.testing.assert_array_equal(vmap.mapping, VocabMap.build(spm, bpe, progress=False).mapping)

    res = runner.invoke(app, ["vocab-map", "--source", str(tiny_models["llama-spm"]), "--target",
                              str(tiny_models["gpt2-bpe"]), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output.strip().splitlines()[-1])
    assert stats["source_vocab"] == spm.vocab_size and stats["exact"] == int((vmap.distance == 0).sum())

    res = runner.invoke(app, ["vocab-map", "--source", str(tmp_path / "nope"), "--target",
                              str(tiny_models["gpt2-bpe"]), "--out", str(out)])
    assert res.exit_code != 0 and "neither a tokenizer folder" in res.output


def test_prefix_map_is_the_longest_target_prefix(tables):
    spm, bpe = tables
    for src_t, tgt_t in ((spm, bpe), (bpe, spm)):
        pm = prefix_map(src_t, tgt_t)
        ordinary_tgt = [(i, b) for i, b in enumerate(tgt_t.token_bytes) if b and not tgt_t.is_special[i]]
        rng = np.random.default_rng(1)
        for s in rng.choice(src_t.vocab_size, 300, replace=False).tolist():
            b = src_t.token_bytes[s]
            if not b or src_t.is_special[s]:
                assert pm[s] == -1
                continue
            cands = [(len(tb), -i) for i, tb in ordinary_tgt if b.startswith(tb)]  # naive: scan every token
            want = -max(cands)[1] if cands else -1
            assert pm[s] == want or (want >= 0 and tgt_t.token_bytes[pm[s]] == tgt_t.token_bytes[want]), (s, b)
        vmap = VocabMap.build(src_t, tgt_t, progress=False)
        exact = vmap.exact & ~src_t.is_special
        assert (pm[exact] == vmap.mapping[exact]).all() or all(
            tgt_t.token_bytes[pm[i]] == src_t.token_bytes[i] for i in np.flatnonzero(exact))
        # where they differ, MinED picked a string that is not where the source token's bytes begin
        differ = np.flatnonzero((pm >= 0) & (pm != vmap.mapping) & ~exact)
        assert differ.size > 0
        assert any(not src_t.token_bytes[i].startswith(tgt_t.token_bytes[vmap.mapping[i]]) for i in differ)



def test_gemma_space_runs_map_to_spaces(shared_tokenizer):
    """Gemma 3's ids 138-167 are 2-31 spaces: each maps to a Llama 3 token of spaces, the distance being the
    difference in length (checked with Llama 3's own decoder)."""
    gemma, llama = shared_tokenizer("gemma3"), shared_tokenizer("llama3")
    src_t, tgt_t = _table(gemma), _table(llama)
    src = [src_t.token_bytes[i] for i in range(138, 168)]
    mapping, dist = min_edit_distance_map(src, tgt_t.token_bytes, candidates=~tgt_t.is_special)
    for n, (m, d) in enumerate(zip(mapping.tolist(), dist.tolist(), strict=True), start=2):
        spaces = llama.decode([m])
        assert set(spaces) == {" "} and d == abs(n - len(spaces)), (n, spaces, d)
    assert (dist == 0).sum() >= 10  # Llama 3 has tokens for the shorter runs
