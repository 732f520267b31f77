"""Prompt/completion and chat data (stillroom.inputs.chat): records, each model's own rendering, completion-only
batches, teachers on completion regions, training and evaluation on them."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_shared_tokenizer

from stillroom.errors import ConfigError, DataError
from stillroom.inputs import chat

# A Gemma-style template (the Gemma 3 turn markers, written here): a second, different template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# A Llama-2-style template for the tiny ▁-BPE teacher: "[INST] ... [/INST]" turns, replies end with EOS.
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% endif %}{% endfor %}"
)
CONVERSATION = chat.Example("c1", None, ({"role": "user", "content": "Name a colour."},
                                         {"role": "assistant", "content": "Red."},
                                         {"role": "user", "content": "Another?"}), "Blue is one.")


def _smollm2():
    tok = load_shared_tokenizer("smollm2")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template  # the committed chat_template.jinja
    return tok


def _write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# --- completion-only masks, by hand ----------------------------------------------------------------------------


def test_chatml_mask_by_hand():
    """SmolLM2's ChatML template: default system message, earlier turns (the first reply included) are prompt;
    only the last reply and its <|im_end|> are labels."""
    tok = _smollm2()
    b = chat.CompletionCollator(tok, 64)([CONVERSATION])
    system = ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "ĠAI", "Ġassistant", "Ġnamed", "ĠSm",
              "ol", "LM", ",", "Ġtrained", "Ġby", "ĠH", "ugging", "ĠFace", "<|im_end|>", "Ċ"]
    turns = ["<|im_start|>", "user", "Ċ", "Name", "Ġa", "Ġcolour", ".", "<|im_end|>", "Ċ",
             "<|im_start|>", "ass", "istant", "Ċ", "Red", ".", "<|im_end|>", "Ċ",
             "<|im_start|>", "user", "Ċ", "Another", "?", "<|im_end|>", "Ċ",
             "<|im_start|>", "ass", "istant", "Ċ"]
    reply = ["Blue", "Ġis", "Ġone", ".", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(b["input_ids"][0].tolist()) == system + turns + reply
    assert int(b["prompt_len"][0]) == 49 == len(system + turns)
    labels = b["labels"][0].tolist()
    assert labels[:49] == [-100] * 49
    assert tok.convert_ids_to_tokens(labels[49:]) == reply
    assert b["completion"] == b["text"] == ["Blue is one."] and b["ended"] == [True]
    assert b["example_id"] == ["c1"] and b["example"] == [CONVERSATION]
    assert chat.end_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_gemma_style_mask_by_hand():
    """A second template (Gemma turns) on the Gemma 3 tokenizer: <bos>, 'model' turns, <end_of_turn> ends."""
    tok = load_shared_tokenizer("gemma3")
    tok.chat_template = GEMMA_TEMPLATE
    try:
        b = chat.CompletionCollator(tok, 64)([CONVERSATION])
        prompt = ["<bos>", "<start_of_turn>", "user", "\n", "Name", "▁a", "▁colour", ".", "<end_of_turn>", "\n",
                  "<start_of_turn>", "model", "\n", "Red", ".", "<end_of_turn>", "\n",
                  "<start_of_turn>", "user", "\n", "Another", "?", "<end_of_turn>", "\n",
                  "<start_of_turn>", "model", "\n"]
        reply = ["Blue", "▁is", "▁one", ".", "<end_of_turn>"]
        assert tok.convert_ids_to_tokens(b["input_ids"][0].tolist()) == prompt + reply
        assert int(b["prompt_len"][0]) == 27
        labels = b["labels"][0].tolist()
        assert labels[:27] == [-100] * 27 and tok.convert_ids_to_tokens(labels[27:]) == reply
        assert chat.end_ids(tok) == [106, tok.eos_token_id]  # <end_of_turn>, then <eos>
    finally:
        tok.chat_template = None


def test_a_cut_generated_completion_gets_no_end_token(tmp_path):
    """``"ended": false`` (what ``stillroom generate --data`` writes for a completion cut by --max-new-tokens):
    the reply is trained without <|im_end|>, by hand on ChatML; a finished one keeps it."""
    tok = _smollm2()
    recs = [{"id": "cut", "messages": [{"role": "user", "content": "Count."},
                                       {"role": "assistant", "content": "One, two"}], "ended": False},
            {"id": "done", "messages": [{"role": "user", "content": "Count."},
                                        {"role": "assistant", "content": "One, two"}]}]
    cut, done = chat.load_examples(_write(tmp_path / "gen.jsonl", recs))
    assert (cut.ended, done.ended) == (False, True)
    b = chat.CompletionCollator(tok, 64)([cut, done])
    labels = [[t for t in row if t != -100] for row in b["labels"].tolist()]
    assert tok.convert_ids_to_tokens(labels[0]) == ["One", ",", "Ġtwo"]
    assert tok.convert_ids_to_tokens(labels[1]) == ["One", ",", "Ġtwo", "<|im_end|>"]
    assert b["ended"] == [False, True]
    with pytest.raises(DataError, match=r"gen2.jsonl:1: field 'ended' must be true or false"):
        chat.load_examples(_write(tmp_path / "gen2.jsonl", [{"prompt": "a", "completion": "b", "ended": "no"}]))


def test_prompt_completion_records_and_padding():
    """Plain prompts are tokenized with special tokens (Gemma: BOS); rows are right-padded, pads are -100."""
    tok = load_shared_tokenizer("gemma3")
    a = chat.Example("a", "Hi there", None, "friend")
    b = chat.Example("b", "Say", None, "a much longer answer here")
    batch = chat.CompletionCollator(tok, 64)([a, b])
    assert tok.convert_ids_to_tokens(batch["input_ids"][0, :4].tolist()) == ["<bos>", "Hi", "▁there", "friend"]
    assert batch["prompt_len"].tolist() == [3, 2]
    n0 = 3 + len(tok("friend", add_special_tokens=False)["input_ids"]) + 1  # + <eos> (no template: EOS ends)
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["labels"][0, n0:] == -100).all() and int(batch["labels"][0, n0 - 1]) == tok.eos_token_id
    assert (batch["input_ids"][0, n0:] == tok.pad_token_id).all()


def test_truncation_keeps_the_prompt_end_and_whole_characters():
    tok = _smollm2()
    prompt = " ".join(f"word{i}" for i in range(60))
    ex = chat.Example("t", prompt, None, "\U0001d11e" * 30)  # a 4-byte character, several tokens each
    full_p = tok(prompt)["input_ids"]
    full_c = tok(ex.completion, add_special_tokens=False)["input_ids"]
    assert len(full_c) > 30  # the character is split across tokens
    b = chat.CompletionCollator(tok, 40)([ex])
    n, p = int(b["attention_mask"].sum()), int(b["prompt_len"][0])
    kept = b["input_ids"][0, p:n].tolist()
    # the completion gets at most max_len - max_len // 2 tokens (fewer: whole characters), the prompt the rest,
    # from its end
    assert n == 40 and 17 <= len(kept) <= 20 and kept == full_c[:len(kept)] and b["ended"] == [False]
    assert b["input_ids"][0, :p].tolist() == full_p[-p:]
    text = b["completion"][0]
    assert text == "\U0001d11e" * len(text) and len(text) >= 1 and tok.decode(kept) == text
    assert kept[-1] != tok.convert_tokens_to_ids("<|im_end|>")
    short = chat.CompletionCollator(tok, 40)([chat.Example("s", prompt, None, "ok")])  # short completion
    assert int(short["prompt_len"][0]) == 40 - 2 and short["ended"] == [True]


def test_fallback_template_is_plain_and_said_once(tiny_models, capsys, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setattr(chat, "_TOLD", set())
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    assert not tok.chat_template
    ex = chat.Example("f", None, ({"role": "user", "content": "Hi"},), "Yo")
    ids = chat.prompt_ids(tok, ex)
    assert ids == [tok.bos_token_id] + tok("user:\nHi\n\nassistant:\n", add_special_tokens=False)["input_ids"]
    chat.prompt_ids(tok, ex)
    assert capsys.readouterr().err.count("has no chat template") == 1
    assert chat.completion_ids(tok, "Yo") == tok("Yo", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert chat.completion_ids(tok, "Yo", end=False) == tok("Yo", add_special_tokens=False)["input_ids"]


# --- records --------------------------------------------------------------------------------------------------


def test_load_examples_both_forms(tmp_path):
    f = _write(tmp_path / "d.jsonl", [
        {"prompt": "P", "completion": "C"},
        "",
        {"id": 7, "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                               {"role": "assistant", "content": "A"}]},
    ])
    a, b = chat.load_examples(f)
    assert a == chat.Example("d:1", "P", None, "C")
    assert b == chat.Example("7", None, ({"role": "system", "content": "S"}, {"role": "user", "content": "U"}), "A")
    g = _write(tmp_path / "p.jsonl", [{"prompt": "P"}, {"messages": [{"role": "user", "content": "U"}]}])
    assert [e.completion for e in chat.load_examples(g, need_completion=False)] == [None, None]


@pytest.mark.parametrize("record, where, words", [
    ({"prompt": "P"}, ":1", ["'completion'", "add"]),
    ({"completion": "C"}, ":1", ["no 'prompt' or 'messages'"]),
    ({"prompt": "P", "completion": 3}, ":1", ["'completion' must be a string", "int"]),
    ({"prompt": "P", "completion": "  "}, ":1", ["'completion' is empty"]),
    ({"messages": []}, ":1", ["'messages' must be a non-empty list"]),
    ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}, ":1",
     ["'messages'[0].role is 'bot'", "user, assistant"]),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "y"}]}, ":1",
     ["'messages'[0].content must be a string"]),
    ({"messages": [{"role": "user", "content": "x"}]}, ":1", ["last message is from 'user'", "assistant message"]),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, ":1",
     ["'messages'[1].content", "empty"]),
    ({"messages": [{"role": "user"}]}, ":1", ["'messages'[0] must be an object with 'role' and 'content'"]),
    ([1, 2], ":1", ["must be a JSON object"]),
])
def test_bad_records_name_file_line_field_and_fix(record, where, words, tmp_path):
    f = _write(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError) as e:
        chat.load_examples(f)
    msg = str(e.value)
    assert f"{f}{where}:" in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat.load_examples(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        chat.load_examples(_write(tmp_path / "j.jsonl", [{"prompt": "a", "completion": "b"}, "{oops"]))
    with pytest.raises(DataError, match="used twice"):
        chat.load_examples(_write(tmp_path / "d.jsonl", [{"id": 1, "prompt": "a", "completion": "b"}] * 2))
    with pytest.raises(DataError, match="must be a .jsonl file"):
        chat.load_examples(_write(tmp_path / "d.txt", ["hello"]))


# --- teachers on completion rows -----------------------------------------------------------------------------

EXAMPLES = [
    chat.Example("e0", None, ({"role": "user", "content": "Continue: To be, or not to be,"},),
                 "that is the question."),
    chat.Example("e1", "Whether 'tis nobler in the mind to suffer", None, " The slings and arrows of fortune"),
    chat.Example("e2", None, ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}),
                 "Hamlet, the prince of Denmark, speaks."),
]


def test_same_tokenizer_teacher_targets_equal_a_direct_forward(tiny_models):
    """Completion rows of SameTokenizerTeacher = top-k of the teacher's own logits on the same ids, row by row
    (each row run alone, unpadded); every other row is invalid."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.teachers.kd import SameTokenizerTeacher

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe-teacher"]).eval()
    batch = chat.CompletionCollator(tok, 64)(EXAMPLES)
    target, ce = SameTokenizerTeacher(teacher, top_k=5).targets(batch)
    for r in range(len(EXAMPLES)):
        n, p = int(batch["attention_mask"][r].sum()), int(batch["prompt_len"][r])
        ids = batch["input_ids"][r, :n]
        with torch.no_grad():
            logp = teacher(input_ids=ids[None]).logits[0].log_softmax(-1)
        rows = torch.arange(p - 1, n - 1)  # row j predicts completion token j + 1
        want = torch.zeros(batch["input_ids"].shape[1], dtype=torch.bool)
        want[rows] = True
        assert torch.equal(target.valid[r], want)
        top = logp[rows].topk(5, -1)
        assert torch.equal(target.ids[r, rows], top.indices)
        torch.testing.assert_close(target.logprobs[r, rows], top.values, atol=1e-5, rtol=1e-5)
        gold = -logp[rows].gather(1, ids[rows + 1][:, None])[:, 0]
        torch.testing.assert_close(ce[r, rows], gold, atol=1e-5, rtol=1e-5)
        assert ce[r, ~want].isnan().all()


