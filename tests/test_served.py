"""stillroom.teachers.served against a real llama.cpp server (``llama_cpp.server`` of llama-cpp-python) serving
a tiny GGUF that stillroom's own export writes here: rows equal to the same model run through transformers, a
cache written through the server equal to the in-process one, a server killed mid-cache and resumed, the
one-line refusals; and the exported GGUF read by llama.cpp itself (tokens and logits vs transformers)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch

from stillroom.errors import ConfigError, DataError, ServerError
from stillroom.models.export import export_gguf
from stillroom.teachers.cache import CachedTeacher, write_cache
from stillroom.teachers.online import OnlineTeacher
from stillroom.teachers.served import PROBE, ServedTeacher
from stillroom.testing import corpus_texts, llama_server, save_pair, tiny_llama

TEXTS = [t[i:i + 300] for t in corpus_texts("train")[:2] for i in range(0, 3000, 300)]  # 20 texts


@pytest.fixture(scope="module")
def teacher(probe_teacher):
    """A tiny Llama that knows the probe: its folder and its f32 GGUF."""
    return probe_teacher


F32_KV = ("--type_k", "0", "--type_v", "0")  # llama.cpp keeps its KV cache in f16 by default


@pytest.fixture(scope="module")
def server(teacher):
    """The tiny teacher served with an f32 KV cache: what differs from transformers is then llama.cpp's kernels
    alone (measured: max |Δ log-prob| 3e-5 over 1,783 rows, no top-5 id swapped; with the default f16 cache
    1.5e-2 and 10 swaps)."""
    with llama_server(teacher[1], *F32_KV) as url:
        yield url


def test_probe_finds_llama_cpp_servers_reading(teacher, server):
    t = ServedTeacher.from_path(server, teacher[0], top_k=5)
    # llama_cpp.server without BOS: echoed entry e holds the distribution after token e, the first one empty
    assert (t.offset, t.strip) == (0, 0)
    assert t.model and t.vocab_size == 400


def test_rows_equal_the_same_model_in_transformers(teacher, server):
    served = ServedTeacher.from_path(server, teacher[0], top_k=5)
    online = OnlineTeacher(teacher[0], top_k=5)
    texts = TEXTS[:4] + [PROBE]
    before = served.stats.extra_rows  # the probe's own rows, scored at start
    for a, b in zip(served.signal(texts), online.signal(texts), strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        # every row, the first one (asked alone) included; the same ids where they are not near-tied
        gap = (b.topk_logprobs[:, :-1] - b.topk_logprobs[:, 1:]).min(-1).values
        clear = gap > 1e-3
        assert torch.equal(a.topk_ids[clear], b.topk_ids[clear])
        assert torch.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)  # llama.cpp's f32 kernels
        assert torch.allclose(a.tail, b.tail, atol=1e-4)
        known = ~a.gold_ce.isnan()
        assert torch.allclose(a.gold_ce[known], b.gold_ce[known], atol=1e-4)
        # the gold is known at least wherever it is in the top 5 (and, right, wherever the answer held it)
        in_top = (b.topk_ids[:-1] == b.input_ids[1:, None]).any(-1)
        assert not (in_top & ~known[:-1]).any()
    assert served.stats.extra_rows - before == len(texts)  # llama_cpp.server leaves each text's first row empty
    assert served.stats.empty_rows == 0


def test_cache_through_the_server_reads_back_as_the_in_process_cache(teacher, server, tmp_path):
    rows = [(f"t{i}", t) for i, t in enumerate(TEXTS[:6])]
    write_cache(ServedTeacher.from_path(server, teacher[0], top_k=4), rows, tmp_path / "served", shard_size=2,
                progress=False)
    write_cache(OnlineTeacher(teacher[0], top_k=4), rows, tmp_path / "local", shard_size=2, progress=False)
    a, b = CachedTeacher(tmp_path / "served"), CachedTeacher(tmp_path / "local")
    assert a.tokenizer_hash == b.tokenizer_hash and a.teacher_hash != b.teacher_hash
    for x, y in zip(a.signal(None, [i for i, _ in rows]), b.signal(None, [i for i, _ in rows]), strict=True):
        assert torch.allclose(x.topk_logprobs, y.topk_logprobs, atol=2e-3)


def test_cli_cache_survives_a_killed_server_and_resumes(teacher, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "cache"
    with llama_server(teacher[1], *F32_KV) as url:
        cmd = [sys.executable, "-m", "stillroom", "cache", "--teacher", str(teacher[0]), "--server", url,
               "--data", str(data), "--out", str(out), "--top-k", "4", "--shard-size", "2", "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while len(list(out.glob("shard-*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    # the server is gone: the command ends with one line after its retries, the finished shards kept
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and len(err.strip().splitlines()) == 1 and "teacher server" in err, err
    done = len(list(out.glob("shard-*.json")))
    assert 3 <= done < 10 and not (out / "manifest.json").exists()
    with llama_server(teacher[1], *F32_KV) as url:
        cmd[cmd.index("--server") + 1] = url
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{10 - done} shards written, {done} already done" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == len(TEXTS)
    got = CachedTeacher(out)
    assert sorted(got.ids()) == sorted(f"t{i}" for i in range(len(TEXTS)))  # none lost, none twice


def test_refusals_are_one_line(teacher, server, tiny_models):
    with pytest.raises(ConfigError, match="tokenizes the probe differently"):
        ServedTeacher.from_path(server, tiny_models["gpt2-bpe"], top_k=4)  # another tokenizer
    with pytest.raises(ServerError, match="no answer after 2 tries"):
        ServedTeacher.from_path("http://127.0.0.1:9", teacher[0], retries=1, backoff=0.01)
    with pytest.raises(ConfigError, match="temperature 2.0"):
        ServedTeacher.from_path(server, teacher[0], temperature=2.0)
    with pytest.raises(ConfigError, match="not an http"):
        ServedTeacher.from_path("localhost:8000", teacher[0])
    t = ServedTeacher.from_path(server, teacher[0], top_k=4, max_length=8)
    with pytest.raises(DataError, match="more than max_length 8"):
        t.signal([TEXTS[0]])


def test_a_model_that_does_not_know_the_probe_is_refused(teacher, tmp_path):
    """No reading fits when the served model cannot predict the probe: refused, never guessed."""
    tok = __import__("transformers").AutoTokenizer.from_pretrained(teacher[0])
    blank = save_pair(tiny_llama(len(tok), n_layer=1, hidden=32, n_head=4, intermediate=64, seed=9), tok,
                      tmp_path / "blank")
    gguf = export_gguf(blank, tmp_path / "blank.gguf", dtype="f32", progress=False)
    with llama_server(gguf) as url, pytest.raises(ServerError, match="no reading of its log-probs"):
        ServedTeacher.from_path(url, blank, top_k=4)


def test_a_server_without_logprobs_is_refused(teacher):
    with llama_server(teacher[1], "--logits_all", "false") as url, pytest.raises(ServerError, match="logprobs"):
        ServedTeacher.from_path(url, teacher[0], top_k=4, retries=0)


def test_exported_gguf_runs_in_llama_cpp_as_in_transformers(teacher):
    """The export's round trip through the real engine: llama.cpp tokenizes as the HF tokenizer and gives the
    same logits and greedy tokens as transformers on the original folder."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = teacher
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False, seed=0, type_k=0, type_v=0)
    for text in [TEXTS[1], PROBE, "Ünïcödé — “quotes” 123 4567\n\tend"]:
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.reset()
        llm.eval(ids)
        ours = torch.tensor(llm.scores[:len(ids)])
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max() < 1e-3
    prompt = tok(PROBE[:20])["input_ids"]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    llm.reset()
    got = list(itertools.islice(llm.generate(prompt, temp=0.0), 12))
    assert got == greedy


