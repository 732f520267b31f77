"""On-policy distillation (stillroom.training.onpolicy) on the tiny fixture models and a few chat records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import torchrun_train

from stillroom.generation.rollout import sample
from stillroom.inputs import chat
from stillroom.training import onpolicy
from stillroom.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "stillroom" / "data" / "chat" / "train.jsonl"
SEQ = 48


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    """``full``: 24 chat records with completions; ``prompts``: the same conversations, prompt-only."""
    d = tmp_path_factory.mktemp("onpolicy-data")
    lines = CHAT.read_text(encoding="utf-8").splitlines()[:24]
    (d / "full.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = []
    for line in lines:
        rec = json.loads(line)
        prompts.append(json.dumps({"id": rec["id"], "messages": rec["messages"][:-1]}))
    (d / "prompts.jsonl").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return {"full": d / "full.jsonl", "prompts": d / "prompts.jsonl"}


def _raw(tiny_models, student, data, out, onpol=None, teachers=("gpt2-bpe-teacher",)) -> dict:
    raw = {
        "student": str(student),
        "teachers": [{"path": str(tiny_models[t])} for t in teachers],
        "data": {"train": str(data), "format": "chat", "seq_len": SEQ},
        "loss": {"kind": "forward_kl", "ce_weight": 0.5},
        "fusion": {"projection": "prefix"},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "logging_steps": 1, "progress": False,
                  "plot": False, "lr": 1e-3, "lr_scheduler": "constant"},
    }
    if onpol is not None:
        raw["onpolicy"] = {"max_new_tokens": 12, **onpol}
    return raw


def _losses(history) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- recipe -------------------------------------------------------------------------------------------------


def test_recipe_keys_are_validated_naming_the_key(tiny_models, nodrop_student, chat_data, tmp_path):
    raw = _raw(tiny_models, nodrop_student, chat_data["full"], tmp_path / "o", {"lambda": 0.5})
    r = load_recipe(raw)
    assert (r.onpolicy.lambda_, r.onpolicy.max_new_tokens, r.onpolicy.temperature) == (0.5, 12, 1.0)
    dumped = r.model_dump()["onpolicy"]  # as the run marker and model card write it: "lambda", read back
    assert dumped["lambda"] == 0.5 and load_recipe({**raw, "onpolicy": dumped}).onpolicy == r.onpolicy
    assert load_recipe(raw, ["onpolicy.lambda=1"]).onpolicy.lambda_ == 1.0
    with pytest.raises(RecipeError, match=r"onpolicy.lambda: got 1.5; input should be less than or equal to 1"):
        load_recipe(raw, ["onpolicy.lambda=1.5"])
    with pytest.raises(RecipeError, match=r"onpolicy.top_p"):
        load_recipe(raw, ["onpolicy.top_p=0"])
    with pytest.raises(RecipeError, match=r"onpolicy.lamda: unknown key"):
        load_recipe(raw, ["onpolicy.lamda=0.5"])
    with pytest.raises(RecipeError, match=r"onpolicy.max_new_tokens: got 48, but a row is data.seq_len=48"):
        load_recipe(raw, ["onpolicy.max_new_tokens=48"])
    with pytest.raises(RecipeError, match=r"data.format must be prompt_completion or chat"):
        load_recipe(raw, ["data.format=text"])
    with pytest.raises(RecipeError, match=r"onpolicy: the student's samples need a teacher"):
        load_recipe({**raw, "teachers": [], "loss": {"ce_weight": 1.0}})


def test_train_check_accepts_prompt_only_data_only_with_lambda_1(tiny_models, nodrop_student, chat_data, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tiny_models, nodrop_student, chat_data["prompts"], tmp_path / "o",
                                          {"lambda": 1.0})))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(recipe), "--check"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", str(recipe), "--check", "onpolicy.lambda=0.5"])
    assert res.exit_code == 2 and "training needs a completion" in res.stderr, res.output


# --- the λ coin ---------------------------------------------------------------------------------------------


def test_coin_is_a_function_of_seed_and_step_with_rate_lambda():
    for lam in (0.0, 0.3, 1.0):
        flips = [onpolicy.coin(7, s, lam) for s in range(4000)]
        assert flips == [onpolicy.coin(7, s, lam) for s in range(4000)]  # same on every rank and resume
        assert abs(sum(flips) / len(flips) - lam) < 0.03
    assert [onpolicy.coin(7, s, 0.5) for s in range(64)] != [onpolicy.coin(8, s, 0.5) for s in range(64)]
    assert onpolicy.sample_seed(0, 3, 0, 0) != onpolicy.sample_seed(0, 3, 1, 0)  # ranks sample differently


# --- one on-policy batch ------------------------------------------------------------------------------------


def _trainer(tiny_models, student, data, out, onpol, teachers=("gpt2-bpe-teacher",)):
    """An OnPolicyTrainer built by train()'s own pieces, without training."""
    from stillroom.models.student import build_student
    from stillroom.training import build_teachers, make_plan, training_data
    from stillroom.training.run import training_arguments

    plan = make_plan(load_recipe(_raw(tiny_models, student, data, out, onpol, teachers)))
    r, tok = plan.recipe, plan.student_tokenizer
    dataset, collator, _ = training_data(r, tok)
    trainer = onpolicy.OnPolicyTrainer(
        model=build_student(r.student, tok), args=training_arguments(r, False), train_dataset=dataset,
        data_collator=collator, processing_class=tok, teachers=build_teachers(plan), loss=r.loss,
        fusion=r.fusion, onpolicy=r.onpolicy)
    return trainer, dataset, collator, tok


