"""DistillTrainer, recipes and `stillroom train`, on the tiny fixture models (few steps, short sequences)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import torchrun_train

from stillroom.testing import corpus_texts
from stillroom.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
SEQ = 48


def _base(tiny_models, data_dir, out, teachers=("gpt2-bpe-teacher",), **extra) -> dict:
    raw = {
        "student": str(tiny_models["gpt2-bpe"]),
        "teachers": [{"path": str(tiny_models[t])} for t in teachers],
        "data": {"train": str(data_dir / "train.txt"), "seq_len": SEQ},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 4, "logging_steps": 1,
                  "progress": False, "plot": False, "lr": 1e-3, "lr_scheduler": "constant"},
    }
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


def _losses(history) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- recipes ------------------------------------------------------------------------------------------------


def test_bad_recipes_fail_fast_naming_the_key(tiny_models, data_dir, tmp_path):
    ok = _base(tiny_models, data_dir, tmp_path / "o")
    with pytest.raises(RecipeError, match=r"trian: unknown key"):
        load_recipe({**ok, "trian": {}})
    with pytest.raises(RecipeError, match=r"fusion.method: got 'max'.*'min_ce', 'avg_ce' or 'mean'"):
        load_recipe(ok, ["fusion.method=max"])
    with pytest.raises(RecipeError, match=r"teachers.0.path: .*nope does not exist"):
        load_recipe(ok, [f"teachers.0.path={tmp_path / 'nope'}"])
    with pytest.raises(RecipeError, match=r"train.max_steps"):
        load_recipe(ok, ["train.max_steps=0"])
    with pytest.raises(RecipeError, match=r"data.train: .* does not exist"):
        load_recipe(ok, ["data.train=/no/such/file.txt"])
    with pytest.raises(RecipeError, match=r"override 'oops' must look like key=value"):
        load_recipe(ok, ["oops"])


def test_recipe_errors_are_one_line_and_echo_the_value(tiny_models, data_dir, tmp_path):
    ok = _base(tiny_models, data_dir, tmp_path / "o")
    for override, expected in (("train.lr=-0.5", "train.lr: got -0.5; input should be greater than 0"),
                               ("loss.ce_weight=1.5", "loss.ce_weight: got 1.5; input should be less than or equal to 1"),
                               ("train.max_steps=true", "train.max_steps: got True; a number is required"),
                               ("train.report_to=[tensorbord]", "train.report_to: got 'tensorbord'; use any of"),
                               ("teachers=[]", "loss.ce_weight: with no teachers it must be 1.0")):
        with pytest.raises(RecipeError) as e:
            load_recipe(ok, [override])
        msg = str(e.value)
        assert "\n" not in msg and "Value error" not in msg and "(top level)" not in msg, msg
        assert expected in msg, msg
    (tmp_path / "bad.yaml").write_text("student: x\ndata: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml is not valid YAML \(line 3, column 1"):
        load_recipe(tmp_path / "bad.yaml")


def test_teacher_name_defaults_to_its_folder(tiny_models, data_dir, tmp_path):
    ok = _base(tiny_models, data_dir, tmp_path / "o")
    ok["teachers"][0]["name"] = "the-old-teacher"
    assert load_recipe(ok).teachers[0].name == "the-old-teacher"
    other = tiny_models["llama-spm"]
    assert load_recipe(ok, [f"teachers.0.path={other}"]).teachers[0].name == "llama-spm"  # not the old label
    assert load_recipe(ok, [f"teachers.0.path={other}", "teachers.0.name=t"]).teachers[0].name == "t"
    del ok["teachers"][0]["name"]
    assert load_recipe(ok).teachers[0].name == "gpt2-bpe-teacher"


def test_tokenizer_mismatch_without_projection_fails_before_models_load(tiny_models, data_dir, tmp_path):
    from stillroom.training.plan import make_plan

    r = load_recipe(_base(tiny_models, data_dir, tmp_path, teachers=("llama-spm",)), ["fusion.projection=none"])
    with pytest.raises(ValueError, match=r"teachers.0.path: .*different tokenizer.*fusion.projection"):
        make_plan(r)
    # Same tokenizer with projection disabled is fine.
    make_plan(load_recipe(_base(tiny_models, data_dir, tmp_path), ["fusion.projection=none"]))


def test_cache_built_for_another_teacher_is_rejected(tiny_models, data_dir, tmp_path):
    from stillroom.teachers.cache import write_cache
    from stillroom.teachers.online import OnlineTeacher
    from stillroom.training.plan import make_plan

    cache = tmp_path / "cache"
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "text": "To be or not to be."}) + "\n")
    write_cache(OnlineTeacher(str(tiny_models["gpt2-bpe"]), top_k=4), tmp_path / "d.jsonl", cache, progress=False)
    raw = _base(tiny_models, data_dir, tmp_path / "o")
    raw["teachers"][0]["cache"] = str(cache)  # the cache is the student's, not this teacher's
    with pytest.raises(ValueError, match=r"teachers.0.cache: .*another teacher"):
        make_plan(load_recipe(raw))


@pytest.mark.parametrize("name", ["kd-same-tokenizer", "kd-cross-tokenizer", "fusellm-two-teachers",
                                  "emo-finetune"])
def test_shipped_recipes_validate_and_run_a_few_steps(name, tiny_models, data_dir, tmp_path):
    from stillroom.training.run import train

    r = load_recipe(RECIPES / f"{name}.yaml")  # as shipped: points at the embedded default
    assert r.name == name
    teachers = {"kd-same-tokenizer": ["gpt2-bpe-teacher"], "kd-cross-tokenizer": ["llama-spm"],
                "fusellm-two-teachers": ["gpt2-bpe-teacher", "llama-spm"], "emo-finetune": []}[name]
    over = [f"student={tiny_models['gpt2-bpe']}", "student_config=null", f"data.train={data_dir / 'train.txt'}",
            f"data.eval={data_dir / 'val.txt'}", f"data.seq_len={SEQ}", "data.max_blocks=8",
            f"train.output_dir={tmp_path / 'out'}", "train.max_steps=2", "train.batch_size=2",
            "train.eval_steps=2", "train.save_steps=null", "train.progress=false", "train.logging_steps=1"]
    over += [f"teachers.{i}.path={tiny_models[t]}" for i, t in enumerate(teachers)]
    result = train(RECIPES / f"{name}.yaml", over)
    out = Path(result.output_dir)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert name in card and "eval_bpb" in card
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines) and any("eval_bpb" in x for x in lines)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert all(math.isfinite(x["loss"]) for x in lines if "loss" in x)
    if len(teachers) > 1:  # each teacher's share of the fused target is logged and they sum to one
        shares = [{k: v for k, v in x.items() if k.startswith("fusion_share/")} for x in lines if "loss" in x]
        assert all(len(x) == 2 and abs(sum(x.values()) - 1) < 1e-5 for x in shares), shares


# --- the loss -----------------------------------------------------------------------------------------------


def _trainer(tiny_models, data_dir, out, teachers=("gpt2-bpe-teacher",), overrides=()):
    """A DistillTrainer built by train()'s own pieces, without training."""
    from stillroom.inputs import BlockCollator, BlockDataset, make_blocks
    from stillroom.models.student import build_student
    from stillroom.training import DistillTrainer, build_teachers, make_plan
    from stillroom.training.run import training_arguments

    plan = make_plan(load_recipe(_base(tiny_models, data_dir, out, teachers), list(overrides)))
    r, tok = plan.recipe, plan.student_tokenizer
    blocks = make_blocks([("x", (data_dir / "train.txt").read_text())], tok, SEQ)
    student = build_student(r.student, tok)
    return DistillTrainer(
        model=student, args=training_arguments(r, False), train_dataset=BlockDataset(blocks),
        data_collator=BlockCollator(tok, SEQ), teachers=build_teachers(plan), loss=r.loss,
        fusion=r.fusion), blocks