# --- recipes ------------------------------------------------------------------------------------------------


def _recipe(tiny_models, data_dir, out, teacher: dict) -> dict:
    return {"student": str(tiny_models["gpt2-bpe"]), "teachers": [teacher],
            "data": {"train": str(data_dir / "train.txt"), "seq_len": 64, "max_blocks": 6},
            "loss": {"ce_weight": 0.5}, "fusion": {"top_k": 4, "projection": "prefix"},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 3, "logging_steps": 1, "seed": 0,
                      "progress": False, "plot": False, "lr": 1e-3, "lr_scheduler": "constant"}}


def _losses(out) -> list[float]:
    return [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def test_a_recipe_trains_through_the_server_as_through_the_model_here(teacher, server, tiny_models, data_dir,
                                                                      tmp_path, nodrop_student):
    """teachers[].server: the same losses as the same teacher run in-process (llama.cpp's kernels aside)."""
    from stillroom.training.run import train

    runs = {}
    for name, spec in (("here", {"path": str(teacher[0])}),
                       ("served", {"path": str(teacher[0]), "server": server, "server_concurrency": 2})):
        raw = _recipe(tiny_models, data_dir, tmp_path / name, spec)
        raw["student"] = str(nodrop_student)
        train(raw)
        runs[name] = _losses(tmp_path / name)
    assert len(runs["here"]) == 2
    assert runs["served"] == pytest.approx(runs["here"], rel=1e-3)


def test_a_served_cache_is_read_with_its_tokenizer_only(teacher, server, tiny_models, data_dir, tmp_path):
    """A cache written through a server belongs to the server's teacher: the plan checks its tokenizer (the
    weights are not here) and refuses it for the model folder run here."""
    from stillroom.training.data import export_training_blocks
    from stillroom.training.plan import make_plan
    from stillroom.training.recipe import load_recipe

    tok_only = tmp_path / "tokenizer"
    __import__("transformers").AutoTokenizer.from_pretrained(teacher[0]).save_pretrained(tok_only)
    raw = _recipe(tiny_models, data_dir, tmp_path / "out", {"path": str(tok_only), "server": server})
    blocks = tmp_path / "blocks.jsonl"
    export_training_blocks(load_recipe(raw), blocks)
    write_cache(ServedTeacher.from_path(server, tok_only, top_k=4), blocks, tmp_path / "cache", progress=False)
    raw["teachers"][0]["cache"] = str(tmp_path / "cache")
    assert make_plan(load_recipe(raw)).teacher_tokenizers  # tokenizer folder only: no weights needed
    raw["teachers"][0] = {"path": str(teacher[0]), "cache": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="teachers.0.cache"):
        make_plan(load_recipe(raw))


@pytest.mark.parametrize(("teacher_spec", "match"), [
    ({"path": "t", "server_model": "m"}, "server_model set without server"),
    ({"path": "t", "server": "localhost:8000"}, "not an http"),
])
def test_server_keys_are_checked_in_the_recipe(tiny_models, data_dir, tmp_path, teacher_spec, match):
    from stillroom.training.recipe import load_recipe

    with pytest.raises(ConfigError, match=match):
        load_recipe(_recipe(tiny_models, data_dir, tmp_path, teacher_spec))


@pytest.mark.parametrize(("message", "fix"), [
    ("Only no echo is supported", "serve the teacher with llama_cpp.server"),  # llama.cpp's llama-server, verbatim
    ("logprobs must be at most 5", "lower --top-k / fusion.top_k (asked 10)"),  # k above the server's maximum
    ("model not found", None)])
def test_a_refusal_names_the_fix_a_user_can_apply(message, fix):
    from stillroom.teachers.served import _hint

    hint = _hint(message, 10)
    assert (fix in hint) if fix else hint == ""