def test_a_sampled_batch_labels_exactly_the_samples_and_the_teacher_scores_them_as_a_direct_forward(
        tiny_models, nodrop_student, chat_data, tmp_path):
    """The rebuilt batch is prompt + the student's sample per row (sample() called here on the prompts rendered by
    chat.prompt_ids), labels exactly on the sampled tokens; the same-tokenizer teacher's top-k and CE on those
    rows equal its own forward over prompt + sample, unpadded, one row at a time."""
    from transformers import AutoModelForCausalLM

    trainer, dataset, collator, tok = _trainer(tiny_models, nodrop_student, chat_data["full"], tmp_path / "o",
                                               {"lambda": 1.0, "temperature": 1.3})
    examples = [dataset[i] for i in range(4)]
    batch = collator(examples)
    new = trainer.rollout(batch, seed=5)
    keep = SEQ - 12
    prompts = [chat.prompt_ids(tok, ex)[-keep:] for ex in examples]
    ref = sample(trainer.model, tok, prompts, max_new_tokens=12, temperature=1.3, generator_seed=5)
    assert any(len(s.ids) > 3 for s in ref)
    target, ce = trainer.teachers[0].targets(new)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe-teacher"]).eval()
    for r, (p, s) in enumerate(zip(prompts, ref, strict=True)):
        P, n = len(p), len(s.ids)
        assert new["input_ids"][r, :P + n].tolist() == p + s.ids
        assert int(new["prompt_len"][r]) == P and int(new["attention_mask"][r].sum()) == P + n
        labels = new["labels"][r]
        assert labels[P:P + n].tolist() == s.ids
        assert (labels[:P] == -100).all() and (labels[P + n:] == -100).all()
        assert (new["completion"][r], new["ended"][r], new["example"][r]) == (s.text, s.ended, examples[r])
        with torch.no_grad():
            logp = teacher(input_ids=torch.tensor([p + s.ids])).logits[0].log_softmax(-1)
        rows = range(P - 1, P + n - 1)  # the rows that predict the sampled tokens
        top = logp[list(rows)].topk(10)
        torch.testing.assert_close(target.logprobs[r, P - 1:P + n - 1], top.values, atol=1e-5, rtol=1e-5)
        assert torch.equal(target.ids[r, P - 1:P + n - 1], top.indices)
        gold = -logp[list(rows), s.ids]
        torch.testing.assert_close(ce[r, P - 1:P + n - 1], gold, atol=1e-5, rtol=1e-5)
    n_labels = sum(len(s.ids) for s in ref)
    assert int(new["labels"][:, 1:].ne(-100).sum()) == n_labels


def test_rows_no_teacher_reaches_on_a_sample_stay_out_of_the_divergence(tiny_models, nodrop_student, chat_data,
                                                                        tmp_path):
    """On the student's own samples a row the cross-tokenizer teacher does not reach gets no target (the
    one-hot fallback there would be the student's own sampled token: training it to copy itself); the same
    rows of a data batch still get FuseLLM's one-hot on the gold next token."""
    trainer, dataset, collator, _ = _trainer(tiny_models, nodrop_student, chat_data["full"], tmp_path / "o",
                                             {"lambda": 1.0, "temperature": 1.5}, teachers=("llama-spm",))
    new = trainer.rollout(collator([dataset[i] for i in range(8)]), seed=3)
    assert new["sampled"] is True
    own, _ = trainer.teachers[0].targets(new)
    nxt = new["labels"][:, 1:]
    missed = ~own.valid[:, :-1] & nxt.ne(-100)  # labelled rows the teacher gave nothing
    assert int(missed.sum()) > 0
    kept = trainer.fused_target(new)
    assert not (kept.valid[:, :-1] & missed).any()
    assert torch.equal(kept.valid, own.valid)
    filled = trainer.fused_target({k: v for k, v in new.items() if k != "sampled"})
    assert filled.valid[:, :-1][missed].all()
    assert torch.equal(filled.ids[:, :-1, 0][missed], nxt[missed])
    assert (filled.logprobs[:, :-1, 0][missed] == 0).all()


