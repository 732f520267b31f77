"""stillroom.models.lora: LoRA students train only their adapters (base weights bit-identical), their loss is a
hand-built peft model's, they resume from adapter checkpoints as if never stopped, and the saved student is
the merged model every tool loads."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from stillroom.errors import ConfigError  # noqa: E402
from stillroom.training.recipe import load_recipe  # noqa: E402

SEQ = 32
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["c_attn"]}


def _raw(tiny_models, data_dir, out, lora=LORA, teachers=("gpt2-bpe-teacher",), **train) -> dict:
    return {
        "student": {"path": str(tiny_models["gpt2-bpe"]), "lora": dict(lora)},
        "teachers": [{"path": str(tiny_models[t])} for t in teachers],
        "data": {"train": str(data_dir / "train.txt"), "seq_len": SEQ, "max_blocks": 24},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "logging_steps": 1, "progress": False,
                  "plot": False, "lr": 1e-2, "lr_scheduler": "constant", **train},
    }


def _base_weights(adapted) -> dict[str, torch.Tensor]:
    """The student's own weights inside a LoRA model, under their plain names."""
    sd = adapted.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in sd.items() if "lora_" not in k}


def test_lora_trains_only_adapters_and_saves_the_merged_student(tiny_models, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from stillroom import load_model, train

    original = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]).state_dict()
    result = train(_raw(tiny_models, data_dir, tmp_path / "o"))
    adapted = result.model
    base = _base_weights(adapted)
    assert set(base) == set(original)
    assert all(torch.equal(base[k], original[k]) for k in original)  # bit-identical after training
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # the saved student is a plain model: the adapters merged into c_attn, every other weight as it was
    merged, _ = load_model(result.output_dir)
    saved = merged.state_dict()
    changed = {k for k in original if not torch.equal(saved[k], original[k])}
    assert changed and all("c_attn.weight" in k for k in changed)
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").is_file()
    # merged weights = W + (α / r) · B A (GPT-2's Conv1D stores W transposed: [in, out])
    layer = adapted.get_base_model().transformer.h[0].attn.c_attn
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = original["transformer.h.0.attn.c_attn.weight"] + (LORA["alpha"] / LORA["r"]) * (b @ a).T
    assert torch.allclose(saved["transformer.h.0.attn.c_attn.weight"], want, atol=1e-6)


def test_gradients_reach_only_the_adapters_and_the_loss_is_a_hand_built_peft_models(tiny_models, data_dir,
                                                                                     tmp_path):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from stillroom.inputs import BlockCollator, BlockDataset
    from stillroom.models.student import build_student
    from stillroom.training import DistillTrainer, LossSpec, make_plan, training_blocks
    from stillroom.training.run import training_arguments

    raw = _raw(tiny_models, data_dir, tmp_path / "o", teachers=())
    raw["loss"] = {"ce_weight": 1.0}
    plan = make_plan(load_recipe(raw))
    r, tok = plan.recipe, plan.student_tokenizer
    torch.manual_seed(0)
    student = build_student(r.student, tok)
    torch.manual_seed(0)
    by_hand = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]),
                                  peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["c_attn"],
                                                  task_type="CAUSAL_LM"))
    for m in (student, by_hand):  # B starts at zero (no effect): give both the same nonzero B, no dropout
        m.eval()
        for name, p in m.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    blocks = training_blocks(r, tok)
    trainer = DistillTrainer(model=student, args=training_arguments(r, False), train_dataset=BlockDataset(blocks),
                             data_collator=BlockCollator(tok, SEQ), loss=LossSpec(ce_weight=1.0))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    student.train()
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(float(p.grad.abs().sum()) > 0 for n, p in student.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        logits = by_hand(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch.get("position_ids")).logits
        labels = batch["labels"][:, 1:]
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss.detach(), ref, rtol=1e-5, atol=1e-6)


def test_a_resumed_lora_run_ends_where_an_uninterrupted_one_does(tiny_models, data_dir, tmp_path):
    from stillroom import load_model, train

    whole = train(_raw(tiny_models, data_dir, tmp_path / "whole", max_steps=4))
    train(_raw(tiny_models, data_dir, tmp_path / "cut", max_steps=2, save_steps=2))
    assert (tmp_path / "cut" / "checkpoint-2" / "adapter_model.safetensors").is_file()  # adapters only
    resumed = train(_raw(tiny_models, data_dir, tmp_path / "cut", max_steps=4, save_steps=2, resume=True))
    a, _ = load_model(whole.output_dir)
    b, _ = load_model(resumed.output_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_unknown_target_modules_are_one_line_naming_the_key(tiny_models, data_dir, tmp_path):
    from stillroom import train

    with pytest.raises(ConfigError, match=r"student\.lora\.target_modules: .*q_proj"):
        train(_raw(tiny_models, data_dir, tmp_path / "o", lora={"target_modules": ["no_such_module"]}))
