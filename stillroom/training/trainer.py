"""Distillation and multi-teacher fusion on ``transformers.Trainer``.

The loss (FuseLLM, Wan et al. 2024, eq. 4) per student position i that has a gold next token:
    L = (1/N) * sum_i [ λ · CE(y_i, q_i) + (1 − λ) · D(p_fused,i ‖ q_i) · valid_i ]

with N the number of labelled positions in the *whole* optimizer step (all micro-batches, all ranks), so
gradient accumulation and data parallelism give the same update as one big batch. ``p_fused`` is the fused
top-k teacher target (``stillroom.teachers.fusion``) and D any stillroom divergence. The loss is computed by the
chunked fused-linear kernel from the student's last hidden states and its ``lm_head`` weight, so no
batch × sequence × vocabulary tensor is built.

Everything else — checkpoints, resume, logging backends, accelerate / DeepSpeed / FSDP — is the Hugging Face
``Trainer``'s. Usable from a script::
    blocks = make_blocks(load_texts("corpus.txt"), student_tok, seq_len=128)
    teachers = [SameTokenizerTeacher(teacher_model, top_k=10)]
    trainer = DistillTrainer(model=student, args=TrainingArguments(...), train_dataset=BlockDataset(blocks),
                             data_collator=BlockCollator(student_tok, 128), teachers=teachers,
                             loss=LossSpec(kind="forward_kl", ce_weight=0.9))
    trainer.train()
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from transformers import Trainer

from stillroom import losses
from stillroom.evaluation import document_sums as score
from stillroom.inputs import chat
from stillroom.inputs.blocks import (
    model_inputs,
)
from stillroom.models import lora, runtime
from stillroom.targets import SparseTarget
from stillroom.teachers import objectives
from stillroom.teachers.fusion import fuse, fusion_weights, votes
from stillroom.teachers.kd import SameTokenizerTeacher, next_labels
from stillroom.training import runs
from stillroom.training.callbacks import eval_phase
from stillroom.training.recipe import FusionSpec, LossSpec

# --- the trainer --------------------------------------------------------------------------------------------


def last_hidden(model, inputs: dict[str, Any]) -> torch.Tensor:
    """The student's final hidden states (input of ``lm_head``), taken by a hook on the base model while the
    forward goes through the (possibly DDP/FSDP-wrapped) model with ``logits_to_keep=1``: the full logits are
    never materialised and the wrapper's gradient hooks still run."""
    from transformers.modeling_utils import unwrap_model

    base = lora.base_model(unwrap_model(model)).base_model  # the decoder body (inside a LoRA wrapper too)
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = base.register_forward_hook(hook)
    try:
        model(**model_inputs(inputs), logits_to_keep=1)
    finally:
        handle.remove()
    return seen["h"]


def _keep_columns(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The caller's ``TrainingArguments`` with ``remove_unused_columns=False`` (text and example ids must reach
    ``compute_loss``), as a copy: the caller's object is left as it was."""
    if "args" in kwargs:
        a = kwargs["args"]
        if a is not None and getattr(a, "remove_unused_columns", False):
            kwargs = {**kwargs, "args": copy.copy(a)}
            kwargs["args"].remove_unused_columns = False
    elif len(args) > 1 and getattr(args[1], "remove_unused_columns", False):
        a = copy.copy(args[1])
        a.remove_unused_columns = False
        args = (args[0], a, *args[2:])
    return args, kwargs


