"""A recipe, run: validated, built, trained, evaluated and saved (``stillroom train``).

:func:`train` is the whole life of a run around :class:`~stillroom.training.trainer.DistillTrainer`: checks
before any model loads, the output folder (resume or refuse), data and teachers
(:mod:`stillroom.training.build`), the trainer (on-policy for completion data with ``onpolicy``), Ctrl-C as
:class:`~stillroom.training.runs.TrainInterrupted`, and the saved student with its model card and curves.
"""

from __future__ import annotations

import os
import sys

import torch

from stillroom.inputs.blocks import BlockCollator, BlockDataset, cap_documents
from stillroom.models.student import build_student, describe_student
from stillroom.teachers.kd import SameTokenizerTeacher
from stillroom.training import runs, switches
from stillroom.training.build import build_teachers, streaming_blocks, training_blocks
from stillroom.training.plan import check_recipe
from stillroom.training.trainer import DistillTrainer, FusionConfig, LossConfig, TrainResult


def training_arguments(recipe, has_eval: bool):
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
    """Run a recipe (a :class:`~stillroom.training.recipe.Recipe`, a dict or a YAML path) end to end.

    Validates (recipe, tokenizers, caches, the output folder: see :func:`stillroom.training.runs.prepare_output_dir`)
    before loading any model; then builds blocks, teachers and a :class:`DistillTrainer`; trains (resuming when
    ``train.resume``; a finished run is returned as it is, with ``model=None``); evaluates once; saves the
    student, a model card, ``metrics.jsonl`` and ``loss_curve.png`` in ``train.output_dir``. Ctrl-C raises
    :class:`stillroom.training.runs.TrainInterrupted` (step reached, last checkpoint).
    """
    from pathlib import Path

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from stillroom.inputs.text import load_texts
    from stillroom.training.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe) or overrides:
        recipe = load_recipe(recipe, overrides)
    toks = check_recipe(recipe)
    if runs.is_main_process():
        for note in toks["warnings"]:  # switches that work but slowly: said before anything loads
            print(f"warning: {note}", file=sys.stderr)
    out = Path(recipe.train.output_dir)
    done = runs.prepare_output_dir(recipe, overwrite)
    if done is not None:  # resuming a finished run: nothing to train, nothing to replace
        return TrainResult(str(out), done.get("metrics", {}), runs.read_history(out / "metrics.jsonl"), None)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    show = recipe.train.progress and runs.is_main_process()
    tok = toks["student"]
    seq = recipe.data.seq_len
    d = recipe.data
    if d.format != "text":  # prompt/completion or chat records: completion-only batches (stillroom.inputs.chat)
        from stillroom.training import (
            onpolicy,  # chat.training_data, or prompts for the student's samples (onpolicy)
        )

        blocks, collator, eval_docs = onpolicy.training_data(recipe, tok)
    else:
        blocks = streaming_blocks(recipe, tok) if d.streaming else BlockDataset(training_blocks(recipe, tok))
        collator, eval_docs = BlockCollator(tok, seq, d.isolate_documents), None
    if d.eval and d.format == "text":
        eval_docs = [t for _, t in load_texts(d.eval, d.text_field, d.documents)]
        if recipe.train.eval_max_blocks:
            eval_docs = cap_documents(eval_docs, tok, recipe.train.eval_max_blocks * seq)
    args = training_arguments(recipe, eval_docs is not None)
    from transformers import set_seed

    trainer = None
    try:
        with runs.quiet_transformers_bars():
            set_seed(recipe.train.seed)
            with runs.phase("loading the student and teachers", enabled=show):
                student = build_student(recipe.student, tok)
                teachers = build_teachers(recipe, toks)
            if runs.is_main_process():  # which kind of student: said once, never silent
                runs.say(f"{describe_student(recipe.student, student)}; {switches.describe(recipe.train)}")
            if recipe.fusion.include_student:  # FuseLLM lets the target model's own distribution compete too
                import copy

                teachers.append(SameTokenizerTeacher(copy.deepcopy(student), recipe.fusion.top_k,
                                                     recipe.loss.temperature, "student@init"))
            cbs = [runs.MetricsJsonlCallback(out / "metrics.jsonl")] + (callbacks or [])
            if recipe.train.progress:
                cbs.append(runs.RichProgressCallback())
            r = recipe.loss
            loss = LossConfig(r.kind, r.ce_weight if teachers else 1.0, r.temperature, r.beta, r.alpha, r.chunk_size,
                              r.emo_mode, r.emo_cost)
            fusion = FusionConfig(recipe.fusion.method, recipe.fusion.level, recipe.fusion.weight_temperature, None)
            cls = onpolicy.trainer_class(recipe) if d.format != "text" else DistillTrainer
            trainer = cls(model=switches.apply(student, recipe.train), args=args, train_dataset=blocks,
                                     eval_dataset=eval_docs,
                                     data_collator=collator, processing_class=tok,
                                     teachers=teachers,
                                     loss=loss, fusion=fusion, callbacks=cbs)
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
            with runs.phase("saving the student", enabled=show):
                trainer.save_model(str(out))
                if trainer.is_world_process_zero():
                    tok.save_pretrained(out)
                    runs.atomic_write_text(out / "README.md", runs.model_card(recipe, metrics, "streamed" if d.streaming else len(blocks), trainer.model))
                    history = [dict(h) for h in trainer.state.log_history]
                    if recipe.train.plot:
                        runs.plot_losses(history, out / "loss_curve.png")
                    runs.write_marker(out, recipe, finished=True, step=trainer.state.global_step, metrics=metrics)
    except KeyboardInterrupt:
        cb = runs.progress_callback(trainer) if trainer is not None else None
        if cb is not None:
            cb.stop()
        if runs.is_main_process():
            runs.drop_incomplete_checkpoints(out)
        raise runs.TrainInterrupted(trainer.state.global_step if trainer is not None else 0,
                                    runs.last_checkpoint(out)) from None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has saved the student before any rank returns (and exits)
    return TrainResult(str(out), metrics, [dict(h) for h in trainer.state.log_history], trainer.model)