@pytest.mark.parametrize("top_k", [10, None])
def test_one_same_tokenizer_teacher_with_min_ce_is_plain_kd(top_k, tiny_models, data_dir, tmp_path):
    """Trainer loss == hand-written KD on dense logits: λ·CE + (1−λ)·KL(teacher top-k + tail ‖ student);
    top_k=None is the dense teacher (computed from its hidden states inside the fused loss)."""
    from transformers import AutoModelForCausalLM

    trainer, blocks = _trainer(tiny_models, data_dir, tmp_path, overrides=[f"fusion.top_k={top_k or 'null'}"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    batch["input_ids"][2, 30:] = trainer.data_collator.pad_id  # a padded row
    batch["attention_mask"][2, 30:] = 0
    batch["labels"][2, 30:] = -100
    model = trainer.model.train()
    for m in model.modules():  # deterministic forwards (the fixture GPT-2 has dropout 0.1)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    got = trainer.compute_loss(model, batch)

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe-teacher"]).eval()
    with torch.no_grad():
        t_logp = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    s_logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    lam, total, n = 0.9, 0.0, 0
    for b in range(3):
        for j in range(SEQ - 1):
            y = int(batch["labels"][b, j + 1])
            if y == -100:
                continue
            ce = -s_logp[b, j, y]
            top = t_logp[b, j].topk(top_k or t_logp.shape[-1])
            p = top.values.exp()
            tail = 1 - p.sum()
            q = s_logp[b, j].exp()
            q_top = q[top.indices]
            kl = (p * (top.values - q_top.log())).sum()
            if top_k:
                kl = kl + tail * (tail.log() - (1 - q_top.sum()).log())
            total = total + lam * ce + (1 - lam) * kl
            n += 1
    torch.testing.assert_close(got, total / n, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("projection", ["onehot", "prefix"])
def test_aligned_teacher_target_is_the_projection_with_its_fallback(projection, tiny_models, data_dir, tmp_path):
    """One cross-tokenizer teacher: the trainer's target (projected without fallback rows, fused, then the
    uncovered rows filled) is exactly ``student_targets`` with the fallback's one-hot rows, row by row."""
    from stillroom.tokenization.project import student_targets

    trainer, _ = _trainer(tiny_models, data_dir, tmp_path, teachers=("llama-spm",),
                          overrides=[f"fusion.projection={projection}"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    got = trainer.fused_target(batch)
    t = trainer.teachers[0]
    outs = t.source.signal(batch["text"], batch["example_id"])
    n_onehot = 0
    for r, out in enumerate(outs):
        sid = batch["input_ids"][r][batch["attention_mask"][r].bool()]
        want, _ = student_targets(out, sid.numpy(), t.student_table, t.teacher_table, t.vocab_map,
                                  fallback=projection)
        n = len(sid)
        assert torch.equal(got.valid[r, :n], want.valid) and not got.valid[r, n:].any()
        v = want.valid
        assert torch.equal(got.ids[r, :n][v], want.ids[v].to(got.ids.dtype))
        torch.testing.assert_close(got.logprobs[r, :n][v], want.logprobs[v].float())
        torch.testing.assert_close(got.tail[r, :n][v], want.tail[v].float())
        n_onehot += int(((want.logprobs[v][:, 0] == 0) & (want.tail[v] == 0)).sum())
    assert n_onehot > 0  # the fallback rows were exercised


def test_fill_uncovered_false_leaves_the_one_hot_rows_out(tiny_models, data_dir, tmp_path):
    """``fusion.fill_uncovered: false``: the rows the projection leaves without a teacher target (student_targets'
    one-hot fallback rows) are not counted in the distillation term; every other row is the same target."""
    from stillroom.tokenization.project import student_targets

    trainer, _ = _trainer(tiny_models, data_dir, tmp_path, teachers=("llama-spm",),
                          overrides=["fusion.projection=onehot", "fusion.fill_uncovered=false"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    got = trainer.fused_target(batch)
    t = trainer.teachers[0]
    skipped = 0
    for r, out in enumerate(t.source.signal(batch["text"], batch["example_id"])):
        sid = batch["input_ids"][r][batch["attention_mask"][r].bool()]
        covered, _ = student_targets(out, sid.numpy(), t.student_table, t.teacher_table, t.vocab_map,
                                     fallback="onehot", fill=False)
        filled, _ = student_targets(out, sid.numpy(), t.student_table, t.teacher_table, t.vocab_map,
                                    fallback="onehot")
        n = len(sid)
        assert torch.equal(got.valid[r, :n], covered.valid)
        skipped += int((filled.valid & ~covered.valid).sum())
    assert skipped > 0  # rows the default would have filled with the gold token


def test_include_student_adds_a_frozen_copy_as_candidate(tiny_models, data_dir, tmp_path):
    from stillroom.training.run import train

    raw = _base(tiny_models, data_dir, tmp_path / "o")
    r = train(load_recipe(raw, ["fusion.include_student=true", "fusion.method=avg_ce", "train.max_steps=2",
                                "data.max_blocks=4"]))
    assert all(math.isfinite(v) for v in _losses(r.history).values())


def test_loss_decreases_on_a_repeated_batch(tiny_models, data_dir, tmp_path):
    trainer, _ = _trainer(tiny_models, data_dir, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = trainer.compute_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_grad_accumulation_1x4_equals_4x1(tiny_models, nodrop_student, data_dir, tmp_path):
    """One SGD step from 4 blocks of unequal lengths: batch 4 × accum 1 and batch 1 × accum 4 agree."""
    from stillroom.training.run import train

    common = ["train.max_steps=1", "train.optimizer=sgd", "train.max_grad_norm=0", "train.lr=0.5",
              "data.max_blocks=4", "train.seed=3", "loss.ce_weight=0.5"]
    data = tmp_path / "uneven.txt"  # lines of very different lengths -> blocks with different token counts
    data.write_text("\n".join(t[:n] for t, n in zip(corpus_texts("train")[:4], (900, 120, 60, 400),
                                                    strict=True)), encoding="utf-8")
    raw = _base(tiny_models, data_dir, tmp_path / "a")
    raw["student"] = str(nodrop_student)
    raw["data"]["train"] = str(data)
    a = train(load_recipe(raw, common + ["train.batch_size=4", "train.grad_accum=1"]))
    raw["train"]["output_dir"] = str(tmp_path / "b")
    b = train(load_recipe(raw, common + ["train.batch_size=1", "train.grad_accum=4"]))
    pa, pb = _params(a.model), _params(b.model)
    from transformers import AutoModelForCausalLM

    p0 = _params(AutoModelForCausalLM.from_pretrained(tiny_models["gpt2-bpe"]))
    moved = max((pa[k] - p0[k]).abs().max().item() for k in pa)
    assert moved > 1e-3  # the step did something
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=2e-6, rtol=1e-4)


def test_resume_matches_uninterrupted_run(tiny_models, nodrop_student, data_dir, tmp_path):
    from stillroom.training.run import train

    raw = _base(tiny_models, data_dir, tmp_path / "full")
    raw["student"] = str(nodrop_student)
    full = train(load_recipe(raw, ["train.max_steps=6", "train.save_steps=3", "train.lr_scheduler=cosine"]))
    from stillroom.training.runs import write_marker

    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "part" / "checkpoint-3")
    raw["train"]["output_dir"] = str(tmp_path / "part")
    r = load_recipe(raw, ["train.max_steps=6", "train.save_steps=3", "train.lr_scheduler=cosine", "train.resume=true"])
    write_marker(tmp_path / "part", r)  # the folder of this recipe's run, stopped after checkpoint-3
    resumed = train(r)
    lf, lr = _losses(full.history), _losses(resumed.history)
    assert sorted(lr) == list(range(1, 7))
    for step in (4, 5, 6):
        assert lr[step] == pytest.approx(lf[step], rel=1e-5, abs=1e-6)
    pf, pr = _params(full.model), _params(resumed.model)
    for k in pf:
        torch.testing.assert_close(pf[k], pr[k], atol=1e-6, rtol=1e-5)


# --- speed switches -----------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_losses_and_weights(tiny_models, nodrop_student, data_dir, tmp_path):
    """Recomputing activations in the backward pass changes memory, not maths: the same losses and weights."""
    from stillroom.training.run import train

    common = ["train.max_steps=2", "train.optimizer=sgd", "train.max_grad_norm=0", "train.lr=0.5"]
    raw = _base(tiny_models, data_dir, tmp_path / "plain")
    raw["student"] = str(nodrop_student)
    a = train(load_recipe(raw, common))
    raw["train"]["output_dir"] = str(tmp_path / "ckpt")
    b = train(load_recipe(raw, [*common, "train.gradient_checkpointing=true"]))
    recomputes = [getattr(m, "gradient_checkpointing", False) for m in b.model.modules()]
    assert any(recomputes) and not any(getattr(m, "gradient_checkpointing", False) for m in a.model.modules())
    la, lb = _losses(a.history), _losses(b.history)
    assert sorted(la) == [1, 2] and all(lb[s] == pytest.approx(la[s], rel=1e-6) for s in la)
    pa, pb = _params(a.model), _params(b.model)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-6, rtol=1e-5)


def test_bf16_precision_autocasts_over_fp32_master_weights(tiny_models, data_dir, tmp_path, monkeypatch):
    from stillroom.models import precision
    from stillroom.training.run import train

    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))
    raw = _base(tiny_models, data_dir, tmp_path / "fp32")
    a = train(load_recipe(raw, ["train.max_steps=2", "train.precision=fp32"]))
    raw["train"]["output_dir"] = str(tmp_path / "bf16")
    b = train(load_recipe(raw, ["train.max_steps=2", "train.precision=bf16"]))
    assert {p.dtype for p in b.model.parameters()} == {torch.float32}  # master weights stay fp32
    la, lb = _losses(a.history), _losses(b.history)
    assert lb[1] != la[1]  # the forward really ran in bf16 ...
    assert lb[1] == pytest.approx(la[1], rel=2e-2)  # ... and bf16's ~3 significant digits keep it close


def test_teacher_dtype_is_the_dtype_online_teachers_run_in(tiny_models, data_dir, tmp_path, monkeypatch):
    from stillroom.models import precision
    from stillroom.training.build import build_teachers
    from stillroom.training.plan import make_plan

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("STILLROOM_DTYPE", raising=False)
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 0.02)  # bf16 measured slow: auto = fp32
    raw = _base(tiny_models, data_dir, tmp_path / "o", teachers=("gpt2-bpe-teacher", "llama-spm"))
    for dtype, want in (("bfloat16", torch.bfloat16), ("auto", torch.float32)):
        r = load_recipe(raw, [f"teachers.0.dtype={dtype}", f"teachers.1.dtype={dtype}"])
        same, aligned = build_teachers(make_plan(r), device="cpu")
        assert same.model.dtype == want and aligned.source.model.dtype == want


def test_tensorboard_run_writes_event_files(tiny_models, data_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stillroom.training.run import train

    out = tmp_path / "tb"
    res = train(load_recipe(_base(tiny_models, data_dir, out), ["train.max_steps=2", "train.report_to=[tensorboard]"]))
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard event file under {out}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [e.value for e in acc.Scalars("train/loss")]
    assert logged == pytest.approx([_losses(res.history)[s] for s in (1, 2)], rel=1e-5)


def test_cli_train_check_prints_a_switch_warning(tiny_models, data_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from stillroom.cli import app
    from stillroom.models import precision

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "measure_bf16_speedup", lambda: 0.02)
    monkeypatch.setattr(precision, "training_device", lambda: torch.device("cpu"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_base(tiny_models, data_dir, tmp_path / "o")))
    res = CliRunner().invoke(app, ["train", str(recipe), "--check", "train.precision=bf16"])
    assert res.exit_code == 0, res.output
    assert "warning: train.precision: bf16 on this CPU" in res.stderr and "50.0x slower" in res.stderr
    res = CliRunner().invoke(app, ["train", str(recipe), "--check", "train.precision=fp16"])
    assert res.exit_code != 0 and "error: train.precision: fp16 is for GPUs" in res.stderr


# --- CLI and DDP --------------------------------------------------------------------------------------------


def test_cli_train_check_and_bad_override(tiny_models, data_dir, tmp_path):
    from typer.testing import CliRunner

    from stillroom.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_base(tiny_models, data_dir, tmp_path / "o")))
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(recipe), "--check"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", str(recipe), "loss.kind=kl"])
    assert res.exit_code == 2 and "loss.kind" in res.output and "forward_kl" in res.output
    res = runner.invoke(app, ["train", str(recipe), "train.max_steps=2"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "model.safetensors").exists()
    blocks = tmp_path / "blocks.jsonl"
    res = runner.invoke(app, ["train", str(recipe), "--export-blocks", str(blocks)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in blocks.read_text().splitlines()]
    assert rows[0]["id"].endswith("#0") and rows[0]["text"]


DDP_SCRIPT = """
import hashlib, os, sys
import torch
from stillroom.training.run import train
r = train(sys.argv[1], sys.argv[2:])
h = hashlib.sha256()
for k, v in sorted(r.model.state_dict().items()):
    h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
out = os.path.join(os.path.dirname(sys.argv[1]), f"rank{os.environ['RANK']}.sha")
open(out, "w").write(h.hexdigest())
"""


def test_two_process_ddp_on_cpu_ends_with_identical_weights(tiny_models, nodrop_student, data_dir, tmp_path):
    """torchrun 2 × batch 2 (gloo): both ranks end equal, and equal to one process with batch 4 (same blocks,
    SGD, no clipping), so the token-count normalisation is exact across ranks too."""
    from stillroom.training.run import train

    raw = _base(tiny_models, data_dir, tmp_path / "o")
    raw["student"] = str(nodrop_student)
    common = ["train.max_steps=2", "train.optimizer=sgd", "train.max_grad_norm=0", "train.lr=0.5"]
    torchrun_train(tmp_path, raw, DDP_SCRIPT, "train.batch_size=2", *common)
    h0, h1 = (tmp_path / "rank0.sha").read_text(), (tmp_path / "rank1.sha").read_text()
    assert h0 == h1
    from transformers import AutoModelForCausalLM

    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    raw["train"]["output_dir"] = str(tmp_path / "single")
    single = _params(train(load_recipe(raw, ["train.batch_size=4", *common])).model)
    start = AutoModelForCausalLM.from_pretrained(nodrop_student).state_dict()
    assert max((ddp[k] - start[k]).abs().max().item() for k in single) > 1e-3  # trained
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-4)


def test_training_eval_bpb_equals_stillroom_eval(tiny_models, data_dir, tmp_path):
    """`train`'s eval_bpb and `stillroom eval` score the same documents the same way (the reference)."""
    from stillroom.evaluation import evaluate_paths
    from stillroom.training.run import train

    for documents in ("file", "line"):
        out = tmp_path / documents
        r = train(_base(tiny_models, data_dir, out, teachers=(),
                        data={"eval": str(data_dir / "val.txt"), "documents": documents},
                        loss={"ce_weight": 1.0}, train={"max_steps": 1}))
        (ref,) = evaluate_paths([out], data_dir / "val.txt", progress=False, documents=documents)
        assert r.metrics["eval_bpb"] == pytest.approx(ref.bits_per_byte, rel=1e-5, abs=1e-6)
        assert r.metrics["eval_loss"] == pytest.approx(ref.nll_bits * math.log(2) / ref.tokens, rel=1e-5)


# --- streaming data -----------------------------------------------------------------------------------------


def test_streaming_recipe_needs_max_steps(tiny_models, data_dir, tmp_path):
    raw = _base(tiny_models, data_dir, tmp_path / "o", data={"streaming": True})
    load_recipe(raw)  # max_steps given: fine
    del raw["train"]["max_steps"]
    with pytest.raises(ValueError, match=r"data.streaming: .* set train.max_steps"):
        load_recipe(raw)
    raw["data"]["streaming"] = "maybe"
    with pytest.raises(ValueError, match="data.streaming"):
        load_recipe(raw)


def test_streaming_training_equals_in_memory_on_the_same_blocks(tiny_models, nodrop_student, data_dir, tmp_path):
    """4 blocks, batch 4, SGD: every step sees the same 4 blocks whether they are streamed (in order) or held
    (shuffled), so both runs end with the same weights; the streamed run's card says so."""
    from stillroom.training.run import train

    common = ["data.max_blocks=4", "train.max_steps=2", "train.batch_size=4", "train.optimizer=sgd",
              "train.max_grad_norm=0", "train.lr=0.5", f"student={nodrop_student}"]
    raw = _base(tiny_models, data_dir, tmp_path / "mem")
    mem = _params(train(load_recipe(raw, common)).model)
    raw = _base(tiny_models, data_dir, tmp_path / "stream", data={"streaming": True})
    res = train(load_recipe(raw, common))
    streamed = _params(res.model)
    assert [h["step"] for h in res.history if "loss" in h] == [1, 2]
    for k in mem:
        torch.testing.assert_close(streamed[k], mem[k], atol=2e-6, rtol=1e-4)
    assert "streamed blocks" in (tmp_path / "stream" / "README.md").read_text()


def test_exported_blocks_equal_make_blocks(tiny_models, data_dir, tmp_path):
    from stillroom.inputs.blocks import make_blocks
    from stillroom.inputs.text import load_texts
    from stillroom.models.student import student_tokenizer
    from stillroom.training.data import export_training_blocks

    for cap in (None, 5):
        r = load_recipe(_base(tiny_models, data_dir, tmp_path / "o", data={"documents": "paragraph",
                                                                            "max_blocks": cap}))
        n = export_training_blocks(r, tmp_path / "b.jsonl", overwrite=True)
        ref = make_blocks(load_texts(data_dir / "train.txt", documents="paragraph"), student_tokenizer(r.student),
                          SEQ)[:cap]
        rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text(encoding="utf-8").splitlines()]
        assert n == len(ref) and rows == [{"id": b.example_id, "text": b.text} for b in ref]


def test_two_process_ddp_streaming_equals_one_process(tiny_models, nodrop_student, data_dir, tmp_path):
    """torchrun 2 × batch 2 over streamed blocks (each rank reads the stream and keeps its own batches) ends
    with the weights of one process with batch 4 over the same stream: no block lost or seen twice."""
    from stillroom.training.run import train

    raw = _base(tiny_models, data_dir, tmp_path / "o", data={"streaming": True})
    raw["student"] = str(nodrop_student)
    common = ["train.max_steps=2", "train.optimizer=sgd", "train.max_grad_norm=0", "train.lr=0.5"]
    torchrun_train(tmp_path, raw, DDP_SCRIPT, "train.batch_size=2", *common)
    assert (tmp_path / "rank0.sha").read_text() == (tmp_path / "rank1.sha").read_text()
    from transformers import AutoModelForCausalLM

    ddp = AutoModelForCausalLM.from_pretrained(tmp_path / "o").state_dict()
    raw["train"]["output_dir"] = str(tmp_path / "single")
    single = _params(train(load_recipe(raw, ["train.batch_size=4", *common])).model)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-4)


