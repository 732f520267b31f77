"""stillroom.models.runtime: the fused tanh-GELU swap is equivalent to transformers' Python formula (values and
gradients), touches no config, and frozen teachers take no gradients."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM
from transformers.activations import NewGELUActivation

from stillroom.models.runtime import fast_activations, freeze_teacher
from stillroom.testing import tiny_gpt2


def test_fast_activations_match_the_python_formula(tmp_path):
    ref = tiny_gpt2(300, n_layer=3, n_embd=64, n_head=4, seed=0)
    fast = copy.deepcopy(ref)
    assert fast_activations(fast) == 3  # one MLP activation per layer
    assert not any(isinstance(m, NewGELUActivation) for m in fast.modules())
    x = torch.randint(0, 300, (2, 17))
    a, b = ref(input_ids=x, labels=x), fast(input_ids=x, labels=x)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), n
    # the config is untouched: a saved and reloaded model has transformers' own activation again
    fast.save_pretrained(tmp_path, safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.activation_function == ref.config.activation_function
    assert any(isinstance(m, NewGELUActivation) for m in again.modules())
    assert fast_activations(fast) == 0  # idempotent


def test_freeze_teacher():
    t = tiny_gpt2(300, n_layer=2, n_embd=64, n_head=4, seed=1).train()
    assert freeze_teacher(t) is t
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert not any(isinstance(m, NewGELUActivation) for m in t.modules())


def test_frozen_runs_a_teacher_in_its_own_dtype_inside_autocast():
    from stillroom.models.runtime import frozen

    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 32), torch.randn(8, 64)
    want = x.double() @ layer.weight.double().T + layer.bias.double()  # float64 reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = layer(x)  # what an fp32 teacher would run in under the student's bf16 autocast
        with frozen():
            own = layer(x)
    assert lowered.dtype == torch.bfloat16 and own.dtype == torch.float32
    assert not own.requires_grad
    assert torch.allclose(own.double(), want, atol=1e-5)
    assert (lowered.double() - want).abs().max() > 1e-4  # bf16's 8-bit mantissa: visibly less exact