@pytest.fixture(scope="module")
def cross(tiny_models):
    """Student tokenizer: tiny byte-level BPE (no template: the fallback); teacher: tiny ▁-BPE Llama with a
    Llama-2-style [INST] template, as an online AlignedTeacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.teachers.kd import AlignedTeacher
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    s_tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    t_tok = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    t_tok.chat_template = INST_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama-spm"]).eval()
    s_table, t_table = TokenTable.from_tokenizer(s_tok), TokenTable.from_tokenizer(t_tok)
    source = OnlineTeacher(model, tokenizer=t_tok, top_k=8)
    teacher = AlignedTeacher(source, s_table, t_table, VocabMap.cached(t_table, s_table), "prefix", "spm")
    return s_tok, t_tok, model, teacher


def _teacher_ids_by_hand(t_tok, ex: chat.Example, completion: str, ended: bool) -> tuple[list[int], int]:
    if ex.messages is not None:
        text = t_tok.apply_chat_template(list(ex.messages), add_generation_prompt=True, tokenize=False)
        p = t_tok(text, add_special_tokens=False)["input_ids"]
    else:
        p = t_tok(ex.prompt)["input_ids"]
    c = t_tok(completion, add_special_tokens=False)["input_ids"] + ([t_tok.eos_token_id] if ended else [])
    return p + c, len(p)


def test_cross_tokenizer_ce_over_the_completion_is_the_teachers_own(cross):
    """Σ of the aligned teacher CE over the student's completion rows = the teacher's own CE over its completion
    tokens (a direct forward on its own template's prompt + its tokenization of the completion)."""
    s_tok, t_tok, model, teacher = cross
    batch = chat.CompletionCollator(s_tok, 64)(EXAMPLES)
    _, ce = teacher.targets(batch)
    assert t_tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                     tokenize=False) == "<s>[INST] x [/INST]"
    for r, ex in enumerate(EXAMPLES):
        n, p = int(batch["attention_mask"][r].sum()), int(batch["prompt_len"][r])
        ids, tp = _teacher_ids_by_hand(t_tok, ex, batch["completion"][r], batch["ended"][r])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        own = -sum(float(logp[i - 1, ids[i]]) for i in range(tp, len(ids)))
        rows = ce[r, p - 1:n - 1]
        assert rows.isfinite().all() and ce[r, :p - 1].isnan().all() and ce[r, n - 1:].isnan().all()
        assert math.isclose(float(rows.double().sum()), own, rel_tol=1e-4), (r, float(rows.sum()), own)


