"""On-policy distillation: train on the student's own samples, graded by the teachers.

Generalised knowledge distillation (GKD, Agarwal et al. 2024): off-policy KD trains the student on fixed
completions, but at inference it conditions on its *own* text — a train/inference mismatch. GKD mixes in
student-generated completions: with probability λ an optimizer step's completions are sampled from the
student (``y ~ p_S(· | x)``, temperature τ, nucleus top-p), the teachers score those tokens, and the divergence
is taken on the student's own text

    L(θ) = E_x [ (1 − λ) · E_{y ~ data} D(p_T ‖ p_S^θ)(y | x)  +  λ · E_{y ~ p_S} D(p_T ‖ p_S^θ)(y | x) ]

with no gradient through the sampling. Here D is the recipe's loss (``loss.kind``, fused over the teachers,
with ``loss.ce_weight`` of CE on the completion tokens: GKD proper uses ``ce_weight: 0``, e.g. with
``kind: jsd``). Teachers of the student's tokenizer run on the sampled ids; the others re-render the prompt
with their own template, tokenize the sampled *text* and are aligned back to the student's completion tokens
(``stillroom.inputs.chat``) — so any mix of same- and cross-tokenizer teachers grades the samples.

How it plugs into the ``transformers.Trainer``: :class:`OnPolicyTrainer` overrides ``get_batch_samples``, where
the Trainer fetches an optimizer step's micro-batches *before* counting their labelled tokens (the N that
divides the loss), and replaces each micro-batch by :func:`student_batch` of the student's samples for its
prompts. Everything after — the teachers, the loss, gradient accumulation, DDP, checkpoints — is the ordinary
:class:`~stillroom.training.trainer.DistillTrainer`. The λ coin is a function of (seed, optimizer step) and the sampling
seed of (seed, step, rank, micro-batch), so every rank takes the same choice without talking, and a run
resumed from a checkpoint takes exactly the choices (and draws) of the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stillroom.generation import rollout
from stillroom.inputs import chat
from stillroom.tokenization.special import pad_id
from stillroom.training.recipe import OnPolicySpec
from stillroom.training.trainer import DistillTrainer


def coin(seed: int, step: int, fraction: float) -> bool:
    """Is optimizer step ``step`` trained on student samples? A uniform draw from (seed, step) below λ."""
    return bool(np.random.default_rng([seed, step]).random() < fraction)


def sample_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The sampling seed of micro-batch ``micro`` of step ``step`` on rank ``rank``."""
    return int(np.random.default_rng([seed, step, rank, micro]).integers(2**62))


def batch_prompts(batch: dict[str, Any], keep: int | None = None) -> list[list[int]]:
    """Each row's student prompt ids (``input_ids[r, :prompt_len[r]]``), its last ``keep`` tokens when given."""
    ids = batch["input_ids"].cpu()
    out = []
    for r, n in enumerate(batch["prompt_len"].tolist()):
        p = ids[r, :n].tolist()
        out.append(p[-keep:] if keep else p)
    return out


def student_batch(batch: dict[str, Any], prompts: list[list[int]], samples: list[rollout.Sample],
                  pad_id: int) -> dict[str, Any]:
    """The batch rebuilt on the student's samples (the completion-batch format): ``prompt + sample.ids``, labels on the
    sampled tokens (the end token included when the sample ended), the sampled text as ``completion``, and
    ``sampled: True`` — so rows no teacher reaches stay out of the divergence instead of getting the one-hot on
    the gold next token (here the student's own sample: that fill would teach it to copy itself)."""
    rows = [{"prompt_ids": p, "completion_ids": s.ids, "completion": s.text, "ended": s.ended, "example": ex}
            for p, s, ex in zip(prompts, samples, batch["example"], strict=True)]
    return {**chat.collate_rows(rows, pad_id), "sampled": True}


class OnPolicyTrainer(DistillTrainer):
    """:class:`~stillroom.training.trainer.DistillTrainer` whose optimizer steps are, with probability λ, on the
    student's own samples (see the module docstring). Batches come from :class:`chat.CompletionCollator` (or
    :class:`PromptCollator` when λ = 1). Logs ``onpolicy``: the share of steps since the last log that were
    sampled."""

    def __init__(self, *args, onpolicy: OnPolicySpec | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.onpolicy = onpolicy if onpolicy is not None else OnPolicySpec()
        self.seed = self.args.seed if self.onpolicy.seed is None else self.onpolicy.seed  # λ coin and samples
        self.max_len = getattr(self.data_collator, "max_len", None)  # rows: prompt + completion tokens
        self._coins: list[bool] = []

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
        c = self.onpolicy
        step = self.state.global_step  # the step these batches are for (resumed runs restore it)
        if not batches or not coin(self.seed, step, c.lambda_):
            self._coins.append(False)
            return batches, n
        self._coins.append(True)
        rank = self.args.process_index
        batches = [self.rollout(b, sample_seed(self.seed, step, rank, i)) for i, b in enumerate(batches)]
        return batches, self._get_num_items_in_batch(batches, device)

    def rollout(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        """``batch`` with its completions replaced by the student's samples for its prompts."""
        c = self.onpolicy
        model = self.accelerator.unwrap_model(self.model)
        tok = self.processing_class
        keep = self.max_len - c.max_new_tokens if self.max_len else None
        prompts = batch_prompts(batch, keep)
        with self.autocast_smart_context_manager():
            samples = rollout.sample(model, tok, prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                     top_p=c.top_p, do_sample=True, generator_seed=seed)
        return student_batch(batch, prompts, samples, pad_id(tok))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._coins and "loss" in logs:
            logs["onpolicy"] = sum(self._coins) / len(self._coins)
            self._coins = []
        super().log(logs, *args, **kwargs)


