"""stillroom.evaluation: bits per byte against hand computations and naive references."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from stillroom.evaluation import evaluate


class CharTokenizer:
    """One token per character of a fixed alphabet; id 0 is BOS (or no BOS at all)."""

    def __init__(self, alphabet: str, bos: bool = True):
        self.alphabet = alphabet
        self.bos_token_id = 0 if bos else None
        self.base = 1 if bos else 0

    def __len__(self) -> int:
        return len(self.alphabet) + self.base

    def __call__(self, text: str, add_special_tokens: bool = True):
        assert add_special_tokens is False
        return {"input_ids": [self.alphabet.index(c) + self.base for c in text]}


class Bigram(torch.nn.Module):
    """logits[t] = log_table[input_ids[t]]: the prediction depends on the current token only."""

    def __init__(self, log_table: torch.Tensor):
        super().__init__()
        self.log_table = log_table

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.log_table[input_ids])


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def hand_bigram() -> Bigram:
    # ids: 0 BOS, 1 'a', 2 'b'. Rows: the distribution after that token.
    p = torch.tensor([
        [0.0, 1 / 2, 1 / 2],  # after BOS: a 1/2 (1 bit)
        [0.0, 3 / 4, 1 / 4],  # after a:   b 1/4 (2 bits)
        [0.0, 7 / 8, 1 / 8],  # after b:   a 7/8, b 1/8 (3 bits)
    ])
    return Bigram(p.log())


def test_bits_per_byte_hand_computed():
    # "abb": -log2 p(a|BOS) - log2 p(b|a) - log2 p(b|b) = 1 + 2 + 3 = 6 bits over 3 bytes.
    r = evaluate(hand_bigram(), CharTokenizer("ab"), ["abb"])
    assert r.nll_bits == pytest.approx(6.0, rel=1e-6)
    assert r.bits_per_byte == pytest.approx(2.0, rel=1e-6)
    assert r.tokens == 3 and r.bytes == 3 and r.first_token == "bos"
    assert r.token_perplexity == pytest.approx(2 ** 2.0, rel=1e-6)  # 6 bits / 3 tokens = 2 bits per token


def test_multibyte_text_counts_utf8_bytes():
    # "éé" is 2 tokens but 4 UTF-8 bytes; after BOS: é 1/2 (1 bit); after é: é 1/4 (2 bits).
    p = torch.tensor([[0.0, 1 / 2, 1 / 2], [0.0, 1 / 4, 3 / 4], [0.0, 1 / 2, 1 / 2]])
    r = evaluate(Bigram(p.log()), CharTokenizer("éx"), ["éé"])
    assert r.bytes == 4
    assert r.bits_per_byte == pytest.approx(3 / 4, rel=1e-6)


def test_same_bits_per_byte_whatever_the_windows():
    torch.manual_seed(0)
    model = Bigram(torch.log_softmax(torch.randn(4, 4) * 2, -1))
    tok = CharTokenizer("abc")
    gen = torch.Generator().manual_seed(1)
    texts = ["".join("abc"[i] for i in torch.randint(0, 3, (n,), generator=gen)) for n in (1, 7, 50, 120)]
    # Naive reference: every token predicted from the token before it (BOS for the first).
    bits = 0.0
    for t in texts:
        ids = [0] + tok(t, add_special_tokens=False)["input_ids"]
        bits -= sum(model.log_table[a, b].item() for a, b in zip(ids[:-1], ids[1:], strict=True)) / math.log(2)
    expected = bits / sum(len(t) for t in texts)
    for context, stride, batch in [(1024, 512, 8), (2, 1, 1), (5, 2, 3), (16, 15, 2), (64, 7, 100)]:
        r = evaluate(model, tok, texts, context=context, stride=stride, batch_size=batch)
        assert r.bits_per_byte == pytest.approx(expected, rel=1e-5), (context, stride, batch)
        assert r.tokens == sum(len(t) for t in texts)


def test_a_large_vocabulary_runs_fewer_windows_per_forward_with_the_same_result(monkeypatch):
    import stillroom.scoring as scoring

    torch.manual_seed(0)
    model = Bigram(torch.log_softmax(torch.randn(4, 4) * 2, -1))
    model.config = SimpleNamespace(vocab_size=4)
    shapes = []
    forward = model.forward
    model.forward = lambda input_ids: shapes.append(tuple(input_ids.shape)) or forward(input_ids)
    tok = CharTokenizer("abc")
    texts = ["abcabcab" * 5, "cab" * 7]
    teachers = [("t", Bigram(torch.log_softmax(torch.randn(4, 4), -1)), tok)]
    full = evaluate(model, tok, texts, context=8, stride=4, batch_size=8, teachers=teachers)
    assert max(n for n, _ in shapes) > 2
    shapes.clear()
    monkeypatch.setattr(scoring, "LOGITS_BUDGET", 2 * 8 * 4)  # two windows of 8 positions × 4 ids
    capped = evaluate(model, tok, texts, context=8, stride=4, batch_size=8, teachers=teachers)
    assert shapes and all(n * w * 4 <= 2 * 8 * 4 for n, w in shapes)
    assert capped.nll_bits == pytest.approx(full.nll_bits, rel=1e-9)
    assert capped.teachers[0].kl_nats == pytest.approx(full.teachers[0].kl_nats, rel=1e-9)


def test_uniform_model_is_log2_vocab_per_token(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    texts = ["To be, or not to be, that is the question.", "Hark!\nWho goes there? — a knight, sirrah."]
    r = evaluate(Uniform(len(tok)), tok, texts, context=8, stride=3)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r.tokens == n_tokens and r.bytes == n_bytes
    assert r.bits_per_byte == pytest.approx(math.log2(len(tok)) * n_tokens / n_bytes, rel=1e-6)


def test_without_bos_first_token_is_a_uniform_guess():
    model = hand_bigram()
    tok = CharTokenizer("ab", bos=True)
    nobos = CharTokenizer("ab", bos=False)  # ids: a 0, b 1; same bigram rows shifted
    p = torch.tensor([[3 / 4, 1 / 4], [7 / 8, 1 / 8]])
    r = evaluate(Bigram(p.log()), nobos, ["abb"])
    # first token: log2(2) = 1 bit (uniform over 2), then 2 + 3 bits, as with BOS above.
    assert r.first_token == "uniform"
    assert r.nll_bits == pytest.approx(6.0, rel=1e-6)
    assert evaluate(model, tok, ["abb"]).nll_bits == pytest.approx(r.nll_bits, rel=1e-6)


def test_real_model_matches_one_full_forward(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_models["gpt2-bpe"]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    text = "Now is the winter of our discontent made glorious summer by this sun of York."
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1]
    nats = -lp.gather(1, ids[0, 1:, None]).sum().item()
    r = evaluate(model, tok, [text])
    assert r.bits_per_byte == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-5)
    # A shorter context changes the conditioning but still scores every token once.
    short = evaluate(model, tok, [text], context=6, stride=2)
    assert short.tokens == r.tokens and math.isfinite(short.bits_per_byte)


def naive_teacher_metrics(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> tuple[float, float]:
    """Rows are aligned already; KL(T||S) per row, averaged, and the top-1 match rate."""
    p = teacher_lp.exp()
    kl = (p * (teacher_lp - student_lp)).nan_to_num(0.0).sum(-1)  # 0 * (-inf) terms count as 0
    agree = (student_lp.argmax(-1) == teacher_lp.argmax(-1)).double()
    return agree.mean().item(), kl.mean().item()


def test_teacher_metrics_same_tokenizer_windowed():
    torch.manual_seed(0)
    tok = CharTokenizer("abcd")
    student = Bigram(torch.log_softmax(torch.randn(5, 5), -1))
    teacher = Bigram(torch.log_softmax(torch.randn(5, 5) * 3, -1))
    gen = torch.Generator().manual_seed(3)
    texts = ["".join("abcd"[i] for i in torch.randint(0, 4, (n,), generator=gen)) for n in (3, 40, 101)]
    s_rows, t_rows = [], []
    for t in texts:
        prev = [0] + tok(t, add_special_tokens=False)["input_ids"][:-1]
        s_rows.append(student.log_table[prev])
        t_rows.append(teacher.log_table[prev])
    agree, kl = naive_teacher_metrics(torch.cat(s_rows), torch.cat(t_rows))
    for context, stride in [(1024, 512), (4, 3), (7, 2)]:
        r = evaluate(student, tok, texts, teachers=[("t", teacher, tok), ("t2", teacher, tok)],
                     context=context, stride=stride, batch_size=2)
        plain = evaluate(student, tok, texts, context=context, stride=stride, batch_size=2)
        assert r.nll_bits == pytest.approx(plain.nll_bits, rel=1e-6)  # lockstep path == batched path
        for m in r.teachers:
            assert m.aligned == m.positions == sum(len(t) for t in texts)
            assert m.top1_agreement == pytest.approx(agree, abs=1e-9)
            assert m.kl_nats == pytest.approx(kl, rel=1e-5)


def test_teacher_metrics_same_tokenizer_real_models(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    student = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe-teacher"]).eval()
    texts = ["O Romeo, Romeo! wherefore art thou Romeo?", "Friends, Romans, countrymen, lend me your ears;"]
    s_rows, t_rows = [], []
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            s_rows.append(torch.log_softmax(student(ids).logits, -1)[0, :-1])
            t_rows.append(torch.log_softmax(teacher(ids).logits, -1)[0, :-1])
    agree, kl = naive_teacher_metrics(torch.cat(s_rows), torch.cat(t_rows))
    r = evaluate(student, tok, texts, teachers=[("teacher", teacher, tok)])
    (m,) = r.teachers
    assert m.aligned == m.positions == r.tokens
    assert m.top1_agreement == pytest.approx(agree, abs=1e-9)
    assert m.kl_nats == pytest.approx(kl, rel=1e-4)


def test_cli_eval_json(tiny_models, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    data = tmp_path / "texts"
    data.mkdir()
    (data / "a.txt").write_text("Is this a dagger which I see before me?")
    (data / "b.txt").write_text("Out, damned spot! out, I say!")
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_models["gpt2-bpe"]), "--data", str(data),
                                   "--teacher", str(tiny_models["gpt2-bpe-teacher"]), "--json"])
    assert res.exit_code == 0, res.output
    (report,) = json.loads(res.stdout)
    assert report["bytes"] == len(b"Is this a dagger which I see before me?") + len(b"Out, damned spot! out, I say!")
    assert report["texts"] == 2 and report["first_token"] == "bos"
    assert report["teachers"][0]["teacher"] == "gpt2-bpe-teacher"
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_models["gpt2-bpe"]), "--data", str(data),
                                   "--teacher", str(tiny_models["llama-spm"])])
    assert res.exit_code == 0, res.output
    assert "bits/byte" in res.output and "llama-spm" in res.output


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="list of strings"):
        evaluate(hand_bigram(), CharTokenizer("ab"), "ab")
    with pytest.raises(ValueError, match="stride"):
        evaluate(hand_bigram(), CharTokenizer("ab"), ["ab"], context=4, stride=4)
    with pytest.raises(ValueError, match=r"stride \(--stride\) must be in \[1, 3\].*got 0"):  # 0 is not "default"
        evaluate(hand_bigram(), CharTokenizer("ab"), ["ab"], context=4, stride=0)
    model = hand_bigram()
    model.config = SimpleNamespace(n_positions=8)
    with pytest.raises(ValueError, match=r"context \(--context\) must be in \[2, 8\] .*got 9"):
        evaluate(model, CharTokenizer("ab"), ["ab"], context=9)
    assert evaluate(model, CharTokenizer("ab"), ["ab"], context=8).tokens == 2


def test_zero_tokens_scored_is_an_error():
    """A tokenizer that yields nothing would report bits/byte 0.0 — a perfect score for no work."""
    from stillroom.errors import DataError

    class Nothing(CharTokenizer):
        def __call__(self, text: str, add_special_tokens: bool = True):
            return {"input_ids": []}

    with pytest.raises(DataError, match=r"m: its tokenizer gives no tokens for any of the 2 text"):
        evaluate(hand_bigram(), Nothing("ab"), ["ab", "ba"], name="m")


def test_teacher_metrics_cross_tokenizer_naive(tiny_models):
    """Student byte-level BPE vs teacher ▁ BPE: pairs from the tokenizers' own character offsets, a dense
    push-forward of the teacher distribution through the vocabulary map, KL and argmax computed directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.tokenization.tokens import TokenTable
    from stillroom.tokenization.vocab import VocabMap

    s_tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    t_tok = AutoTokenizer.from_pretrained(tiny_models["llama-spm"])
    student = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama-spm"]).eval()
    texts = ["But, soft! what light through yonder window breaks?", "The quality of mercy is not strain'd,\n"
             "It droppeth as the gentle rain from heaven"]
    mapping = torch.as_tensor(VocabMap.cached(TokenTable.from_tokenizer(t_tok), TokenTable.from_tokenizer(s_tok)).mapping)
    push = torch.zeros(len(mapping), len(s_tok), dtype=torch.float64)  # dense [V_t, V_s] 0/1 matrix
    push[torch.arange(len(mapping)), mapping] = 1.0

    def rows(model, tok, text):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([[tok.bos_token_id] + enc["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits.double(), -1)[0, :-1]
        return lp, [tuple(o) for o in enc["offset_mapping"]]

    s_all, t_all = [], []
    for text in texts:
        s_lp, s_off = rows(student, s_tok, text)
        t_lp, t_off = rows(teacher, t_tok, text)
        t_index = {span: i for i, span in enumerate(t_off)}
        for j, span in enumerate(s_off):
            if span in t_index:
                s_all.append(s_lp[j])
                t_all.append((t_lp[t_index[span]].exp() @ push).log())
    assert len(s_all) > 20
    agree, kl = naive_teacher_metrics(torch.stack(s_all), torch.stack(t_all))
    r = evaluate(student, s_tok, texts, teachers=[("spm", teacher, t_tok)])
    (m,) = r.teachers
    assert m.aligned == len(s_all) and m.positions == r.tokens
    assert m.top1_agreement == pytest.approx(agree, abs=1e-9)
    assert m.kl_nats == pytest.approx(kl, rel=1e-4)


def test_shipped_default_teachers():
    """The embedded default: two teachers of different tokenizer families, float32 on load, clearly trained."""
    from transformers import AutoTokenizer

    from stillroom.evaluation import load_model
    from stillroom.testing import PACKAGE_DATA, corpus_texts
    from stillroom.tokenization.tokens import TokenTable

    root = PACKAGE_DATA / "default"
    kinds = {}
    text = corpus_texts("validation")[0][:4000]
    for name in ("teacher-bpe", "teacher-spm"):
        model, tok = load_model(root / name)
        assert next(model.parameters()).dtype == torch.float32
        assert (root / name / "README.md").read_text().count("bits per byte") >= 1
        kinds[name] = TokenTable.from_tokenizer(tok).kind
        r = evaluate(model, tok, [text])
        uniform = math.log2(len(tok)) * r.tokens / r.bytes
        assert r.bits_per_byte < 0.75 * uniform, (name, r.bits_per_byte, uniform)
    assert kinds == {"teacher-bpe": "byte_level", "teacher-spm": "sentencepiece"}
    student = TokenTable.from_tokenizer(AutoTokenizer.from_pretrained(root / "student-tokenizer"))
    teachers = {TokenTable.from_tokenizer(AutoTokenizer.from_pretrained(root / n)).hash for n in kinds}
    assert student.hash not in teachers


def test_completion_sums_are_completion_tokens_only(tiny_models):
    """completion_sums over a padded batch = per record, a plain forward on prompt + completion + EOS (the
    fallback template's end) summing -log2 p over the completion tokens only; bytes = the completions' UTF-8."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.evaluation import completion_sums
    from stillroom.inputs.chat import Example

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]).eval()
    exs = [Example("a", "To be, or not to be:", None, " that is the question."),
           Example("b", "Whether", None, " 'tis nobler — in the mind"),
           Example("c", "Or to take arms against a sea of troubles, and by opposing", None, " end them.")]
    bits, tokens, nbytes = completion_sums(model, tok, exs, max_len=64, batch_size=2)
    want_bits, want_tokens = 0.0, 0
    for ex in exs:
        p = tok(ex.prompt)["input_ids"]
        c = tok(ex.completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
        want_bits -= sum(float(logp[len(p) + i - 1, t]) for i, t in enumerate(c)) / math.log(2)
        want_tokens += len(c)
    assert tokens == want_tokens and nbytes == sum(len(e.completion.encode("utf-8")) for e in exs)
    assert math.isclose(bits, want_bits, rel_tol=1e-5)