def test_cross_tokenizer_targets_are_student_targets_on_the_region(cross):
    """Targets = cache.student_targets applied by hand to [special] + completion ids on both sides (teacher rows
    from the one that predicts its first completion token), placed at the student's row prompt_len - 1."""
    from stillroom.targets import TeacherOutput
    from stillroom.tokenization.project import student_targets

    s_tok, t_tok, _, teacher = cross
    batch = chat.CompletionCollator(s_tok, 64)(EXAMPLES)
    got, _ = teacher.targets(batch)
    transferred = 0
    for r, ex in enumerate(EXAMPLES):
        n, p = int(batch["attention_mask"][r].sum()), int(batch["prompt_len"][r])
        ids, tp = _teacher_ids_by_hand(t_tok, ex, batch["completion"][r], batch["ended"][r])
        out = teacher.source.run_ids([ids], [ex.example_id])[0]
        region = TeacherOutput(ex.example_id, torch.tensor([t_tok.bos_token_id] + ids[tp:]), out.topk_ids[tp - 1:],
                               out.topk_logprobs[tp - 1:], out.tail[tp - 1:], out.gold_ce[tp - 1:])
        sid = [s_tok.bos_token_id] + batch["input_ids"][r, p:n].tolist()
        want, _ = student_targets(region, sid, teacher.student_table, teacher.teacher_table, teacher.vocab_map,
                                  fallback="prefix", fill=False)
        rows = slice(p - 1, n)
        assert not got.valid[r, :p - 1].any() and not got.valid[r, n:].any()
        assert torch.equal(got.valid[r, rows], want.valid)
        v = want.valid
        k = want.ids.shape[-1]
        assert torch.equal(got.ids[r, rows][v][:, :k], want.ids[v])
        torch.testing.assert_close(got.logprobs[r, rows][v][:, :k], want.logprobs[v].float())
        torch.testing.assert_close(got.tail[r, rows][v], want.tail[v].float())
        assert bool(want.valid[0])  # the first completion token's row got a teacher distribution
        transferred += int(v.sum())
    assert transferred > 10


