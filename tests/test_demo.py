"""`stillroom demo` end to end on the tiny fixtures (the shipped default runs in `make demo`)."""

import json

from typer.testing import CliRunner

from stillroom.cli import app


def test_demo_pipeline_on_fixtures(tiny_models, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "demo", "--out", str(out),
        "--teacher", str(tiny_models["gpt2-bpe-teacher"]), "--teacher", str(tiny_models["llama-spm"]),
        "--student-tokenizer", str(tiny_models["gpt2-bpe"]),
        "--steps", "3", "--max-blocks", "8", "--eval-chars", "1500", "--ce-weight", "0.7", "--projection", "onehot",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    roles = [r["role"] for r in data["rows"]]
    assert roles == ["teacher", "teacher", "fused student", "CE-only student"]
    for r in data["rows"]:
        assert 0 < r["bits_per_byte"] < 20 and r["bytes"] > 0
    # the two caches cover exactly the exported training blocks
    blocks = (out / "train_blocks.jsonl").read_text().splitlines()
    assert len(blocks) == 8
    for name in ("gpt2-bpe-teacher", "llama-spm"):
        manifest = json.loads((out / "cache" / name / "manifest.json").read_text())
        assert manifest["n_examples"] == 8
    report = (out / "report.md").read_text()
    assert "| fused | fused student |" in report and "bits/byte" in report
    assert "λ = 0.7" in report and "projection `onehot`" in report  # the flags reach the recipe
    for png in ("loss_curves.png", "bits_per_byte.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "fused" / "model.safetensors").exists() and (out / "ce-only" / "README.md").exists()


def test_demo_rejects_a_teacher_that_is_not_a_model_folder(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "r"), "--teacher", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no config.json" in result.stderr and result.stdout == ""
