"""stillroom.generation.rollout: batched left-padded KV-cache sampling vs one-prompt-at-a-time references."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillroom.errors import ConfigError
from stillroom.generation.rollout import (
    Sample,
    completion_text,
    generate_ids,
    next_tokens,
    next_tokens_draw,
    sample,
    skinny_linears,
)
from stillroom.testing import tiny_llama
from stillroom.tokenization.tokens import TokenTable

TEXTS = ["To be, or not to be", "My lord", "Now is the winter of our discontent made glorious summer by this sun",
         "O"]


def _load(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder), tok


def _prompts(tok) -> list[list[int]]:
    return [tok(t).input_ids for t in TEXTS]


@pytest.mark.parametrize("name", ["gpt2-bpe", "llama-spm"])
def test_greedy_batch_equals_one_prompt_at_a_time_hf_generate(name, tiny_models):
    """Left-padded batch of prompts of different lengths == transformers' generate on each prompt alone (no
    padding, no batching): the padding, positions and KV cache change nothing. The model is left in train mode
    (the fixture GPT-2 has dropout): sampling runs in eval mode and restores the flag. ``sample``'s ids are
    those ids (shortened only where the random model spelt a broken UTF-8 character)."""
    model, tok = _load(tiny_models[name])
    prompts = _prompts(tok)
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    eos = tok.eos_token_id
    model.train()
    rows = generate_ids(model, prompts, [eos], eos, max_new_tokens=12, do_sample=False)
    got = sample(model, tok, prompts, max_new_tokens=12, do_sample=False, stop_ids=[eos])
    assert model.training
    model.eval()
    for p, row, s in zip(prompts, rows, got, strict=True):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
        if eos in ref:
            ref = ref[: ref.index(eos) + 1]
        assert row == ref
        assert s.ids == ref or (not s.ended and s.ids == ref[: len(s.ids)])
        assert s.ended == (s.ids[-1:] == [eos])
    if name == "gpt2-bpe":
        assert [s.ids for s in got] == rows


def test_stops_at_an_end_id_per_row(tiny_models):
    """With a stop id, each row is the free-running row (same seed) cut just after that id's first occurrence."""
    model, tok = _load(tiny_models["gpt2-bpe"])
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=10, temperature=1.5, generator_seed=0)
    free = sample(model, tok, prompts, stop_ids=[], **kw)
    j = next(j for j in range(1, 10) if free[0].ids[j] not in free[0].ids[:j])  # a token new at step j + 1
    stop = free[0].ids[j]
    got = sample(model, tok, prompts, stop_ids=[stop], **kw)
    for f, g in zip(free, got, strict=True):
        if stop in f.ids:
            assert g.ids == f.ids[: f.ids.index(stop) + 1] and g.ended
        else:
            assert g.ids == f.ids and not g.ended
    assert got[0].ids == free[0].ids[: j + 1] and got[0].ended
    assert max(len(g.ids) for g in got) > j + 1  # the batch went on for the other rows
    assert not any(f.ended for f in free)