def test_cached_teacher_is_refused_on_completion_batches(cross):
    from stillroom.teachers.kd import AlignedTeacher

    s_tok, _, _, t = cross
    batch = chat.CompletionCollator(s_tok, 64)(EXAMPLES[:1])

    class Cached:  # a source without its own tokenizer / run_ids, like CachedTeacher
        def signal(self, texts, ids=None):
            raise AssertionError("not reached")

    with pytest.raises(ConfigError, match="online teacher"):
        AlignedTeacher(Cached(), t.student_table, t.teacher_table, t.vocab_map, "prefix", "c").targets(batch)


def _student_rows(student, batch):
    """Final hidden states ``[B, T-1, H]`` and the head of a plain forward (checked against its logits)."""
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    weight = student.get_output_embeddings().weight
    torch.testing.assert_close(out.hidden_states[-1] @ weight.T, out.logits, atol=1e-4, rtol=1e-4)
    return out.hidden_states[-1][:, :-1], weight, out.logits.log_softmax(-1)


def _objective(cross, kind: str, **kw):
    from stillroom.teachers.objectives import ObjectiveConfig, objective_teacher
    from stillroom.teachers.online import OnlineTeacher

    s_tok, t_tok, model, t = cross
    source = OnlineTeacher(model, tokenizer=t_tok, top_k=1 if kind == "alm" else 8)
    return objective_teacher(source, t.student_table, t.teacher_table, ObjectiveConfig(kind=kind, weight=1.0, **kw), "spm")