def test_support_temperature_reshapes_the_target_inside_its_support_only(tiny_models, data_dir, tmp_path):
    """``loss.support_temperature: 2``: every valid row of the trainer's target is the T = 1 row with its entries
    raised to 1/2 and renormalised to the same support mass (written out here with numpy); ids, tail and valid
    rows are unchanged."""
    import numpy as np

    plain, _ = _trainer(tiny_models, data_dir, tmp_path / "a", overrides=["fusion.top_k=5"])
    soft, _ = _trainer(tiny_models, data_dir, tmp_path / "b", overrides=["fusion.top_k=5", "loss.support_temperature=2"])
    batch = plain.data_collator([plain.train_dataset[i] for i in range(2)])
    a, b = plain.fused_target(batch), soft.fused_target(batch)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.valid, b.valid) and torch.equal(a.tail, b.tail)
    pa, pb = a.logprobs.double().exp().numpy(), b.logprobs.double().exp().numpy()
    checked = 0
    for r, t in zip(*np.nonzero(a.valid.numpy()), strict=True):
        p = pa[r, t]
        w = np.sqrt(p)
        np.testing.assert_allclose(pb[r, t], p.sum() * w / w.sum(), rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked > 50 and not np.allclose(pa[a.valid.numpy()], pb[a.valid.numpy()])
