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
