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
    assert not [p.name for p in (out / "fused").iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # no pickle
    # the loss plot draws like with like: each student's CE (the fused one's CE part, not its total loss)
    curves = data["curves"]
    for name, folder in (("fused student", "fused"), ("CE-only student", "ce-only")):
        logged = [json.loads(x) for x in (out / folder / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in logged if "loss" in x]
        assert curves["training CE (nats/token)"][name] == {"step": [x["step"] for x in train],
                                                            "value": [x["ce"] for x in train]}
        evals = [x for x in logged if "eval_bpb" in x]
        assert curves["held-out bits per byte"][name]["value"] == [x["eval_bpb"] for x in evals] and evals
    fused_train = [json.loads(x) for x in (out / "fused" / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(x["loss"] - x["ce"]) > 1e-3 for x in fused_train if "loss" in x)  # λ < 1: total ≠ CE
    baseline = [json.loads(x) for x in (out / "ce-only" / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(x["loss"] - x["ce"]) < 1e-5 * x["ce"] for x in baseline if "loss" in x)  # CE-only: loss is CE


def test_demo_rejects_a_teacher_that_is_not_a_model_folder(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "r"), "--teacher", str(tmp_path)])
    assert result.exit_code == 2
    assert "has no config.json" in result.stderr and result.stdout == ""
