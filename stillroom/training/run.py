"""A recipe, run: planned, built, trained, evaluated and saved (``stillroom train``).

:func:`train` is the whole life of a run, one way down: the recipe becomes a checked
:class:`~stillroom.training.plan.Plan` before any model loads; the output folder is claimed (resume or refuse);
the data (:mod:`stillroom.training.data`) and teachers (:mod:`stillroom.training.build`) are built from the plan;
the trainer (:class:`~stillroom.training.trainer.DistillTrainer`, or
:class:`~stillroom.training.onpolicy.OnPolicyTrainer` with ``onpolicy``) trains; Ctrl-C ends as
:class:`~stillroom.training.runs.TrainInterrupted`; the student is saved with its model card and curves.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stillroom.files import atomic_write
from stillroom.models.lora import is_lora, merge_lora
from stillroom.models.student import build_student, describe_student
from stillroom.progress import phase, say
from stillroom.teachers.kd import SameTokenizerTeacher
from stillroom.training import report, runs, switches
from stillroom.training.build import build_teachers
from stillroom.training.callbacks import (
    MetricsJsonlCallback,
    RichProgressCallback,
    progress_callback,
    quiet_transformers_bars,
)
from stillroom.training.data import training_data
from stillroom.training.onpolicy import OnPolicyTrainer
from stillroom.training.plan import Plan, make_plan
from stillroom.training.trainer import DistillTrainer


@dataclass
class TrainResult:
    """What :func:`train` returns: the output folder, the final metrics, the logged history and the student
    (None when a finished run was resumed: nothing was trained)."""

    output_dir: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None


def training_arguments(recipe, has_eval: bool):
    """The ``transformers.TrainingArguments`` of the recipe's ``train`` section (and streaming data)."""
    from transformers import TrainingArguments

    t = recipe.train
    return TrainingArguments(
        output_dir=t.output_dir, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, optim=t.optimizer, seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no", eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, report_to=t.report_to or "none", remove_unused_columns=False,
        disable_tqdm=True, dataloader_num_workers=0, average_tokens_across_devices=True,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1) else None,
        # streamed blocks: each rank reads the stream and accelerate's IterableDatasetShard keeps its batches
        # (dispatching from rank 0 would broadcast the batches' texts, which are not tensors)
        accelerator_config={"dispatch_batches": False} if recipe.data.streaming else None,
        **switches.training_kwargs(t),  # precision, gradient checkpointing
    )