@pytest.mark.parametrize("chunks", ["exact", "all"])
def test_alm_teacher_on_completions_by_hand(cross, nodrop_student, chunks):
    """ALM on a completion batch = a naive float64 loop over the chunks of the two *completions* (each model's
    direct forward on its own rendering; the completion token ids aligned at byte level on their own): Bernoulli
    BCE of the chunk likelihoods, weighted by student tokens. The prompt never enters a chunk."""
    from transformers import AutoModelForCausalLM

    from stillroom.tokenization.align import align

    s_tok, t_tok, model, t = cross
    student = AutoModelForCausalLM.from_pretrained(nodrop_student).eval()
    batch = chat.CompletionCollator(s_tok, 64)(EXAMPLES)
    hidden, weight, s_logp = _student_rows(student, batch)
    s_logp = s_logp.detach()
    hidden.retain_grad()
    got = _objective(cross, "alm", alm_chunks=chunks).loss_sum(hidden, weight, batch)
    want, scored = 0.0, 0
    for r, ex in enumerate(EXAMPLES):
        n, p = int(batch["attention_mask"][r].sum()), int(batch["prompt_len"][r])
        ids, tp = _teacher_ids_by_hand(t_tok, ex, batch["completion"][r], batch["ended"][r])
        with torch.no_grad():
            t_logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1).double()
        t_lp = [float(t_logp[i - 1, ids[i]]) for i in range(tp, len(ids))]
        s_ids = batch["input_ids"][r, :n].tolist()
        s_lp = [float(s_logp[r, i - 1, s_ids[i]]) for i in range(p, n)]
        al = align(np.array(ids[tp:]), np.array(s_ids[p:n]), t.teacher_table, t.student_table)
        for (t0, t1, s0, s1), exact in zip(al.groups.tolist(), al.exact.tolist(), strict=True):
            if t1 == t0 or s1 == s0 or (chunks == "exact" and not exact):
                continue
            lp = min(sum(t_lp[t0:t1]), 0.0) - 1e-6
            lq = min(sum(s_lp[s0:s1]), 0.0) - 1e-6
            want += -(math.exp(lp) * lq + (1 - math.exp(lp)) * math.log(-math.expm1(lq))) * (s1 - s0)
            scored += 1
    assert scored > 20
    assert math.isclose(float(got), want, rel_tol=1e-4), (float(got), want)
    got.backward()
    g = hidden.grad.abs().sum(-1)
    for r in range(len(EXAMPLES)):  # only rows that predict completion tokens get a gradient
        n, p = int(batch["attention_mask"][r].sum()), int(batch["prompt_len"][r])
        assert (g[r, :p - 1] == 0).all() and (g[r, n - 1:] == 0).all() and g[r, p - 1:n - 1].sum() > 0


