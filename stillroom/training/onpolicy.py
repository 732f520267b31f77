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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stillroom.generation import rollout
from stillroom.inputs import chat
from stillroom.training.trainer import DistillTrainer


@dataclass
class OnPolicyConfig:
    """``fraction`` is λ; rows are at most ``max_len`` tokens (prompts keep their last ``max_len −
    max_new_tokens``)."""

    fraction: float = 0.5
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    max_len: int | None = None


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
    """The batch rebuilt on the student's samples (issue 16's format): ``prompt + sample.ids``, labels on the
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

    def __init__(self, *args, onpolicy: OnPolicyConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.onpolicy = onpolicy
        self._coins: list[bool] = []

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
        c = self.onpolicy
        step = self.state.global_step  # the step these batches are for (resumed runs restore it)
        if not batches or not coin(c.seed, step, c.fraction):
            self._coins.append(False)
            return batches, n
        self._coins.append(True)
        rank = self.args.process_index
        batches = [self.rollout(b, sample_seed(c.seed, step, rank, i)) for i, b in enumerate(batches)]
        return batches, self._get_num_items_in_batch(batches, device)

    def rollout(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        """``batch`` with its completions replaced by the student's samples for its prompts."""
        c = self.onpolicy
        model = self.accelerator.unwrap_model(self.model)
        tok = self.processing_class
        keep = c.max_len - c.max_new_tokens if c.max_len else None
        prompts = batch_prompts(batch, keep)
        with self.autocast_smart_context_manager():
            samples = rollout.sample(model, tok, prompts, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                     top_p=c.top_p, do_sample=True, generator_seed=seed)
        return student_batch(batch, prompts, samples, _pad_id(tok))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._coins and "loss" in logs:
            logs["onpolicy"] = sum(self._coins) / len(self._coins)
            self._coins = []
        super().log(logs, *args, **kwargs)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


class PromptCollator:
    """Examples (completions optional, ignored) -> a batch of prompts with empty completions, for λ = 1 where
    every batch is replaced by the student's samples. Prompts keep their last ``max_len − max_new_tokens``."""

    def __init__(self, tokenizer, max_len: int, max_new_tokens: int):
        self.tokenizer, self.max_len, self.keep = tokenizer, int(max_len), int(max_len) - int(max_new_tokens)
        self.pad_id = _pad_id(tokenizer)

    def __call__(self, examples: list[chat.Example]) -> dict[str, Any]:
        rows = [{"prompt_ids": chat.prompt_ids(self.tokenizer, ex)[-self.keep:], "completion_ids": [],
                 "completion": "", "ended": False, "example": ex} for ex in examples]
        return chat.collate_rows(rows, self.pad_id)


def config(recipe) -> OnPolicyConfig:
    """The recipe's ``onpolicy`` section as an :class:`OnPolicyConfig` (seed: ``train.seed`` when unset)."""
    o = recipe.onpolicy
    seed = recipe.train.seed if o.seed is None else o.seed
    return OnPolicyConfig(o.lambda_, o.temperature, o.top_p, o.max_new_tokens, seed, recipe.data.seq_len)


def training_data(recipe, tokenizer):
    """The recipe's examples, collator and evaluation examples (``stillroom.training.build.training_data``); with
    ``onpolicy.lambda`` = 1 the data may be prompt-only and the collator is :class:`PromptCollator`."""
    o, d = recipe.onpolicy, recipe.data
    if o is None or o.lambda_ < 1:
        return chat.training_data(recipe, tokenizer)
    train = chat.load_examples(d.train, need_completion=False)[: d.max_blocks or None]
    evals = chat.load_examples(d.eval)[: recipe.train.eval_max_blocks or None] if d.eval else None
    return chat.ExampleDataset(train), PromptCollator(tokenizer, d.seq_len, o.max_new_tokens), evals


def trainer_class(recipe):
    """:class:`OnPolicyTrainer` bound to the recipe's settings, or :class:`DistillTrainer` without ``onpolicy``."""
    if recipe.onpolicy is None:
        return DistillTrainer
    import functools

    return functools.partial(OnPolicyTrainer, onpolicy=config(recipe))
