"""Every verb, fed each class of bad input, fails the same way: exit status != 0, exactly one line on stderr
that names the thing (file, option, key) and what to do, nothing on stdout, no traceback, and no file the user
had changed (nor any new file left behind).

Bad input classes: missing path, empty file, binary file, bad number, conflicting options, incomplete model
folder (weights but no tokenizer, config + tokenizer but no weights, corrupt model.safetensors) and existing
output that stillroom did not write. Runs in-process through typer's CliRunner (the same group class the
``stillroom`` script uses) and, for a few cases, as real ``python -m stillroom`` subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from stillroom.cli import app

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _snapshot(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file under ``roots`` (and every folder, as 'dir'): any change shows."""
    snap = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            snap[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


@pytest.fixture(scope="module")
def tree(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A user's folder: good models and data, incomplete model folders, bad data, files stillroom must not touch."""
    root = tmp_path_factory.mktemp("user")
    good = tiny_models["gpt2-bpe"]
    t = {"root": root, "model": good, "teacher": tiny_models["gpt2-bpe-teacher"], "missing": root / "absent"}
    no_tok = root / "no-tokenizer"  # config + weights: transformers 5 would build a one-token tokenizer
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(good / f, no_tok / f)
    no_w = root / "no-weights"  # config + tokenizer
    no_w.mkdir()
    for f in ("config.json", *TOKENIZER_FILES):
        if (good / f).exists():
            shutil.copy(good / f, no_w / f)
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01 not safetensors " * 64)
    t.update(no_tok=no_tok, no_weights=no_w, corrupt=corrupt)
    (root / "good.txt").write_text("To be, or not to be, that is the question.\nWhether 'tis nobler in the mind.\n")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)  # byte 0x0a ends line 1, so 0x80 is on line 2
    (root / "latin1.txt").write_bytes("fine\ncaf\xe9 au lait\n".encode("latin-1"))
    (root / "no-field.jsonl").write_text('{"body": "the text is under another key"}\n')
    (root / "user.safetensors").write_bytes(b"my own file, not a vocabulary map")
    (root / "user.jsonl").write_text('{"mine": 1}\n')
    (root / "prompts.jsonl").write_text('{"prompt": "To be"}\n')
    (root / "user-folder").mkdir()
    (root / "user-folder" / "notes.txt").write_text("my notes\n")
    (root / "empty-folder").mkdir()
    (root / "not-yaml.yaml").write_text("student: [unclosed\n  data: {\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01" * 16)
    recipe = {"student": str(good), "teachers": [{"path": str(t["teacher"])}],
              "data": {"train": str(root / "good.txt"), "seq_len": 16},
              "loss": {"ce_weight": 0.5}, "train": {"output_dir": str(root / "run"), "max_steps": 1}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    # a finished cache of the teacher over good.txt (not the training blocks): for rerun/mismatch cases
    r = CliRunner().invoke(app, ["cache", "--teacher", str(t["teacher"]), "--data", str(root / "good.txt"),
                                 "--out", str(root / "cache"), "--top-k", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    return t


def _cases(t: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(case id, argv, a piece of the one stderr line) for every verb and bad-input class that applies."""
    root, m, tch, miss = t["root"], str(t["model"]), str(t["teacher"]), str(t["missing"])
    good, empty, binary = str(root / "good.txt"), str(root / "empty.txt"), str(root / "binary.txt")
    recipe, out = str(root / "recipe.yaml"), str(root / "new-out")
    no_tok, no_w, corrupt = str(t["no_tok"]), str(t["no_weights"]), str(t["corrupt"])
    cache = ["cache", "--teacher", tch, "--data", good, "--out", out, "--no-progress"]
    ev = ["eval", "--model", m, "--data", good]
    gen = ["generate", "--model", m, "--prompt", "To be"]
    prompts = str(root / "prompts.jsonl")
    gd = ["generate", "--model", m, "--data", prompts, "--out", str(root / "new-out.jsonl"), "--no-progress"]
    vm = ["vocab-map", "--source", m, "--target", tch, "--out", str(root / "new.safetensors")]
    al = ["align", "--source", m, "--target", tch]
    cases = [
        # demo: validated before stage 1
        ("demo-missing-teacher", ["demo", "--teacher", miss, "--out", out], "--teacher"),
        ("demo-teacher-no-tokenizer", ["demo", "--teacher", no_tok, "--out", out], "no tokenizer files"),
        ("demo-teacher-no-weights", ["demo", "--teacher", no_w, "--out", out], "no model.safetensors"),
        ("demo-bad-method", ["demo", "--fusion-method", "max", "--out", out], "--fusion-method 'max'"),
        ("demo-bad-projection", ["demo", "--projection", "none", "--out", out], "--projection 'none'"),
        ("demo-bad-number", ["demo", "--steps", "0", "--out", out], "--steps"),
        ("demo-empty-data", ["demo", "--train", empty, "--out", out], "empty.txt holds no examples"),
        ("demo-binary-data", ["demo", "--test", binary, "--out", out], "binary.txt: line 2 is not UTF-8 (byte 0x80)"),
        ("demo-missing-data", ["demo", "--validation", miss, "--out", out], "absent does not exist"),
        # cache: options, output and data are checked before the teacher loads
        ("cache-missing-data", [*cache[:4], miss, *cache[5:]], "absent does not exist"),
        ("cache-empty-data", [*cache[:4], empty, *cache[5:]], "holds no examples"),
        ("cache-binary-data", [*cache[:4], binary, *cache[5:]], "binary.txt: line 2 is not UTF-8 (byte 0x80)"),
        ("cache-latin1-data", [*cache[:4], str(root / "latin1.txt"), *cache[5:]],
         "latin1.txt: line 2 is not UTF-8 (byte 0xe9); DATA must be UTF-8"),
        ("cache-no-text-field", [*cache[:4], str(root / "no-field.jsonl"), *cache[5:]],
         "data.text_field=NAME"),
        ("cache-top-k-0", [*cache, "--top-k", "0"], "--top-k"),
        ("cache-top-k-huge", [*cache, "--top-k", "100000"], "--top-k"),
        ("cache-temperature-0", [*cache, "--temperature", "0"], "--temperature must be > 0, got 0.0"),
        ("cache-shard-size-0", [*cache, "--shard-size", "0"], "--shard-size"),
        ("cache-max-length-1", [*cache, "--max-length", "1"], "--max-length must be >= 2, got 1"),
        ("cache-max-length-huge", [*cache, "--max-length", "100000"], "exceeds the teacher's context"),
        ("cache-batch-tokens-0", [*cache, "--batch-tokens", "0"], "--batch-tokens must be > 0"),
        ("cache-bad-dtype", [*cache, "--dtype", "fp8"], "--dtype 'fp8'"),
        ("cache-missing-out", cache[:5], "--out required"),
        ("cache-out-is-file", [*cache[:6], str(root / "good.txt"), *cache[7:]], "is an existing file"),
        ("cache-out-user-folder", [*cache[:6], str(root / "user-folder"), *cache[7:]], "did not write"),
        ("cache-rerun-other-settings", [*cache[:6], str(root / "cache"), *cache[7:], "--top-k", "8"],
         "built with different settings"),
        ("cache-missing-teacher", [cache[0], "--teacher", miss, *cache[3:]], "--teacher"),
        ("cache-teacher-no-tokenizer", [cache[0], "--teacher", no_tok, *cache[3:]], "no tokenizer files"),
        ("cache-teacher-no-weights", [cache[0], "--teacher", no_w, *cache[3:]], "no model.safetensors"),
        ("cache-teacher-corrupt", [cache[0], "--teacher", corrupt, *cache[3:]], "the model does not load"),
        ("cache-verify-and-teacher", ["cache", "--verify", str(root / "cache"), "--teacher", tch], "alone"),
        ("cache-verify-missing", ["cache", "--verify", miss], "absent is not a stillroom cache"),
        ("cache-verify-not-a-cache", ["cache", "--verify", str(root / "empty-folder")], "not a stillroom cache"),
        # train and train --check: the same validation, before the training stack is imported
        ("train-missing-recipe", ["train", miss], "absent does not exist"),
        ("train-not-yaml", ["train", str(root / "not-yaml.yaml")], "is not valid YAML (line"),
        ("train-binary-recipe", ["train", str(root / "binary.yaml")], "not UTF-8"),
        ("train-empty-data", ["train", recipe, f"data.train={empty}"], "holds no examples"),
        ("train-binary-data", ["train", recipe, f"data.train={binary}"], "binary.txt: line 2 is not UTF-8 (byte 0x80)"),
        ("train-no-field-data", ["train", "--check", recipe, f"data.train={root / 'no-field.jsonl'}"],
         "no 'text' field"),
        ("train-missing-data", ["train", "--check", recipe, f"data.train={miss}"], "data.train"),
        ("train-lr", ["train", "--check", recipe, "train.lr=-1"], "train.lr: got -1"),
        ("train-ce-weight", ["train", "--check", recipe, "loss.ce_weight=2"], "loss.ce_weight: got 2"),
        ("train-max-steps-bool", ["train", "--check", recipe, "train.max_steps=true"], "train.max_steps: got True"),
        ("train-unknown-key", ["train", "--check", recipe, "train.stpes=3"], "train.stpes: unknown key"),
        ("train-seq-len-over-context", ["train", "--check", recipe, "data.seq_len=4096"],
         "data.seq_len: got 4096, but the student's context is 512"),
        ("train-report-to-nonsense", ["train", "--check", recipe, "train.report_to=[tensorbored]"],
         "train.report_to"),
        ("train-teacher-no-tokenizer", ["train", "--check", recipe, f"teachers.0.path={no_tok}"],
         "teachers.0.path"),
        ("train-teacher-no-weights", ["train", "--check", recipe, f"teachers.0.path={no_w}"],
         "no model.safetensors"),
        ("train-student-missing", ["train", "--check", recipe, f"student={miss}"], "student"),
        ("train-student-no-tokenizer", ["train", "--check", recipe, f"student={no_tok}"], "no tokenizer files"),
        ("train-cache-other-data", ["train", "--check", recipe, f"teachers.0.cache={root / 'cache'}"],
         "built over other texts"),
        ("train-check-and-export", ["train", "--check", recipe, "--export-blocks", out], "give one of them"),
        ("train-export-onto-user-file", ["train", recipe, "--export-blocks", str(root / "user.jsonl")],
         "user.jsonl already exists"),
        # generate
        ("generate-missing-model", [gen[0], "--model", miss, *gen[3:]], "--model"),
        ("generate-no-tokenizer", [gen[0], "--model", no_tok, *gen[3:]], "no tokenizer files"),
        ("generate-no-weights", [gen[0], "--model", no_w, *gen[3:]], "no model.safetensors"),
        ("generate-corrupt", [gen[0], "--model", corrupt, *gen[3:]], "the model does not load"),
        ("generate-bad-number", [*gen, "--max-new-tokens", "0"], "--max-new-tokens"),
        ("generate-empty-prompt", [*gen[:3], "--prompt", ""], "--prompt is empty"),
        ("generate-missing-option", gen[:3], "--prompt"),
        ("generate-prompt-and-data", [*gen, "--data", prompts], "exactly one of --prompt"),
        ("generate-data-without-out", [*gen[:3], "--data", prompts], "--data needs --out"),
        ("generate-batch-option-with-prompt", [*gen, "--batch-size", "4"], "--batch-size is for batch mode"),
        ("generate-heal-with-data", [*gd, "--no-heal"], "applies to --prompt only"),
        ("generate-temperature-greedy", [*gd, "--temperature", "0.5"], "only with --sample"),
        ("generate-top-p-out-of-range", [*gd, "--sample", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        ("generate-data-missing", [*gd[:3], "--data", miss, *gd[5:]], "absent does not exist"),
        ("generate-data-not-jsonl", [*gd[:3], "--data", good, *gd[5:]], "must be a .jsonl file"),
        ("generate-data-bad-record", [*gd[:3], "--data", str(root / "user.jsonl"), *gd[5:]],
         "user.jsonl:1: record has no 'prompt' or 'messages' field"),
        ("generate-out-user-file", [*gd[:5], "--out", str(root / "user.jsonl")], "stillroom did not write it"),
        # eval: zero tokens scored is an error, never a result
        ("eval-missing-model", [ev[0], "--model", miss, *ev[3:]], "--model"),
        ("eval-no-tokenizer", [ev[0], "--model", no_tok, *ev[3:]], "no tokenizer files"),
        ("eval-no-weights", [ev[0], "--model", no_w, *ev[3:]], "no model.safetensors"),
        ("eval-corrupt", [ev[0], "--model", corrupt, *ev[3:]], "the model does not load"),
        ("eval-teacher-no-tokenizer", [*ev, "--teacher", no_tok], "--teacher"),
        ("eval-missing-data", [*ev[:4], miss], "absent does not exist"),
        ("eval-empty-data", [*ev[:4], empty], "holds no examples"),
        ("eval-binary-data", [*ev[:4], binary], "binary.txt: line 2 is not UTF-8 (byte 0x80)"),
        ("eval-context-1", [*ev, "--context", "1"], "--context"),
        ("eval-context-huge", [*ev, "--context", "100000"], "--context) must be in [2, 512]"),
        ("eval-stride-0", [*ev, "--stride", "0"], "--stride"),
        ("eval-stride-over-context", [*ev, "--context", "64", "--stride", "64"], "--stride 64 must be below"),
        ("eval-batch-size-0", [*ev, "--batch-size", "0"], "--batch-size"),
        ("eval-bad-device", [*ev, "--device", "gpu7"], "--device 'gpu7'"),
        # vocab-map
        ("vocab-map-missing-source", [vm[0], "--source", miss, *vm[3:]], "--source"),
        ("vocab-map-empty-tokenizer-folder", [vm[0], "--source", str(root / "empty-folder"), *vm[3:]],
         "no tokenizer files"),
        ("vocab-map-out-user-file", [*vm[:5], "--out", str(root / "user.safetensors")], "already exists"),
        ("vocab-map-out-folder", [*vm[:5], "--out", str(root / "user-folder")], "is an existing folder"),
        # align
        ("align-binary-file", [*al, "--file", binary], "binary.txt"),
        ("align-latin1-file", [*al, "--file", str(root / "latin1.txt")], "is not UTF-8"),
        ("align-missing-file", [*al, "--file", miss], "absent does not exist"),
        ("align-text-and-file", [*al, "--text", "x", "--file", good], "exactly one of --text or --file"),
        ("align-neither", al, "exactly one of --text or --file"),
        ("align-bad-mode", [*al, "--text", "x", "--mode", "fuzzy"], "--mode 'fuzzy'"),
        ("align-source-no-tokenizer", ["align", "--source", str(root / "empty-folder"), "--target", tch,
                                       "--text", "x"], "no tokenizer files"),
    ]
    if not torch.cuda.is_available():
        cases += [("cache-cuda-absent", [*cache, "--device", "cuda"], "no usable CUDA GPU"),
                  ("eval-cuda-absent", [*ev, "--device", "cuda"], "no usable CUDA GPU")]
    return cases


CASE_IDS = [c[0] for c in _cases({k: Path("/x") for k in ("root", "model", "teacher", "missing", "no_tok",
                                                          "no_weights", "corrupt")})]


@pytest.mark.parametrize("case", CASE_IDS)
def test_every_verb_fails_with_one_clear_line(case, tree, tiny_models):
    _, argv, expected = next(c for c in _cases(tree) if c[0] == case)
    before = _snapshot(tree["root"], *tiny_models.values())
    r = CliRunner().invoke(app, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert _snapshot(tree["root"], *tiny_models.values()) == before  # nothing changed, nothing half-written


def test_every_verb_is_covered():
    verbs = {c.split("-")[0] for c in CASE_IDS} | {"vocab-map" for c in CASE_IDS if c.startswith("vocab-map")}
    assert {"demo", "cache", "train", "generate", "eval", "vocab", "align"} <= verbs
    assert any(c.startswith("cache-verify") for c in CASE_IDS) and any("check" in c for c in CASE_IDS)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.parametrize("case", ["cache-missing-data", "train-not-yaml", "eval-no-tokenizer", "cache-top-k-0"])
def test_entry_point_prints_one_line_and_no_traceback(case, tree):
    """The real ``python -m stillroom`` process: same one line, exit status 2, empty stdout."""
    _, argv, expected = next(c for c in _cases(tree) if c[0] == case)
    r = subprocess.run([sys.executable, "-m", "stillroom", *argv], env=_env(), capture_output=True, text=True,
                       cwd=tree["root"], timeout=120)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and expected in r.stderr, r.stderr


def test_error_line_is_not_wrapped(tree):
    """A long message stays one line (Rich would wrap it at 80 columns in a narrow terminal)."""
    deep = tree["root"] / ("a-rather-long-folder-name-" * 6) / "absent.txt"
    r = CliRunner().invoke(app, ["eval", "--model", str(tree["model"]), "--data", str(deep)], env={"COLUMNS": "40"})
    assert r.stderr.count("\n") == 1 and str(deep) in r.stderr


def test_version_and_help_import_no_torch():
    code = ("import sys, stillroom.cli; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(stillroom.cli.app, ['--version']); "
            "print(r.exit_code, r.stdout.strip(), 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    from stillroom import __version__

    assert r.stdout.split() == ["0", "stillroom", __version__, "False", "False"], r.stdout + r.stderr


def test_ours_is_replaced_but_not_yours(tree, tiny_models, tmp_path):
    """vocab-map replaces a map it wrote for the same pair (and --overwrite anything); export-blocks likewise."""
    out = tmp_path / "map.safetensors"
    argv = ["vocab-map", "--source", str(tree["model"]), "--target", str(tree["teacher"]), "--out", str(out), "--json"]
    from stillroom.tokenization.vocab import VocabMap

    assert CliRunner().invoke(app, argv).exit_code == 0
    first = VocabMap.load(out)
    out.write_bytes(out.read_bytes())  # a fresh inode: the rebuild below must replace it, not fail
    r = CliRunner().invoke(app, argv)  # ours: rebuilt in place
    assert r.exit_code == 0 and (VocabMap.load(out).mapping == first.mapping).all()
    assert out.stat().st_mode & 0o777 == 0o644 & ~_umask()  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["map.safetensors"]  # no temporary file left
    other = ["vocab-map", "--source", str(tiny_models["llama-spm"]), "--target", str(tree["model"]), "--out", str(out)]
    kept = out.read_bytes()
    r = CliRunner().invoke(app, other)  # a map for another pair is not replaced silently
    assert r.exit_code == 2 and "--overwrite" in r.stderr and out.read_bytes() == kept
    assert CliRunner().invoke(app, [*other, "--overwrite", "--json"]).exit_code == 0
    assert VocabMap.load(out).src_hash != first.src_hash
    blocks = tmp_path / "blocks.jsonl"
    recipe = str(tree["root"] / "recipe.yaml")
    for _ in range(2):  # the second export replaces the first (ours)
        r = CliRunner().invoke(app, ["train", recipe, "--export-blocks", str(blocks)])
        assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in blocks.read_text().splitlines()]
    assert rows and all(sorted(x) == ["id", "text"] for x in rows)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