def train(recipe, overrides: list[str] | tuple[str, ...] = (), callbacks: list | None = None,
          overwrite: bool = False) -> TrainResult:
    """Run a recipe (a :class:`~stillroom.training.recipe.Recipe`, a dict, a YAML path, or a checked
    :class:`~stillroom.training.plan.Plan`) end to end.

    Checks everything before loading any model (:func:`~stillroom.training.plan.make_plan`, then the output
    folder: :func:`~stillroom.training.runs.prepare_output_dir`); builds data, teachers and the trainer; trains
    (resuming when ``train.resume``; a finished run is returned as it is, with ``model=None``); evaluates once;
    saves the student, a model card, ``metrics.jsonl`` and ``loss_curve.png`` in ``train.output_dir``. Ctrl-C
    raises :class:`~stillroom.training.runs.TrainInterrupted` (step reached, last checkpoint).
    """
    plan = recipe if isinstance(recipe, Plan) and not overrides else make_plan(
        recipe.recipe if isinstance(recipe, Plan) else recipe, overrides)
    recipe = plan.recipe
    if runs.is_main_process():
        for note in plan.warnings:  # switches that work but slowly: said before anything loads
            say(f"warning: {note}")
    out = Path(recipe.train.output_dir)
    done = runs.prepare_output_dir(recipe, overwrite)
    if done is not None:  # resuming a finished run: nothing to train, nothing to replace
        return TrainResult(str(out), done.get("metrics", {}), runs.read_history(out / "metrics.jsonl"), None)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    show = recipe.train.progress and runs.is_main_process()
    tok = plan.student_tokenizer
    dataset, collator, eval_docs = training_data(recipe, tok)
    args = training_arguments(recipe, eval_docs is not None)
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = None
    try:
        with quiet_transformers_bars():
            set_seed(recipe.train.seed)
            with phase("loading the student and teachers", enabled=show):
                student = build_student(recipe.student, tok)
                teachers = build_teachers(plan)
            if runs.is_main_process():  # which kind of student: said once, never silent
                say(f"{describe_student(recipe.student, student)}; {switches.describe(recipe.train)}")
            if recipe.fusion.include_student:  # FuseLLM lets the target model's own distribution compete too
                teachers.append(SameTokenizerTeacher(copy.deepcopy(student), recipe.fusion.top_k,
                                                     recipe.loss.temperature, "student@init"))
            cbs = [MetricsJsonlCallback(out / "metrics.jsonl"), *(callbacks or [])]
            if recipe.train.progress:
                cbs.append(RichProgressCallback())
            loss = recipe.loss if teachers else recipe.loss.model_copy(update={"ce_weight": 1.0})
            kwargs = {"onpolicy": recipe.onpolicy} if recipe.onpolicy is not None else {}
            cls = OnPolicyTrainer if recipe.onpolicy is not None else DistillTrainer
            trainer = cls(model=switches.apply(student, recipe.train), args=args, train_dataset=dataset,
                          eval_dataset=eval_docs, data_collator=collator, processing_class=tok, teachers=teachers,
                          loss=loss, fusion=recipe.fusion, callbacks=cbs, **kwargs)
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
            resume = recipe.train.resume
            if resume is True and runs.last_checkpoint(out) is None:
                resume = False
            if resume is True:
                resume = str(out / f"checkpoint-{runs.last_checkpoint(out)}")
            if resume is False and trainer.is_world_process_zero() and (out / "metrics.jsonl").exists():
                (out / "metrics.jsonl").unlink()
            result = trainer.train(resume_from_checkpoint=resume or None)
            metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
            if eval_docs:  # once: reuse the evaluation the last step already logged
                last = [h for h in trainer.state.log_history
                        if "eval_loss" in h and h.get("step") == trainer.state.global_step]
                metrics.update({k: v for k, v in last[-1].items() if k.startswith("eval_")} if last
                               else trainer.evaluate())
            with phase("saving the student", enabled=show):
                if is_lora(trainer.accelerator.unwrap_model(trainer.model)):  # the adapter, and the merged student
                    if trainer.is_world_process_zero():
                        adapted = trainer.accelerator.unwrap_model(trainer.model)
                        adapted.save_pretrained(out / "adapter")
                        merge_lora(adapted).save_pretrained(out)
                else:
                    trainer.save_model(str(out))
                if trainer.is_world_process_zero():
                    # the Trainer pickles its arguments beside the weights; the student folder holds no pickle
                    # (the recipe and the run marker record the settings)
                    (out / "training_args.bin").unlink(missing_ok=True)
                    tok.save_pretrained(out)
                    n_blocks = "streamed" if recipe.data.streaming else len(dataset)
                    atomic_write(out / "README.md", report.model_card(recipe, metrics, n_blocks, trainer.model))
                    history = [dict(h) for h in trainer.state.log_history]
                    if recipe.train.plot:
                        report.plot_losses(history, out / "loss_curve.png")
                    runs.write_marker(out, recipe, finished=True, step=trainer.state.global_step, metrics=metrics)
    except KeyboardInterrupt:
        cb = progress_callback(trainer) if trainer is not None else None
        if cb is not None:
            cb.stop()
        if runs.is_main_process():
            runs.drop_incomplete_checkpoints(out)
        raise runs.TrainInterrupted(trainer.state.global_step if trainer is not None else 0,
                                    runs.last_checkpoint(out)) from None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has saved the student before any rank returns (and exits)
    return TrainResult(str(out), metrics, [dict(h) for h in trainer.state.log_history], trainer.model)
