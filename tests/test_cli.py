import subprocess
import sys

from typer.testing import CliRunner

import stillroom
from stillroom.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert stillroom.__version__ in result.output


def test_help_lists_verbs():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "demo" in result.output


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "stillroom", "--version"], capture_output=True, text=True, check=True)
    assert stillroom.__version__ in out.stdout


def test_cache_threads_sets_torch_threads(tiny_models, tmp_path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # record, leave this process's threads alone
    data = tmp_path / "d.txt"
    data.write_text("To be or not to be.\nThat is the question.\n", encoding="utf-8")
    result = runner.invoke(app, ["cache", "--teacher", str(tiny_models["gpt2-bpe-teacher"]), "--data", str(data),
                                 "--out", str(tmp_path / "c"), "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert calls == [1] and (tmp_path / "c" / "manifest.json").exists()
    result = runner.invoke(app, ["cache", "--teacher", str(tiny_models["gpt2-bpe-teacher"]), "--data", str(data),
                                 "--out", str(tmp_path / "c2"), "--threads", "0"])
    assert result.exit_code == 2 and calls == [1]
