"""stillroom.training.runs, callbacks and report: guarded output folders, Ctrl-C and resume, the loss parts in
metrics.jsonl, like-with-like plots, the model card's front matter, and the generated results table of
docs/benchmarks.md (from the pages under docs/benchmarks/)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stillroom.errors import OutputExistsError
from stillroom.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SEQ = 48


def _raw(tiny_models, data_dir, out, **train) -> dict:
    return {"name": "runs-test", "student": str(tiny_models["gpt2-bpe"]),
            "teachers": [{"path": str(tiny_models["gpt2-bpe-teacher"])}],
            "data": {"train": str(data_dir / "train.txt"), "seq_len": SEQ, "max_blocks": 8},
            "train": {"output_dir": str(out), "max_steps": 2, "batch_size": 4, "logging_steps": 1,
                      "progress": False, "plot": False, "lr": 1e-3, "lr_scheduler": "constant", **train}}


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha256, mtime_ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _foreign(folder: Path) -> Path:
    """A folder another run left: a model, a card, metrics and a checkpoint (no stillroom_run.json)."""
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "README.md").write_text("# someone else's model\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    os.chmod(folder / "model.safetensors", 0o644)
    return folder


# --- the output folder --------------------------------------------------------------------------------------


def test_a_foreign_output_dir_is_refused_and_left_byte_identical(tiny_models, data_dir, tmp_path):
    from stillroom.training.data import export_training_blocks
    from stillroom.training.run import train

    out = _foreign(tmp_path / "other-run")
    before = _snapshot(out)
    with pytest.raises(OutputExistsError, match=r"train.output_dir: .*other-run is not empty.*--overwrite"):
        train(load_recipe(_raw(tiny_models, data_dir, out)))
    with pytest.raises(OutputExistsError, match=r"train.resume: .*holds no stillroom_run.json"):
        train(load_recipe(_raw(tiny_models, data_dir, out, resume=True)))
    assert _snapshot(out) == before
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    # --export-blocks onto an existing file
    with pytest.raises(OutputExistsError, match=r"--export-blocks .*README.md already exists"):
        export_training_blocks(load_recipe(_raw(tiny_models, data_dir, out)), out / "README.md")
    assert _snapshot(out) == before


def test_resume_refuses_a_folder_written_by_another_recipe(tiny_models, data_dir, tmp_path):
    from stillroom.training.run import train
    from stillroom.training.runs import write_marker

    out = tmp_path / "run"
    write_marker(out, load_recipe(_raw(tiny_models, data_dir, out), ["loss.ce_weight=0.5"]))
    (out / "checkpoint-1").mkdir()
    before = _snapshot(out)
    with pytest.raises(OutputExistsError, match=r"another recipe \(loss.ce_weight differ\)"):
        train(load_recipe(_raw(tiny_models, data_dir, out, resume=True)))
    assert _snapshot(out) == before


def test_overwrite_replaces_a_foreign_run(tiny_models, data_dir, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    out = _foreign(tmp_path / "other-run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tiny_models, data_dir, out)))
    res = CliRunner().invoke(app, ["train", str(recipe)])
    assert res.exit_code == 2 and "is not empty" in res.output
    res = CliRunner().invoke(app, ["train", str(recipe), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "checkpoint-5").exists()  # the other run's state is gone, not resumed
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # this run only: two loss records and the final summary
    assert "# runs-test" in (out / "README.md").read_text()
    marker = json.loads((out / "stillroom_run.json").read_text())
    assert marker["finished"] and marker["step"] == 2


def test_resuming_a_finished_run_trains_nothing_and_changes_no_file(tiny_models, data_dir, tmp_path):
    from stillroom.training.run import train

    out = tmp_path / "run"
    first = train(load_recipe(_raw(tiny_models, data_dir, out, save_steps=1)))
    assert first.model is not None
    before = _snapshot(out)
    again = train(load_recipe(_raw(tiny_models, data_dir, out, save_steps=1, resume=True)))
    assert again.model is None  # no trainer ran
    assert _snapshot(out) == before
    assert again.metrics == pytest.approx(first.metrics)
    assert [h["step"] for h in again.history if "loss" in h] == [1, 2]


def test_final_evaluation_is_computed_and_logged_once(tiny_models, data_dir, tmp_path):
    from stillroom.training.run import train

    raw = _raw(tiny_models, data_dir, tmp_path / "run", eval_steps=2, eval_max_blocks=2)
    raw["data"]["eval"] = str(data_dir / "val.txt")
    r = train(load_recipe(raw))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_bpb" in x]
    assert [x["step"] for x in evals] == [2]
    assert r.metrics["eval_bpb"] == evals[0]["eval_bpb"]


# --- Ctrl-C and resume --------------------------------------------------------------------------------------


def test_ctrl_c_says_where_it_stopped_and_resume_keeps_one_record_per_step(tiny_models, data_dir, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    # many steps, so a test process descheduled for a while on a loaded machine cannot see the run finish first
    raw = _raw(tiny_models, data_dir, out, max_steps=200, save_steps=3, batch_size=2, progress=True)
    raw["data"]["max_blocks"] = 80
    recipe.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "stillroom", "train", str(recipe)]
    with (tmp_path / "out1").open("w") as so, (tmp_path / "err1").open("w") as se:
        # SIGINT back to its default in the child: a test run started in the background (`make test &`) has it
        # ignored, the child would inherit that, and Python then installs no KeyboardInterrupt handler
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=tmp_path,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            done = (out / "checkpoint-3" / "trainer_state.json").exists() and (out / "metrics.jsonl").exists()
            if done and max(json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    err = (tmp_path / "err1").read_text()
    assert rc == 130, err[-2000:]
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1, err[-2000:]
    m = re.fullmatch(r"interrupted at step (\d+); last checkpoint (\d+); rerun with train\.resume=true", said[0])
    assert m, said
    step, ckpt = int(m.group(1)), int(m.group(2))
    assert step >= 5 and ckpt % 3 == 0 and 3 <= ckpt <= step
    assert (out / f"checkpoint-{ckpt}" / "trainer_state.json").exists()

    res = subprocess.run(cmd + ["train.resume=true"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "missing keys" not in res.stderr + res.stdout  # the tied lm_head is not news
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 201))
    assert all(math.isfinite(x["ce"]) and math.isfinite(x["kd"]) for x in lines if "loss" in x)
    # progress lines carry elapsed time, with no terminal no blank lines
    assert re.search(r"train step 200/200 .*elapsed \d+:\d\d:\d\d", res.stdout), res.stdout[-1500:]
    assert "\n\n" not in res.stdout


# --- the loss parts -----------------------------------------------------------------------------------------


def test_ce_and_kd_parts_match_a_hand_computation_and_add_up_to_the_loss(tiny_models, nodrop_student, data_dir,
                                                                         tmp_path):
    """One step on all 4 blocks: the logged ce is the initial student's CE (dense logits, by hand), kd the
    KL(teacher top-10 + tail ‖ student) by hand, and λ·ce + (1−λ)·kd the logged loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillroom.inputs.blocks import BlockCollator, BlockDataset, make_blocks
    from stillroom.inputs.text import load_texts
    from stillroom.training.run import train

    raw = _raw(tiny_models, data_dir, tmp_path / "run", max_steps=2)
    raw["student"] = str(nodrop_student)
    raw["data"]["max_blocks"] = 4
    raw["loss"] = {"ce_weight": 0.3}
    r = train(load_recipe(raw))
    logged = {h["step"]: h for h in r.history if "loss" in h}
    for h in logged.values():
        assert 0.3 * h["ce"] + 0.7 * h["kd"] == pytest.approx(h["loss"], rel=1e-5)

    tok = AutoTokenizer.from_pretrained(nodrop_student)
    blocks = make_blocks(load_texts(data_dir / "train.txt"), tok, SEQ)[:4]
    batch = BlockCollator(tok, SEQ)([BlockDataset(blocks)[i] for i in range(4)])
    student = AutoModelForCausalLM.from_pretrained(nodrop_student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe-teacher"]).eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    ces, kls = [], []
    for b in range(4):
        for j in range(SEQ - 1):
            y = int(batch["labels"][b, j + 1])
            if y == -100:
                continue
            ces.append(-s[b, j, y].item())
            top = t[b, j].topk(10)
            p, q_top = top.values.exp(), s[b, j, top.indices].exp()
            kl = (p * (top.values - q_top.log())).sum() + (1 - p.sum()) * ((1 - p.sum()).log() - (1 - q_top.sum()).log())
            kls.append(kl.item())
    assert logged[1]["ce"] == pytest.approx(sum(ces) / len(ces), rel=1e-4)
    assert logged[1]["kd"] == pytest.approx(sum(kls) / len(kls), rel=1e-3, abs=1e-5)


# --- plots --------------------------------------------------------------------------------------------------


def test_plots_draw_like_with_like():
    from stillroom.training.report import compare_panels, loss_panels

    fused = [{"step": 1, "loss": 1.2, "ce": 5.0, "kd": 0.4}, {"step": 2, "loss": 1.0, "ce": 4.5, "kd": 0.3},
             {"step": 2, "eval_loss": 4.6, "eval_bpb": 1.9}, {"step": 2, "train_runtime": 3.0}]
    plain = [{"step": 1, "loss": 5.1, "ce": 5.1}, {"step": 2, "loss": 4.6, "ce": 4.6},
             {"step": 2, "eval_loss": 4.7, "eval_bpb": 1.95}]
    one = loss_panels(fused)
    assert one == {"cross-entropy (nats/token)": {"train CE": ([1, 2], [5.0, 4.5]), "held-out CE": ([2], [4.6])},
                   "distillation term D (nats/token)": {"train D": ([1, 2], [0.4, 0.3])},
                   "held-out bits per byte": {"held-out": ([2], [1.9])}}
    both = compare_panels({"fused": fused, "CE-only": plain})
    assert both == {"training CE (nats/token)": {"fused": ([1, 2], [5.0, 4.5]), "CE-only": ([1, 2], [5.1, 4.6])},
                    "held-out bits per byte": {"fused": ([2], [1.9]), "CE-only": ([2], [1.95])}}
    # the total objective (λ·CE + (1−λ)·D) is on no axis
    drawn = [v for panel in both.values() for x, ys in panel.values() for v in ys]
    assert 1.2 not in drawn and 1.0 not in drawn


def test_alm_and_uld_terms_get_a_panel_each_one_series_per_teacher():
    from stillroom.training.report import loss_panels

    hist = [{"step": 1, "loss": 2.0, "ce": 3.0, "alm/gemma": 0.7, "alm/llama": 0.9, "uld/qwen": 0.2},
            {"step": 2, "loss": 1.8, "ce": 2.8, "alm/gemma": 0.6, "alm/llama": 0.8, "uld/qwen": 0.15}]
    panels = loss_panels(hist)
    assert panels["ALM term (per token)"] == {"gemma": ([1, 2], [0.7, 0.6]), "llama": ([1, 2], [0.9, 0.8])}
    assert panels["ULD term (per token)"] == {"qwen": ([1, 2], [0.2, 0.15])}
    assert "distillation term D (nats/token)" not in panels  # no kd teacher, no empty panel


# --- model card ---------------------------------------------------------------------------------------------


def test_model_card_front_matter(tiny_models, data_dir, tmp_path):
    import shutil

    from stillroom.training.report import model_card

    student = tmp_path / "student"
    shutil.copytree(tiny_models["gpt2-bpe"], student)
    (student / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# a student\n")
    raw = _raw(tiny_models, data_dir, tmp_path / "o")
    raw["student"] = str(student)
    card = model_card(load_recipe(raw), {"eval_bpb": 1.5}, 8)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == str(student)
    assert meta["datasets"] == [str(data_dir / "train.txt")]
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    scratch = model_card(load_recipe({**raw, "student": {"tokenizer": str(student),
                                                         "config": {"model_type": "gpt2", "n_layer": 1}}}), {}, 8)
    meta = yaml.safe_load(scratch.split("---")[1])
    assert "base_model" not in meta  # a student built from scratch has no base model


# --- docs/benchmarks.md and docs/benchmarks/ -----------------------------------------------------------------


def test_benchmarks_results_table_is_generated_from_its_sections():
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_table", ROOT / "scripts" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pages = mod.load_pages()  # exactly the pages the script lists
    assert sorted(pages) == sorted(p.stem for p in (ROOT / "docs" / "benchmarks").glob("*.md"))
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert mod.rewrite(text, pages) == text, "run: python scripts/results_table.py"
    assert not re.search(r"^#+ .*\(`bench/", text, flags=re.M)  # the short page holds no benchmark section
    rows = mod.results_rows(pages)
    sections = [(page, name) for page in mod.PAGES
                for name in re.findall(r"^## .*\(`bench/(\w+)\.py`\)$", pages[page], flags=re.M)]
    assert [r["benchmark"] for r in rows] == [name for _, name in sections] and len(rows) >= 5
    assert all(page == name for page, name in sections)  # every section sits on its benchmark's page
    for page, body in pages.items():  # every page ends with its earlier runs
        assert re.findall(r"^## .*$", body, flags=re.M)[-1] == "## History", page
    for r, (_, link, body) in zip(rows, mod.sections(pages), strict=True):
        # the link names a heading of its page
        file, anchor = link.split("#")
        headings = re.findall(r"^#+ (.*)$", (ROOT / "docs" / file).read_text(encoding="utf-8"), flags=re.M)
        assert anchor in {mod.anchor(h) for h in headings}, link
        # every number of the headline is one the section measured (it appears outside the headline line too,
        # and above the page's History)
        assert "## History" not in body
        rest = "\n".join(line for line in body.splitlines() if not line.startswith("Headline:"))
        numbers = re.findall(r"\d[\d,]*(?:\.\d+)?", r["median"] + " " + r["ratio"].split()[0])
        assert numbers and all(n in rest for n in numbers), (r["benchmark"], numbers)
        assert r["command"] in body
    # a stale table is detected and rewritten
    stale = text.replace(rows[0]["median"] + " |", "0 / 0 |", 1)
    assert stale != text and mod.rewrite(stale, pages) == text


# --- progress -----------------------------------------------------------------------------------------------


def test_progress_on_a_terminal_shows_elapsed_time_nests_evaluation_and_restores_the_cursor():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from stillroom.progress import phase
    from stillroom.training.callbacks import RichProgressCallback

    buf = io.StringIO()
    cb = RichProgressCallback(Console(file=buf, force_terminal=True, width=150))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=4, global_step=0)
    cb.on_train_begin(None, state, None)
    state.global_step = 2
    cb.on_step_end(None, state, None)
    cb.on_log(None, state, None, logs={"loss": 1.5, "ce": 2.0, "kd": 0.5})
    with phase("evaluation", 3, progress=cb.progress, console=cb.console) as advance:  # a task on the live bar
        for _ in range(3):
            advance()
        cb.progress.refresh()
    cb.on_train_end(None, state, None)
    text = buf.getvalue()
    assert "\x1b[?25l" in text and text.rstrip().endswith("\x1b[?25h")  # cursor hidden while live, shown after
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert re.search(r"train .*2/4 0:00:0\d eta", plain) and "ce=2 kd=0.5" in plain  # elapsed, then remaining
    assert re.search(r"evaluation .*3/3", plain)


def test_progress_without_a_terminal_prints_one_line_per_phase():
    import io

    from rich.console import Console

    from stillroom.progress import phase

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=40)
    with phase("loading the student and teachers, a long title", console=console):
        pass
    with phase("hidden", enabled=False, console=console):
        pass
    assert re.fullmatch(r"loading the student and teachers, a long title: done in \d+\.\d s\n", buf.getvalue())
