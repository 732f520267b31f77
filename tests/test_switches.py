"""stillroom.training.switches: the recipe's speed switches become TrainingArguments keywords and an in-place compile."""

from __future__ import annotations

import pytest
import torch

from stillroom.models import precision
from stillroom.testing import tiny_gpt2
from stillroom.training import switches
from stillroom.training.recipe import TrainSpec


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """bf16 measured ``speedup`` times fp32 on this (CPU) training device."""
    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path))
    monkeypatch.delenv("STILLROOM_DTYPE", raising=False)
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))
    return lambda speedup: monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: speedup)


@pytest.mark.parametrize(("speedup", "bf16"), [(3.0, True), (0.02, False)])
def test_training_kwargs_auto_precision_and_checkpointing(measured, speedup, bf16):
    from transformers import TrainingArguments

    measured(speedup)
    kw = switches.training_kwargs(TrainSpec(gradient_checkpointing=True))
    assert kw["bf16"] is bf16 and kw["fp16"] is False
    ckpt = "activation_checkpointing" if "activation_checkpointing" in kw else "gradient_checkpointing"
    assert kw[ckpt] is True
    args = TrainingArguments(output_dir="unused", use_cpu=True, **kw)  # transformers accepts them on CPU
    assert args.bf16 is bf16
    assert switches.training_kwargs(TrainSpec(precision="fp32"))["bf16"] is False
    assert switches.describe(TrainSpec(precision="bf16")) == "student precision bf16 (asked)"


def test_apply_compiles_each_decoder_layer_in_place_keeping_the_state_dict():
    model = tiny_gpt2(vocab_size=64, n_layer=2)
    keys = list(model.state_dict())
    assert switches.apply(model, TrainSpec()) is model
    assert all(layer._compiled_call_impl is None for layer in model.transformer.h)
    switches.apply(model, TrainSpec(compile=True))
    assert all(layer._compiled_call_impl is not None for layer in model.transformer.h)
    assert list(model.state_dict()) == keys  # no _orig_mod prefix: checkpoints and save_pretrained unchanged


@pytest.mark.slow
def test_compiled_student_computes_what_the_eager_one_does():
    """Inductor compiles the layer (a C++ build on CPU: tens of seconds): the same logits, to float rounding."""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=64, n_layer=1).eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = switches.apply(model, TrainSpec(compile=True))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