@pytest.mark.parametrize("method", ["min_ce", "avg_ce"])
def test_fused_alm_of_twin_teachers_on_completions_is_the_single_teachers(cross, nodrop_student, method):
    """Two identical ALM teachers fused per sequence on a completion batch give the one teacher's ALM (the
    region offsets reach the fused path too)."""
    from transformers import AutoModelForCausalLM

    from stillroom.teachers.objectives import FusedALM

    s_tok = cross[0]
    student = AutoModelForCausalLM.from_pretrained(nodrop_student).eval()
    batch = chat.CompletionCollator(s_tok, 64)(EXAMPLES)
    hidden, weight, _ = _student_rows(student, batch)
    one = _objective(cross, "alm")
    fused = FusedALM([one, _objective(cross, "alm")], method)
    torch.testing.assert_close(fused.loss_sum(hidden, weight, batch), one.loss_sum(hidden, weight, batch),
                               atol=1e-5, rtol=1e-5)


def test_uld_teacher_on_completions_pairs_the_completion_tokens(cross, nodrop_student):
    """ULD on a completion batch = Σ ``uld_loss`` over the one-to-one exact pairs of the two completions,
    pairing the teacher's row that predicts its token (its own rendering) with the student's (its row)."""
    from transformers import AutoModelForCausalLM

    from stillroom.losses import uld_loss
    from stillroom.targets import SparseTarget
    from stillroom.tokenization.align import align

    s_tok, t_tok, _, t = cross
    student = AutoModelForCausalLM.from_pretrained(nodrop_student).eval()
    batch = chat.CompletionCollator(s_tok, 64)(EXAMPLES)
    hidden, weight, _ = _student_rows(student, batch)
    teacher = _objective(cross, "uld")
    got = teacher.loss_sum(hidden, weight, batch)
    want, pairs = torch.zeros((), dtype=torch.float64), 0
    for r, ex in enumerate(EXAMPLES):
        n, p = int(batch["attention_mask"][r].sum()), int(batch["prompt_len"][r])
        ids, tp = _teacher_ids_by_hand(t_tok, ex, batch["completion"][r], batch["ended"][r])
        out = teacher.source.run_ids([ids], [ex.example_id])[0]
        s_ids = batch["input_ids"][r, :n].tolist()
        al = align(np.array(ids[tp:]), np.array(s_ids[p:n]), t.teacher_table, t.student_table)
        for t0, _, s0, _ in al.groups[al.one_to_one & al.exact].tolist():
            row_t, row_s = tp + t0 - 1, p + s0 - 1  # the rows that predict the pair's token
            tgt = SparseTarget(out.topk_ids[row_t][None], out.topk_logprobs[row_t][None].float(),
                               out.tail[row_t][None].float(), torch.ones(1, dtype=torch.bool))
            want = want + uld_loss((hidden[r, row_s] @ weight.T)[None], tgt, reduction="sum").double()
            pairs += 1
    assert pairs > 20
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_alm_and_uld_teachers_train_on_chat_data_on_and_off_policy(tiny_models, tmp_path):
    """A recipe with an ALM and a ULD teacher (both cross-tokenizer) trains on chat data, off-policy and
    on-policy (λ = 1): the run ends, both terms are logged and finite, and `train --check` accepts it."""
    from stillroom.training.plan import make_plan
    from stillroom.training.recipe import load_recipe
    from stillroom.training.run import train

    data = _chat_file(tmp_path / "c.jsonl")
    for name, on in (("off", None), ("on", {"lambda": 1.0, "max_new_tokens": 8})):
        raw = _recipe(tiny_models, data, tmp_path / name, teachers=("llama-spm",))
        raw["teachers"] = [{"path": str(tiny_models["llama-spm"]), "name": "a", "objective": "alm"},
                           {"path": str(tiny_models["llama-spm"]), "name": "u", "objective": "uld", "weight": 0.2}]
        raw["train"]["max_steps"] = 2
        if on:
            raw["onpolicy"] = on
        make_plan(load_recipe(raw))
        train(load_recipe(raw))
        hist = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logged = [h for h in hist if "loss" in h]
        assert len(logged) == 2
        for h in logged:
            terms = {k: v for k, v in h.items() if k.startswith(("alm/", "uld/"))}
            assert len(terms) >= 2 and all(math.isfinite(v) and v > 0 for v in terms.values()), h


# --- training -------------------------------------------------------------------------------------------------