def test_text_is_the_completion_bytes_without_the_end_token(tiny_models):
    """text == what the tokenizer's own decode adds after the prompt (for both tokenizer families), without
    the end token — except that a SentencePiece completion whose first token starts with ▁ drops that one space:
    it is the dummy prefix the tokenizer puts back when it tokenizes the completion alone (as the training data
    does), so tokenizing the text alone gives that first token again."""
    prefixed = 0
    for name in ("gpt2-bpe", "llama-spm"):
        model, tok = _load(tiny_models[name])
        prompts = _prompts(tok)
        samples = sample(model, tok, prompts, max_new_tokens=8, generator_seed=3, stop_ids=[tok.eos_token_id])
        for p, s in zip(prompts, samples, strict=True):
            body = s.ids[:-1] if s.ended else s.ids
            full = tok.decode(p + body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            head = tok.decode(p, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if "\ufffd" in full:  # the reference's own decode replaced a cut character: compare bytes instead
                continue
            if name == "llama-spm" and body and tok.convert_ids_to_tokens(body[0]).startswith("\u2581"):
                assert full == head + " " + s.text
                alone = tok(s.text, add_special_tokens=False)["input_ids"]
                assert tok.convert_ids_to_tokens(alone[0]).startswith("\u2581")
                prefixed += 1
            else:
                assert full == head + s.text
    assert prefixed > 0


def test_a_completion_round_trips_through_completion_ids(tiny_models):
    """Training tokenizes each completion on its own (``chat.completion_ids``): a ▁ tokenizer with a dummy
    prefix spells "The king" as ``▁The ▁king``. Generated ids ``▁The ▁king`` after a prompt must come back as
    "The king" (not " The king", which that tokenizer would spell with an extra ▁), so seq-KD data and
    on-policy samples re-tokenize to the tokens the model produced; a byte-level BPE's " The" keeps its space."""
    from stillroom.inputs.chat import completion_ids

    for name, completion in (("llama-spm", "The king"), ("gpt2-bpe", " The king")):
        tok = AutoTokenizer.from_pretrained(tiny_models[name])
        prompt = tok("user:\nhi\n\nassistant:\n", add_special_tokens=True)["input_ids"]
        done = completion_ids(tok, completion, end=False)
        ids, text, ended = completion_text(TokenTable.from_tokenizer(tok), prompt, done, False)
        assert (ids, text, ended) == (done, completion, False), name
        assert completion_ids(tok, text, end=False) == done


def _byte_id(table: TokenTable, b: bytes) -> int:
    return next(i for i, tb in enumerate(table.token_bytes) if tb == b and not table.is_special[i])


def test_a_completion_cut_mid_character_is_truncated_to_whole_characters(tiny_models):
    """Hand-built byte-level completions: 'a' + the first byte of 'é' (C3 A9) keeps only 'a', not ended; the
    whole 'é' then the end token is 'aé', ended; a stray continuation byte in the middle cuts there."""
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    table = TokenTable.from_tokenizer(tok)
    a, c3, a9, eos = _byte_id(table, b"a"), _byte_id(table, b"\xc3"), _byte_id(table, b"\xa9"), tok.eos_token_id
    prompt = tok("Hi").input_ids
    assert completion_text(table, prompt, [a, c3], False) == ([a], "a", False)
    assert completion_text(table, prompt, [a, c3, a9, eos], True) == ([a, c3, a9, eos], "aé", True)
    assert completion_text(table, prompt, [a, c3, eos], True) == ([a], "a", False)
    assert completion_text(table, prompt, [a, a9, a, a], False) == ([a], "a", False)
    assert completion_text(table, prompt, [c3], False) == ([], "", False)


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(tiny_models):
    model, tok = _load(tiny_models["gpt2-bpe"])
    prompts = _prompts(tok)
    state = torch.get_rng_state()
    a = sample(model, tok, prompts, max_new_tokens=10, temperature=1.3, top_p=0.9, generator_seed=7, stop_ids=[])
    b = sample(model, tok, prompts, max_new_tokens=10, temperature=1.3, top_p=0.9, generator_seed=7, stop_ids=[])
    c = sample(model, tok, prompts, max_new_tokens=10, temperature=1.3, top_p=0.9, generator_seed=8, stop_ids=[])
    assert torch.equal(state, torch.get_rng_state())
    assert a == b and a != c
    assert all(isinstance(s, Sample) and len(s.ids) <= 10 and not s.ended for s in a)


def test_nucleus_sampling_matches_the_renormalised_top_p_distribution():
    """Draws from next_tokens vs the nucleus written out by hand: probabilities (temperature 0.5 applied)
    [.4, .3, .2, .07, .03] with top_p=0.75 keep the first three (mass before them .0, .4, .7 < .75)."""
    p = torch.tensor([0.4, 0.3, 0.2, 0.07, 0.03])
    logits = (p.log() * 0.5)[None].repeat(20000, 1)  # softmax(logits / 0.5) == p
    g = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, temperature=0.5, top_p=0.75, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    want = torch.tensor([0.4, 0.3, 0.2, 0.0, 0.0]) / 0.9
    assert freq[3:].sum() == 0
    assert torch.allclose(freq, want, atol=0.015)
    full = next_tokens(logits, temperature=0.5, top_p=1.0, generator=g)
    assert torch.allclose(torch.bincount(full, minlength=5).float() / len(full), p, atol=0.015)
    assert torch.equal(next_tokens(logits[:3], do_sample=False), torch.zeros(3, dtype=torch.long))


def test_bad_settings_fail_with_one_line_naming_them(tiny_models):
    model, tok = _load(tiny_models["gpt2-bpe"])
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1, got 0"):
        sample(model, tok, [[1]], max_new_tokens=0)
    with pytest.raises(ConfigError, match="top_p must be in"):
        sample(model, tok, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ConfigError, match="prompt 1 has no tokens"):
        sample(model, tok, [[1], []], max_new_tokens=2)
    assert sample(model, tok, [], max_new_tokens=2) == []


# --- stillroom generate --data (sequence-level KD data) -------------------------------------------------------

LINES = ["To be, or not to be", "My lord, I", "Now is the winter", "O Romeo, Romeo", "Friends, Romans",
         "All the world's a stage", "If music be the food", "Double, double toil"]


def _prompt_file(path, n=24):
    """Prompt/completion records (completions ignored) and prompt-only chat records, mixed in one file."""
    rows = []
    for i in range(n):
        line = LINES[i % len(LINES)] + " " * (i // len(LINES))
        if i % 3 == 2:
            rows.append({"id": f"c{i}", "messages": [{"role": "user", "content": line}]})
        else:
            rows.append({"id": f"p{i}", "prompt": line, **({"completion": "ignored"} if i % 2 else {})})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _records(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_generated_file_is_trainable_data_with_the_models_own_completions(tiny_models, tmp_path):
    """Each record holds the prompt (or the conversation + the generated assistant turn) and exactly what
    sample() gives for that prompt rendered by chat.prompt_ids; load_examples reads it back as training data."""
    from stillroom.generation.rollout import generate_file
    from stillroom.inputs.chat import end_ids, load_examples, prompt_ids

    data = _prompt_file(tmp_path / "prompts.jsonl", n=6)
    out = tmp_path / "out.jsonl"
    s = generate_file(tiny_models["gpt2-bpe"], data, out, max_new_tokens=8, batch_size=4, progress=False)
    model, tok = _load(tiny_models["gpt2-bpe"])
    src = load_examples(data, need_completion=False)
    recs = {r["id"]: r for r in _records(out)}
    empty = []
    for ex in src:
        ref = sample(model, tok, [prompt_ids(tok, ex)], max_new_tokens=8, do_sample=False, stop_ids=end_ids(tok))[0]
        if not ref.text.strip():  # left out (training needs a completion), listed in the sidecar
            empty.append(ex.example_id)
            continue
        rec = recs.pop(ex.example_id)
        if ex.messages is not None:
            assert rec["messages"] == [*ex.messages, {"role": "assistant", "content": ref.text}]
        else:
            assert (rec["prompt"], rec["completion"]) == (ex.prompt, ref.text)
        assert rec["ended"] == ref.ended
    assert not recs
    assert json.loads((tmp_path / "out.jsonl.meta.json").read_text())["empty"] == empty
    assert (s.written, s.empty, s.done_before, s.total) == (6 - len(empty), len(empty), 0, 6)
    assert s.written >= 3
    back = load_examples(out)
    assert [e.completion for e in back] == [r.get("completion") or r["messages"][-1]["content"]
                                            for r in _records(out)]


def test_generate_resumes_after_sigkill_without_duplicates(tiny_models, tmp_path):
    """`stillroom generate --data` killed (SIGKILL) mid-run, a torn half line appended as a kill mid-write would
    leave, then rerun: every id exactly once, the file byte-equal to an uninterrupted greedy run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from stillroom.generation.rollout import generate_file

    data = _prompt_file(tmp_path / "prompts.jsonl", n=40)
    kw = dict(max_new_tokens=24, batch_size=2)
    full = tmp_path / "full.jsonl"
    generate_file(tiny_models["gpt2-bpe"], data, full, progress=False, **kw)
    out = tmp_path / "out.jsonl"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "stillroom", "generate", "--model", str(tiny_models["gpt2-bpe"]),
                             "--data", str(data), "--out", str(out), "--max-new-tokens", "24", "--batch-size", "2",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: killed mid-run
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    part = out.read_bytes()
    assert 5 <= part.count(b"\n") < len(full.read_bytes().splitlines())
    with open(out, "ab") as f:
        f.write(b'{"id": "p9", "prompt": "torn')  # a line cut by the kill
    empty_before = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["empty"]
    s = generate_file(tiny_models["gpt2-bpe"], data, out, progress=False, **kw)
    assert s.done_before == part.count(b"\n") + len(empty_before)
    assert s.written + s.done_before + s.empty - len(empty_before) == 40
    ids = [r["id"] for r in _records(out)]
    empty = json.loads((tmp_path / "out.jsonl.meta.json").read_text())["empty"]
    assert len(ids) == len(set(ids)) and sorted(ids + empty) == sorted(r["id"] for r in _records(data))
    assert out.read_bytes() == full.read_bytes()


def test_sampled_generation_resumes_to_the_same_file_and_other_settings_are_refused(tiny_models, tmp_path):
    """Batch k samples with seed + k, batches fixed by position: cut a sampled file to its first 5 lines, rerun,
    and it is the uninterrupted file again. Other settings are refused naming them; --overwrite starts over;
    a file stillroom did not write is never touched."""
    from stillroom.errors import OutputExistsError
    from stillroom.generation.rollout import generate_file

    data = _prompt_file(tmp_path / "prompts.jsonl", n=12)
    out = tmp_path / "out.jsonl"
    kw = dict(max_new_tokens=10, batch_size=4, do_sample=True, temperature=1.5, top_p=0.9, seed=3, progress=False)
    generate_file(tiny_models["gpt2-bpe"], data, out, **kw)
    full = out.read_bytes()
    n = full.count(b"\n")
    assert n >= 7
    out.write_bytes(b"".join(full.splitlines(keepends=True)[:5]))
    s = generate_file(tiny_models["gpt2-bpe"], data, out, **kw)
    assert (s.done_before, s.written) == (5 + s.empty, n - 5) and out.read_bytes() == full
    with pytest.raises(OutputExistsError, match=r"other settings \(temperature 1.5 vs 0.7: before vs now\)"):
        generate_file(tiny_models["gpt2-bpe"], data, out, **{**kw, "temperature": 0.7})
    other = generate_file(tiny_models["gpt2-bpe"], data, out, overwrite=True, **{**kw, "seed": 4})
    assert other.written + other.empty == 12 and out.read_bytes() != full
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"mine": 1}\n')
    with pytest.raises(OutputExistsError, match="stillroom did not write it"):
        generate_file(tiny_models["gpt2-bpe"], data, mine, **kw)
    assert mine.read_text() == '{"mine": 1}\n'


def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_zero():
    """``next_tokens_draw`` vs the distribution written out: zero-mass ids (first, inner, last) are never drawn,
    the others at their probabilities; a seeded generator repeats."""
    p = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.125, 0.125, 0.0]) * 3.0  # unnormalised on purpose
    probs = p[None].repeat(40000, 1)
    draws = next_tokens_draw(probs, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=7).float() / len(draws)
    assert freq[[0, 2, 6]].sum() == 0
    assert torch.allclose(freq, p / p.sum(), atol=0.01)
    again = next_tokens_draw(probs, torch.Generator().manual_seed(1))
    assert torch.equal(draws, again)


def test_skinny_linears_compute_the_same_logits_and_restore_the_model():
    """Inside ``skinny_linears`` a forward of a few rows (decoding) gives the plain forward's logits; longer inputs
    take the ordinary path; on exit (also after an error) no module keeps a replaced ``forward``, and a module
    whose ``forward`` someone else replaced is left alone."""
    model = tiny_llama(300, n_layer=2, hidden=64, seed=0).eval()
    x = torch.randint(0, 300, (4, 1))
    long_x = torch.randint(0, 300, (2, 40))
    other = model.lm_head
    marker = other.forward
    other.forward = marker  # an instance-level forward, as accelerate's hooks install
    with torch.no_grad():
        want, want_long = model(x).logits, model(long_x).logits
        with skinny_linears(model):
            patched = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__]
            assert len(patched) == 2 * 7 + 1  # q k v o gate up down per layer, and the head (its own forward)
            assert other.forward is marker
            got, got_long = model(x).logits, model(long_x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_long, want_long, rtol=0, atol=0)
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__] == [other]
    with pytest.raises(RuntimeError, match="boom"), skinny_linears(model):
        raise RuntimeError("boom")
    assert [m for m in model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__] == [other]