class DistillTrainer(Trainer):
    """``transformers.Trainer`` whose loss is λ·CE + (1−λ)·D(fused teacher targets ‖ student).

    ``teachers``: objects following :class:`Teacher` (empty = plain CE, or EMO with ``loss.kind="emo"``).
    Teacher models are frozen, put in eval mode and placed on the training device (wrapped by accelerate in
    evaluation mode under DeepSpeed/FSDP so they are sharded too). Batches come from :class:`BlockCollator`.
    ``fast_activations`` (default on): the student's Python-level tanh-GELU modules are swapped, in place, for
    PyTorch's fused kernel of the same formula (see :mod:`stillroom.models.runtime`); its config and saved weights
    are unchanged.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, teachers: list | None = None, loss: LossSpec | None = None,
                 fusion: FusionSpec | None = None, fast_activations: bool = True, **kwargs):
        args, kwargs = _keep_columns(args, kwargs)
        super().__init__(*args, **kwargs)
        if fast_activations:
            runtime.fast_activations(self.model)
        self.loss_cfg = loss if loss is not None else LossSpec()
        self.fusion_cfg = fusion if fusion is not None else FusionSpec()
        # kd teachers (fused into one target) / ALM (several: fused into one term), ULD terms
        self.teachers, self.extra = objectives.split_teachers(list(teachers or []), self.fusion_cfg)
        if self.loss_cfg.kind != "emo" and not self.teachers + self.extra and self.loss_cfg.ce_weight != 1.0:
            raise ValueError("DistillTrainer: no teachers, so loss.ce_weight must be 1.0 (plain CE) "
                             "or loss.kind must be 'emo'")
        self.emo_cost = None
        self._fusion_share: torch.Tensor | None = None
        self._step_ce: torch.Tensor | None = None  # Σ CE of the last training micro-batch, when λ·CE is not all
        self._parts: torch.Tensor | None = None  # [Σ ce, Σ loss] per step since the last log (logged as ce, kd)
        self._parts_from: int | None = None
        if self.loss_cfg.kind == "emo" and self.loss_cfg.emo_cost == "fixed":
            head = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight
            self.emo_cost = head.detach().clone()
        for t in self.teachers:
            m = getattr(t, "model", None)
            if isinstance(m, torch.nn.Module):
                runtime.freeze_teacher(m)
                if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                    t.model = self.accelerator.prepare_model(m, evaluation_mode=True)
                else:
                    t.model = m.to(self.args.device)

    # Count the labelled positions of the whole optimizer step (all micro-batches; all ranks when
    # average_tokens_across_devices), whatever the model's loss kwargs: this is N in the module docstring.
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        n = sum(b["labels"][..., 1:].ne(-100).sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    def fused_target(self, inputs: dict[str, Any]) -> SparseTarget:
        """Every teacher's target over the student's positions, fused (``stillroom.teachers.fusion.fuse``); rows no
        teacher reached get the one-hot gold next token (FuseLLM's fallback), except on the student's own
        samples (``sampled`` batches, :mod:`stillroom.training.onpolicy`), where they stay invalid (no divergence).
        ``loss.support_temperature`` sets the fused target's spread within its support (``SparseTarget.soften_support``)."""
        targets, ces = [], []
        for t in self.teachers:
            tgt, ce = t.targets(inputs)
            targets.append(tgt.to(inputs["input_ids"].device))
            ces.append(ce.to(inputs["input_ids"].device))
        f = self.fusion_cfg
        if len(targets) > 1:  # how much of the fused target each teacher supplied (logged as fusion_share/NAME)
            vote = torch.stack([votes(t, c) for t, c in zip(targets, ces, strict=True)])
            w = fusion_weights(ces, vote, f.method, f.level, f.weight_temperature).detach()
            share = w.flatten(1).sum(1).cpu()
            self._fusion_share = share if self._fusion_share is None else self._fusion_share + share
        fused = fuse(targets, ces, f.method, f.level, weight_temperature=f.weight_temperature, top_k=f.fused_top_k)
        fused = fused.soften_support(self.loss_cfg.support_temperature)
        if inputs.get("sampled") or not f.fill_uncovered:  # a sample's gold is the student's own token
            return fused
        return fused.fill_onehot(next_labels(inputs["labels"]))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._parts is not None and "loss" in logs:  # the loss's parts, averaged like HF averages `loss`
            parts = self._parts if self.args.world_size == 1 else self.accelerator.gather(self._parts[None]).mean(0)
            ce, total, *terms = (parts / max(1, self.state.global_step - self._parts_from)).tolist()
            logs["ce"] = ce  # then kd (the fused term) and alm/NAME, uld/NAME
            logs.update(objectives.term_logs(self.extra, terms, ce, total, self.loss_cfg.ce_weight,
                                             bool(self.teachers) and self.loss_cfg.kind != "emo"))
            self._parts = self._parts_from = None
        if self._fusion_share is not None and "loss" in logs:
            total = float(self._fusion_share.sum()) or 1.0
            for t, v in zip(self.teachers, self._fusion_share.tolist(), strict=True):
                logs[f"fusion_share/{t.name}"] = v / total
            self._fusion_share = None
        super().log(logs, *args, **kwargs)

    def loss_sum(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """Σ over labelled positions of λ·CE + (1−λ)·D (not yet divided by N). In training with λ < 1 or EMO,
        Σ CE alone goes to ``_step_ce`` (from the same chunked pass; EMO: one more head pass, no gradient):
        logged as ``ce``, with ``kd`` = (loss − λ·ce) / (1 − λ)."""

        hidden = last_hidden(model, inputs)[:, :-1]
        labels = inputs["labels"][:, 1:]
        H = hidden.shape[-1]
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        h, y = hidden.reshape(-1, H), labels.reshape(-1)
        c = self.loss_cfg
        if not model.training or (not self.teachers + self.extra and c.kind != "emo"):  # evaluation reports CE
            return losses.fused_linear_distill_loss(h, weight, labels=y, ce_weight=1.0, chunk_size=c.chunk_size,
                                                    reduction="sum")
        self._step_ce = None
        parts: dict[str, torch.Tensor] = {}  # the CE part on its own, for the logs, from the loss's own pass
        if c.kind == "emo":  # (EMO's loss does not report it: one more head pass, no gradient)
            with torch.no_grad():
                self._step_ce = losses.fused_linear_distill_loss(h.detach(), weight.detach(), labels=y, ce_weight=1.0,
                                                                 chunk_size=c.chunk_size, reduction="sum")
        if c.kind == "emo":  # EMO (Ren et al. 2023) vs the gold token, MLE mixed in per c.emo_mode
            cost = self.emo_cost if c.emo_cost == "fixed" else None
            return losses.fused_linear_emo_loss(h, weight, cost, labels=y, mode=c.emo_mode,
                                                chunk_size=c.chunk_size, reduction="sum")
        extra = sum((t.loss_sum(hidden, weight, inputs) for t in self.extra), torch.zeros((), device=h.device))
        if not self.teachers:  # only ALM / ULD teachers: λ·CE + Σ w·D
            ce = losses.fused_linear_distill_loss(h, weight, labels=y, ce_weight=1.0, chunk_size=c.chunk_size,
                                                  reduction="sum")
            self._step_ce = ce.detach()
            return c.ce_weight * ce + extra
        t0 = self.teachers[0]
        if len(self.teachers) == 1 and isinstance(t0, SameTokenizerTeacher) and t0.top_k is None:
            with runtime.frozen():
                th = last_hidden(t0.model, inputs)[:, :-1]
            tw = self.accelerator.unwrap_model(t0.model).get_output_embeddings().weight
            total = losses.fused_linear_distill_loss(
                h, weight, teacher_hidden=th.reshape(h.shape[0], -1), teacher_weight=tw, labels=y,
                ce_weight=c.ce_weight, kind=c.kind, temperature=c.temperature, beta=c.beta, alpha=c.alpha,
                chunk_size=c.chunk_size, reduction="sum", parts=parts)
            return self._keep_ce(total, parts) + extra
        fused = self.fused_target(inputs)
        T = fused.ids.shape[1]
        tgt = SparseTarget(fused.ids[:, : T - 1].reshape(h.shape[0], -1),
                           fused.logprobs[:, : T - 1].reshape(h.shape[0], -1),
                           fused.tail[:, : T - 1].reshape(-1),
                           (fused.valid[:, : T - 1] & labels.ne(-100)).reshape(-1))
        total = losses.fused_linear_distill_loss(
            h, weight, target=tgt, labels=y, ce_weight=c.ce_weight, kind=c.kind, temperature=c.temperature,
            beta=c.beta, alpha=c.alpha, chunk_size=c.chunk_size, reduction="sum", parts=parts)
        return self._keep_ce(total, parts) + extra

    def _keep_ce(self, total: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss_cfg.ce_weight < 1:
            self._step_ce = parts["ce"]
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total = self.loss_sum(model, inputs)
        if num_items_in_batch is None:
            num_items_in_batch = inputs["labels"][:, 1:].ne(-100).sum()
        den = num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) else max(int(num_items_in_batch), 1)
        scale = 1
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and model.training:
            scale = self.accelerator.num_processes  # DDP averages gradients over ranks
        loss = total / den * scale
        if model.training:
            ce = total.detach() if self._step_ce is None else self._step_ce
            part = torch.stack([ce.double(), total.detach().double(), *objectives.term_sums(self.extra, ce.device)]) / den * scale
            if self._parts is None:
                self._parts, self._parts_from = part, self.state.global_step
            else:
                self._parts = self._parts + part
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Student CE per token (nats) and bits per byte of the evaluation *documents* (a list of texts), scored
        exactly as ``stillroom eval`` scores them (:func:`stillroom.evaluation.evaluate`: whole documents, first
        token conditioned on BOS, sliding windows over the model's context), so the two numbers agree; of
        completion tokens and bytes for :class:`stillroom.inputs.chat.Example` s (:func:`~stillroom.evaluation.completion_sums`)."""

        docs = eval_dataset if eval_dataset is not None else self.eval_dataset
        if docs is None:
            return {}
        if not all(isinstance(d, (str, chat.Example)) for d in docs):
            raise TypeError("DistillTrainer.evaluate: eval_dataset must be a list of document texts "
                            "(stillroom.inputs.text.load_texts(...) -> [text for _, text in rows]) or chat.Examples")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        rank, world = self.args.process_index, self.args.world_size
        mine = list(docs)[rank::world]
        sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        with eval_phase(self, len(mine)) as advance:
            for doc in mine:  # one document (record: completion only) at a time: the same sums as one call
                r = score(model, self.processing_class, doc, batch_size=self.args.per_device_eval_batch_size,
                          device=self.args.device, max_len=getattr(self.data_collator, "max_len", None))
                sums += torch.tensor(r, dtype=torch.float64, device=self.args.device)
                advance()
        if world > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        model.train(was_training)
        bits, tokens, nbytes = sums.tolist()
        metrics = {f"{metric_key_prefix}_loss": bits * math.log(2) / max(tokens, 1),
                   f"{metric_key_prefix}_bpb": bits / max(nbytes, 1)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A tied lm_head is not stored in a checkpoint: its "missing" key is no news (stillroom.training.runs).
        missing = runs.untied_missing_keys(self.model, list(load_result.missing_keys))
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


# --- recipe -> run ------------------------------------------------------------------------------------------