def _chat_file(path: Path, n: int = 12) -> Path:
    from stillroom.testing import corpus_texts

    lines = [ln.strip() for ln in corpus_texts("train")[0].splitlines() if len(ln.strip()) > 25][40:40 + n + 1]
    return _write(path, [{"id": f"r{i}", "messages": [{"role": "user", "content": "Continue: " + lines[i]},
                                                      {"role": "assistant", "content": lines[i + 1]}]}
                         for i in range(n)])


def _recipe(tiny_models, data: Path, out: Path, teachers=("gpt2-bpe-teacher", "llama-spm"), **data_keys) -> dict:
    return {"student": str(tiny_models["gpt2-bpe"]),
            "teachers": [{"path": str(tiny_models[t])} for t in teachers],
            "data": {"train": str(data), "format": "chat", "seq_len": 64, **data_keys},
            "loss": {"ce_weight": 0.5}, "fusion": {"top_k": 8, "projection": "prefix"},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "logging_steps": 1,
                      "save_steps": None, "progress": False, "plot": False}}


def test_completion_loss_never_sees_prompt_rows(tiny_models, nodrop_student, tmp_path):
    """Gradient check: with a same- and a cross-tokenizer teacher, the loss's gradient on the student's final
    hidden states is zero on every row that predicts a prompt token (or padding) and non-zero on completion
    rows; with λ = 1 the loss is the plain completion CE computed here from dense logits."""
    from stillroom.models.student import build_student
    from stillroom.training import DistillTrainer, LossSpec, build_teachers, make_plan
    from stillroom.training.recipe import load_recipe
    from stillroom.training.run import training_arguments

    raw = _recipe(tiny_models, _chat_file(tmp_path / "c.jsonl"), tmp_path / "o")
    raw["student"] = str(nodrop_student)
    r = load_recipe(raw)
    plan = make_plan(r)
    tok = plan.student_tokenizer
    student = build_student(r.student, tok).train()
    coll = chat.CompletionCollator(tok, 64)
    trainer = DistillTrainer(model=student, args=training_arguments(r, False),
                             train_dataset=chat.ExampleDataset(chat.load_examples(r.data.train)),
                             data_collator=coll, teachers=build_teachers(plan), loss=LossSpec(ce_weight=0.5))
    batch = coll(list(trainer.train_dataset)[:4])
    seen = {}

    def keep(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out.last_hidden_state
        h.retain_grad()
        seen["h"] = h

    handle = student.base_model.register_forward_hook(keep)
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    handle.remove()
    g = seen["h"].grad.abs().sum(-1)  # [B, T]
    for b in range(4):
        n, p = int(batch["attention_mask"][b].sum()), int(batch["prompt_len"][b])
        assert (g[b, :p - 1] == 0).all() and (g[b, n - 1:] == 0).all()
        assert (g[b, p - 1:n - 1] > 0).all()

    trainer.loss_cfg = LossSpec(ce_weight=1.0)
    got = trainer.compute_loss(student, batch)
    logp = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    terms = [-logp[b, j - 1, batch["input_ids"][b, j]] for b in range(4)
             for j in range(int(batch["prompt_len"][b]), int(batch["attention_mask"][b].sum()))]
    torch.testing.assert_close(got, torch.stack(terms).mean(), atol=1e-4, rtol=1e-4)


def test_stillroom_train_on_chat_data(tiny_models, tmp_path):
    """`stillroom train` on a tiny chat file with a same- and a cross-tokenizer teacher: the loss falls, and the
    reported eval_loss / eval_bpb are the saved student's completion CE per token and bits per completion byte,
    recomputed here from a plain forward of every record."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from stillroom.cli import app

    data = _chat_file(tmp_path / "chat.jsonl")
    raw = _recipe(tiny_models, data, tmp_path / "run", eval=str(data))
    raw["train"].update(max_steps=12, lr=3e-3, warmup_steps=0)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-3000:]
    hist = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    final = [h for h in hist if "eval_loss" in h][-1]

    tok = AutoTokenizer.from_pretrained(tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    nats, tokens, nbytes = 0.0, 0, 0
    for rec in map(json.loads, data.read_text().splitlines()):
        prompt = [tok.bos_token_id] + tok(f"user:\n{rec['messages'][0]['content']}\n\nassistant:\n",
                                          add_special_tokens=False)["input_ids"]  # the plain fallback template
        reply = rec["messages"][1]["content"]
        comp = tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
        nats -= sum(float(logp[i - 1, ids[0, i]]) for i in range(len(prompt), ids.shape[1]))
        tokens += len(comp)
        nbytes += len(reply.encode("utf-8"))
    assert math.isclose(final["eval_loss"], nats / tokens, rel_tol=1e-4)
    assert math.isclose(final["eval_bpb"], nats / math.log(2) / nbytes, rel_tol=1e-4)


@pytest.mark.parametrize("change, words", [
    ({"data": {"streaming": True}}, ["data.streaming", "does not apply"]),
    ({"data": {"packing": True}}, ["data.packing"]),
    ({"data": {"format": "prompt_completion"}}, ["holds chat records", "data.format=chat"]),
])
def test_train_check_refuses_what_completion_data_does_not_support(change, words, tiny_models, tmp_path):
    from stillroom.training.plan import make_plan
    from stillroom.training.recipe import load_recipe

    raw = _recipe(tiny_models, _chat_file(tmp_path / "c.jsonl"), tmp_path / "o")
    for key, value in change.items():
        if key == "teachers":
            value = [{**t, "path": str(tiny_models[t["path"]])} for t in value]
            raw[key] = value
        else:
            raw[key] = {**raw[key], **value}
    if "streaming" in change.get("data", {}):
        raw["train"]["max_steps"] = 2
    with pytest.raises(ConfigError) as e:
        make_plan(load_recipe(raw))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_train_check_refuses_a_cached_teacher(tiny_models, tmp_path):
    from stillroom.training.plan import make_plan
    from stillroom.training.recipe import load_recipe

    raw = _recipe(tiny_models, _chat_file(tmp_path / "c.jsonl"), tmp_path / "o", teachers=("llama-spm",))
    (tmp_path / "cache").mkdir()
    raw["teachers"][0]["cache"] = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="teachers.0.cache: the offline cache does not support"):
        make_plan(load_recipe(raw))


def test_export_blocks_refuses_completion_data(tiny_models, tmp_path):
    from stillroom.training.data import export_training_blocks
    from stillroom.training.recipe import load_recipe

    r = load_recipe(_recipe(tiny_models, _chat_file(tmp_path / "c.jsonl"), tmp_path / "o"))
    with pytest.raises(ConfigError, match="--export-blocks: data.format 'chat' has no text blocks"):
        export_training_blocks(r, tmp_path / "blocks.jsonl")
    assert not (tmp_path / "blocks.jsonl").exists()


def test_a_template_that_refuses_a_conversation_names_the_example():
    tok = _smollm2()
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}" \
             "{% endif %}{{ m['content'] }}{% endfor %}"
    old, tok.chat_template = tok.chat_template, strict
    try:
        with pytest.raises(DataError, match=r"example x: the chat template of .* refuses its messages \(no system"):
            chat.prompt_ids(tok, chat.Example("x", None, ({"role": "system", "content": "s"},), "c"))
    finally:
        tok.chat_template = old


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2.5", "deepseek-coder", "mistral-spm", "gemma3",
                                  "t5-unigram-1k", "bert-uncased"])
@pytest.mark.parametrize("template", ["fallback", "gemma"])
def test_no_token_crosses_the_template_boundary(name, template):
    """Why chat rows need no token healing: tokenizing each shipped record's rendered prompt *and* completion as
    one text, no token spans the byte where the template ends (the prompt ends in a newline or a special token,
    where every family's tokenizer ends a token), so a model reading its own rendering never sees a
    completion start inside a token."""
    from stillroom.files import PACKAGE_DATA

    tok = load_shared_tokenizer(name)
    if template == "gemma":
        tok = copy.copy(tok)
        tok.chat_template = GEMMA_TEMPLATE
    examples = chat.load_examples(PACKAGE_DATA / "chat" / "validation.jsonl")
    crossed = []
    for ex in examples:
        prompt = tok.apply_chat_template(list(ex.messages), chat_template=chat.chat_template(tok),
                                         add_generation_prompt=True, tokenize=False)  # as chat.prompt_ids
        enc = tok(prompt + ex.completion, add_special_tokens=False, return_offsets_mapping=True)
        cut = len(prompt)
        text = prompt + ex.completion  # (T5 / BERT fold the newline into the next word's offsets: not a crossing)
        crossed += [ex.example_id for a, b in enc["offset_mapping"] if a < cut < b and text[a:cut].strip()]
    assert not crossed, crossed