def test_get_batch_samples_replaces_every_micro_batch_and_recounts_the_labels(tiny_models, nodrop_student,
                                                                             chat_data, tmp_path):
    """The Trainer's N (labelled tokens of the whole step) is counted on the sampled batches, not the data's."""
    trainer, dataset, collator, tok = _trainer(tiny_models, nodrop_student, chat_data["full"], tmp_path / "o",
                                               {"lambda": 1.0})
    data = iter([collator([dataset[i] for i in range(j, j + 4)]) for j in (0, 4)])
    batches, n = trainer.get_batch_samples(data, 2, torch.device("cpu"))
    assert len(batches) == 2 and trainer._coins == [True]
    assert int(n) == sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
    for b, j in zip(batches, (0, 4), strict=True):
        assert b["example_id"] == [dataset[i].example_id for i in range(j, j + 4)]
        assert all(len(c) <= 12 * 20 for c in b["completion"])
        assert int(b["labels"].ne(-100).sum(1).max()) <= 12


# --- whole runs ---------------------------------------------------------------------------------------------


def test_lambda_0_is_off_policy_training_step_for_step(tiny_models, nodrop_student, chat_data, tmp_path):
    from stillroom.training.run import train

    off = train(load_recipe(_raw(tiny_models, nodrop_student, chat_data["full"], tmp_path / "off")))
    on = train(load_recipe(_raw(tiny_models, nodrop_student, chat_data["full"], tmp_path / "on", {"lambda": 0.0})))
    lo, ln = _losses(off.history), _losses(on.history)
    assert sorted(lo) == [1, 2, 3] and lo == ln
    assert [h["onpolicy"] for h in on.history if "loss" in h] == [0.0, 0.0, 0.0]
    po, pn = _params(off.model), _params(on.model)
    assert all(torch.equal(po[k], pn[k]) for k in po)


def test_lambda_1_trains_on_prompt_only_data(tiny_models, nodrop_student, chat_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from stillroom.training.run import train

    r = load_recipe(_raw(tiny_models, nodrop_student, chat_data["prompts"], tmp_path / "o", {"lambda": 1.0}))
    res = train(r)
    logs = [h for h in res.history if "loss" in h]
    assert [h["onpolicy"] for h in logs] == [1.0, 1.0, 1.0]
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["loss"] > 0 for h in logs)
    start = AutoModelForCausalLM.from_pretrained(nodrop_student).state_dict()
    end = res.model.state_dict()
    assert max((end[k] - start[k]).abs().max().item() for k in start) > 1e-4


def test_resume_from_a_checkpoint_takes_the_same_choices_and_samples(tiny_models, nodrop_student, chat_data,
                                                                      tmp_path):
    from stillroom.training.run import train
    from stillroom.training.runs import write_marker

    common = ["train.max_steps=4", "train.save_steps=2"]
    raw = _raw(tiny_models, nodrop_student, chat_data["full"], tmp_path / "full", {"lambda": 0.5, "seed": 1})
    full = train(load_recipe(raw, common))
    coins = [h["onpolicy"] for h in full.history if "loss" in h]
    assert coins == [float(onpolicy.coin(1, s, 0.5)) for s in range(4)] and 0 < sum(coins) < 4
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")
    raw["train"]["output_dir"] = str(tmp_path / "part")
    r = load_recipe(raw, [*common, "train.resume=true"])
    write_marker(tmp_path / "part", r)
    resumed = train(r)
    lf, lr = _losses(full.history), _losses(resumed.history)
    for step in (3, 4):
        assert lr[step] == pytest.approx(lf[step], rel=1e-5, abs=1e-6)
    pf, pr = _params(full.model), _params(resumed.model)
    for k in pf:
        torch.testing.assert_close(pf[k], pr[k], atol=1e-6, rtol=1e-5)


DDP_SCRIPT = """
import hashlib, json, os, sys
from stillroom.training.run import train
r = train(sys.argv[1], sys.argv[2:])
h = hashlib.sha256()
for k, v in sorted(r.model.state_dict().items()):
    h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
out = os.path.join(os.path.dirname(sys.argv[1]), f"rank{os.environ['RANK']}.json")
json.dump({"sha": h.hexdigest(), "coins": [x["onpolicy"] for x in r.history if "loss" in x]}, open(out, "w"))
"""


def test_two_process_ddp_on_policy_with_same_and_cross_tokenizer_teachers(tiny_models, nodrop_student, chat_data,
                                                                         tmp_path):
    """torchrun 2 × batch 2 (gloo), λ = 0.5, a same-tokenizer and a cross-tokenizer teacher grading the
    student's samples: it finishes, both ranks took the same coins and end with identical weights."""
    raw = _raw(tiny_models, nodrop_student, chat_data["full"], tmp_path / "o", {"lambda": 0.5, "seed": 1},
               teachers=("gpt2-bpe-teacher", "llama-spm"))
    torchrun_train(tmp_path, raw, DDP_SCRIPT, "train.batch_size=2", "train.max_steps=4", timeout=600)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0 == r1
    assert r0["coins"] == [float(onpolicy.coin(1, s, 0.5)) for s in range(4)] and 0 < sum(r0["coins"]) < 4
