"""stillroom.models.precision: dtype by measured capability, cached per machine, overridable."""

from __future__ import annotations

import json

import pytest
import torch

from stillroom.errors import ConfigError
from stillroom.models import precision


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    monkeypatch.delenv("STILLROOM_DTYPE", raising=False)
    return tmp_path


def test_speedup_is_measured_once_and_cached(cache_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: calls.append(1) or 2.5)
    assert precision.cpu_bf16_speedup() == 2.5
    assert precision.cpu_bf16_speedup() == 2.5
    assert len(calls) == 1
    stored = json.loads((cache_dir / "precision.json").read_text())
    assert stored == {precision.machine_key(): 2.5}
    assert precision.cpu_bf16_speedup(refresh=True) == 2.5 and len(calls) == 2


@pytest.mark.parametrize(("speedup", "want"), [(4.0, torch.bfloat16), (1.0, torch.float32), (0.0125, torch.float32)])
def test_auto_follows_the_measurement(cache_dir, monkeypatch, speedup, want):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: speedup)
    assert precision.auto_dtype("cpu") is want


def test_explicit_and_environment_choices_win(cache_dir, monkeypatch):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: pytest.fail("must not measure"))
    assert precision.auto_dtype("cpu", "float32") is torch.float32
    monkeypatch.setenv("STILLROOM_DTYPE", "bfloat16")
    assert precision.auto_dtype("cpu") is torch.bfloat16
    monkeypatch.setenv("STILLROOM_DTYPE", "fp8")
    with pytest.raises(ConfigError, match="STILLROOM_DTYPE"):
        precision.auto_dtype("cpu")
    with pytest.raises(ConfigError, match="'half'"):
        precision.auto_dtype("cpu", "half")


def test_real_measurement_is_a_positive_ratio():
    # fp32 / bf16 time of a small matmul; its size depends on the CPU, its sign does not
    assert precision.measure_bf16_speedup(n=64, repeats=2) > 0


def test_machine_key_names_the_torch_version(monkeypatch):
    key = precision.machine_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert precision.machine_key() != key


# --- the student's precision (train.precision) ---------------------------------------------------------------


@pytest.mark.parametrize(("speedup", "want"), [(3.0, "bf16"), (0.02, "fp32")])
def test_student_auto_precision_follows_the_measurement(cache_dir, monkeypatch, speedup, want):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: speedup)
    assert precision.student_precision("auto", "cpu") == want
    assert precision.student_precision("bf16", "cpu") == "bf16"  # asked for: honoured whatever was measured
    assert precision.student_precision("fp32", "cpu") == "fp32"


def test_fp16_student_on_cpu_is_refused_naming_the_key_and_the_fix(cache_dir):
    with pytest.raises(ConfigError, match=r"^train.precision: fp16 is for GPUs .* set train.precision=auto, bf16 or fp32$"):
        precision.student_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match=r"train.precision: 'half' is not a precision"):
        precision.student_precision("half", "cpu")


def test_slow_bf16_warning_states_the_measured_ratio(cache_dir, monkeypatch):
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 0.02)  # bf16 50x slower, as on CPUs without it
    line = precision.slow_bf16_warning("teachers.0.dtype", "teachers.0.dtype=auto", "cpu")
    assert line.startswith("teachers.0.dtype: bf16 on this CPU (")
    assert "measured 50.0x slower than fp32" in line and line.endswith("set teachers.0.dtype=auto to let stillroom pick")
    assert "\n" not in line
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 3.0)  # a CPU where bf16 pays: no warning
    assert precision.cpu_bf16_speedup(refresh=True) == 3.0
    assert precision.slow_bf16_warning("train.precision", "train.precision=auto", "cpu") is None
