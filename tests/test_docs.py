"""The docs stay true: every CLI verb has a current reference page, and every documented example runs.

Python examples (```python blocks) run as written, block after block in one namespace per page, in a
temporary working folder.

Commands are the lines starting with ``stillroom`` in ```bash blocks of README.md and docs/ (backslash
continuations joined). They run in order, one temporary working folder per page (with ``stillroom/`` and
``recipes/`` linked in, so shipped paths resolve), and with the documented variables ($TEACHER_A,
$TEACHER_B, $STUDENT, $DATA, $HELDOUT, the real models' $SMOL and $GEMMA, a served teacher's $TEACHER_GGUF
and its $SERVER, a real llama.cpp server) pointing at tiny fixtures. Each command runs as written except
for its length: training and demo commands get options appended that cut them to a few steps (a repeated
option's last value wins).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stillroom.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "cli").glob("*.md"))]
SHORTEN = {
    "train": ["train.max_steps=2", "data.max_blocks=8", "data.eval=null", "train.save_steps=null"],
    "demo": ["--steps", "2", "--max-blocks", "8", "--eval-chars", "800"],
}


def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def commands(page: Path) -> list[str]:
    """The ``stillroom ...`` command lines of a page's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [line.strip() for line in joined.splitlines() if line.strip().startswith("stillroom ")]
    return out


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def _workdir(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "stillroom").symlink_to(ROOT / "stillroom")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_python_runs(page, tmp_path, monkeypatch):
    _workdir(tmp_path, monkeypatch)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        exec(compile(block, f"{page.name}:python", "exec"), namespace)


def test_every_verb_has_a_current_reference_page():
    import typer

    gen = _gen_cli_docs()
    verbs = set(typer.main.get_command(app).commands)
    pages = {p.stem for p in (ROOT / "docs" / "cli").glob("*.md")}
    assert verbs == pages, f"docs/cli pages {sorted(pages)} vs verbs {sorted(verbs)}"
    for verb in verbs:
        page = (ROOT / "docs" / "cli" / f"{verb}.md").read_text(encoding="utf-8")
        assert gen.render(page, verb) == page, f"docs/cli/{verb}.md is stale: run scripts/gen_cli_docs.py"
        assert commands(ROOT / "docs" / "cli" / f"{verb}.md"), f"docs/cli/{verb}.md shows no example"


def test_docs_only_name_existing_verbs():
    import typer

    verbs = set(typer.main.get_command(app).commands)
    for page in PAGES:
        for cmd in commands(page):
            assert cmd.split()[1] in verbs | {"--version", "--help"}, f"{page.name}: {cmd}"


@pytest.fixture(scope="module")
def doc_env(tiny_models, tmp_path_factory, probe_teacher):
    data = tmp_path_factory.mktemp("doc-data")
    from stillroom.testing import corpus_texts

    lines = [ln for ln in corpus_texts("train")[0].splitlines() if len(ln.strip()) > 20]
    (data / "train.txt").write_text("\n".join(lines[:120]) + "\n", encoding="utf-8")
    held = [ln for ln in corpus_texts("test")[0].splitlines() if len(ln.strip()) > 20]
    (data / "heldout.txt").write_text("\n".join(held[:15]) + "\n", encoding="utf-8")
    # stand-ins for the tutorial's real models: $SMOL a 30-layer byte-level-BPE Llama (layers [0, 6, ..., 29]
    # can be cut from it), $GEMMA a model of another tokenizer family (SentencePiece-style)
    from transformers import AutoTokenizer

    from stillroom.testing import save_pair, tiny_llama

    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2-bpe-teacher"])
    smol = save_pair(tiny_llama(len(tok), n_layer=30, hidden=32, n_head=2, intermediate=64), tok, data / "smol")
    from stillroom.testing import llama_server

    with llama_server(probe_teacher[1]) as url:  # $SERVER: a real llama.cpp server running $TEACHER_GGUF
        yield {"SERVER": url, "TEACHER_GGUF": str(probe_teacher[1]), **_env(tiny_models, data, smol)}


def _env(tiny_models, data, smol) -> dict[str, str]:
    return {"SMOL": str(smol), "GEMMA": str(tiny_models["llama-spm"]),
            "TEACHER_A": str(tiny_models["gpt2-bpe-teacher"]), "TEACHER_B": str(tiny_models["llama-spm"]),
            "STUDENT": str(tiny_models["gpt2-bpe"]), "DATA": str(data / "train.txt"),
            "HELDOUT": str(data / "heldout.txt")}


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_run(page, doc_env, tmp_path, monkeypatch):
    _workdir(tmp_path, monkeypatch)
    for key, value in doc_env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    for cmd in commands(page):
        args = shlex.split(os.path.expandvars(cmd), comments=True)[1:]
        args += SHORTEN.get(args[0], [])
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, f"{page.name}: `{cmd}` exited {result.exit_code}:\n{result.output[-3000:]}"
