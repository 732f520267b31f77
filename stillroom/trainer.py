"""Distillation and multi-teacher fusion on ``transformers.Trainer``.

The loss (FuseLLM, Wan et al. 2024, eq. 4) per student position i that has a gold next token:

    L = (1/N) * sum_i [ λ · CE(y_i, q_i) + (1 − λ) · D(p_fused,i ‖ q_i) · valid_i ]

with N the number of labelled positions in the *whole* optimizer step (all micro-batches, all ranks), so
gradient accumulation and data parallelism give the same update as one big batch. ``p_fused`` is the fused
top-k teacher target (``stillroom.fusion``) and D any stillroom divergence. The loss is computed by the
chunked fused-linear kernel from the student's last hidden states and its ``lm_head`` weight, so no
batch × sequence × vocabulary tensor is built.

Everything else — checkpoints, resume, logging backends, accelerate / DeepSpeed / FSDP — is the Hugging Face
``Trainer``'s. Usable from a script::

    blocks = make_blocks(load_texts("corpus.txt"), student_tok, seq_len=128)
    teachers = [SameTokenizerTeacher(teacher_model, top_k=10)]
    trainer = DistillTrainer(model=student, args=TrainingArguments(...), train_dataset=BlockDataset(blocks),
                             data_collator=BlockCollator(student_tok, 128), teachers=teachers,
                             loss=LossConfig(kind="forward_kl", ce_weight=0.9))
    trainer.train()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import Trainer

from stillroom import modeling
from stillroom.fusion import fuse, fusion_weights, votes
from stillroom.models import load_causal_lm, load_tokenizer, resolve_model
from stillroom.student import build_student, describe_student, student_tokenizer
from stillroom.targets import SparseTarget
from stillroom.tokens import same_tokenizer

# --- data ---------------------------------------------------------------------------------------------------


@dataclass
class Block:
    """One training sequence: its raw text (what teachers re-tokenize) and the student's ids for it."""

    example_id: str
    text: str
    input_ids: list[int]


def _bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if getattr(tokenizer, "bos_token_id", None) is not None else None


def make_blocks(rows: list[tuple[str, str]], tokenizer, seq_len: int, add_bos: bool = True,
                min_tokens: int = 2) -> list[Block]:
    """Cut texts into pieces of at most ``seq_len`` student tokens, each a contiguous span of raw text.

    Every piece ends at a whitespace boundary where possible (so re-tokenizing it gives the same tokens as
    in the running text) and the whitespace between pieces is dropped. With ``add_bos`` the student's BOS
    token starts every block (so its first text token is predicted too). Block ids are
    ``"<example id>#<piece number>"``: stable keys for the offline teacher cache.
    """
    if seq_len < 4:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 4 tokens")
    bos = _bos_id(tokenizer) if add_bos else None
    budget = seq_len - (1 if bos is not None else 0)
    blocks: list[Block] = []
    for ex_id, text in rows:
        pos, piece_no, window = 0, 0, budget * 8
        while pos < len(text):
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            chunk = text[pos:pos + window]
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) <= budget and pos + window < len(text):
                window *= 2  # the window held too few tokens: look further
                continue
            if len(enc["input_ids"]) > budget:
                cut = enc["offset_mapping"][budget - 1][1]
                ws = max(chunk.rfind(" ", 0, cut + 1), chunk.rfind("\n", 0, cut + 1))
                if ws > cut // 2:
                    cut = ws
                piece = chunk[:cut]
            else:
                piece = chunk
            ids = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            if len(ids["input_ids"]) > budget:  # rare: the cut changed the tokenization; cut at a token end
                piece = piece[:ids["offset_mapping"][budget - 1][1]]
                ids = tokenizer(piece, add_special_tokens=False)
            ids = list(ids["input_ids"])[:budget]
            pos += len(piece)
            if len(ids) >= min_tokens:
                blocks.append(Block(f"{ex_id}#{piece_no}", piece, ([bos] if bos is not None else []) + ids))
                piece_no += 1
    if not blocks:
        raise ValueError("make_blocks: the data produced no blocks (all texts shorter than 2 tokens?)")
    return blocks


class BlockDataset(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Block` s (raw text travels with the ids, for the teachers)."""

    def __init__(self, blocks: list[Block]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        b = self.blocks[i]
        return {"input_ids": b.input_ids, "text": b.text, "example_id": b.example_id}


class BlockCollator:
    """Pads every block to ``seq_len`` (fixed shapes); labels are the ids with padding set to -100."""

    def __init__(self, tokenizer, seq_len: int):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        self.seq_len = seq_len

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(features)
        ids = torch.full((n, self.seq_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, self.seq_len), dtype=torch.long)
        for r, f in enumerate(features):
            x = torch.as_tensor(f["input_ids"][: self.seq_len], dtype=torch.long)
            ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "text": [f["text"] for f in features], "example_id": [f["example_id"] for f in features]}


# --- teachers -----------------------------------------------------------------------------------------------


class Teacher(Protocol):
    """Anything that gives, for a collated batch, a target over the student's positions and vocabulary
    ``[B, T, k]`` (row j predicts student token j+1) and the teacher's gold CE per student position ``[B, T]``
    (``nan`` where unknown)."""

    name: str

    def targets(self, batch: dict[str, Any]) -> tuple[SparseTarget, torch.Tensor]: ...


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: at row j the gold token that row j predicts (``labels[:, j+1]``), ``-100`` where there is none."""
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    return nxt


def topk_target(logits: torch.Tensor, labels: torch.Tensor, top_k: int | None, temperature: float = 1.0
                ) -> tuple[SparseTarget, torch.Tensor]:
    """Top-k target (``None``: all V) and gold CE from dense logits ``[B, T, V]`` on the student's own tokens."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    top = logp.topk(min(top_k or logp.shape[-1], logp.shape[-1]), -1)
    tail = (1 - top.values.exp().sum(-1)).clamp_min(0)
    nxt = next_labels(labels)
    has = nxt != -100
    logp1 = logp if temperature == 1.0 else torch.log_softmax(logits.float(), -1)  # gold CE is at tau = 1
    gold = logp1.gather(-1, nxt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ce = torch.where(has, -gold, torch.full_like(gold, float("nan")))
    return SparseTarget(top.indices, top.values, tail, has), ce


class SameTokenizerTeacher:
    """A teacher that shares the student's tokenizer: run it on the student's ids directly (no alignment).

    ``top_k=None`` with a single teacher: the full (dense) teacher distribution, computed chunk by chunk from
    the teacher's hidden states inside the fused-linear loss (teacher logits are never materialised either).
    """

    def __init__(self, model, top_k: int | None = 10, temperature: float = 1.0, name: str = "teacher"):
        self.model = modeling.freeze_teacher(model)
        self.top_k, self.temperature, self.name = top_k, temperature, name

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> tuple[SparseTarget, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return topk_target(logits, batch["labels"], self.top_k, self.temperature)


class AlignedTeacher:
    """A teacher with its own tokenizer (online, ``stillroom.cache.OnlineTeacher``) or read from the offline
    cache (``CachedTeacher``): its top-k signal is aligned and projected onto the student's positions and
    vocabulary by ``stillroom.cache.student_targets``. Rows the projection cannot transfer (the fallback's
    one-hot rows) come back ``valid=False``: the trainer fills them after fusion, so that another teacher's
    distribution is used there when it has one."""

    def __init__(self, source, student_table, teacher_table, vocab_map, fallback: str = "onehot",
                 name: str = "teacher"):
        self.source, self.student_table, self.teacher_table = source, student_table, teacher_table
        self.vocab_map, self.fallback, self.name = vocab_map, fallback, name

    @torch.no_grad()
    def targets(self, batch: dict[str, Any]) -> tuple[SparseTarget, torch.Tensor]:
        from stillroom.cache import student_targets

        outs = self.source.signal(batch["text"], batch["example_id"])
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        rows, ces = [], []
        for r, out in enumerate(outs):
            sid = ids[r][mask[r]].numpy()
            t, ce = student_targets(out, sid, self.student_table, self.teacher_table, self.vocab_map,
                                    fallback=self.fallback, fill=False)
            rows.append(t)
            ces.append(torch.as_tensor(ce, dtype=torch.float32))
        return _stack_rows(rows, ces, ids.shape[1])


def _stack_rows(rows: list[SparseTarget], ces: list[torch.Tensor], seq_len: int
                ) -> tuple[SparseTarget, torch.Tensor]:
    """Pad per-example targets ``[T_r, k_r]`` to one ``[B, seq_len, k]`` batch (padding rows invalid)."""
    k = max(t.k for t in rows)
    B = len(rows)
    ids = torch.zeros(B, seq_len, k, dtype=torch.long)
    lp = torch.full((B, seq_len, k), float("-inf"))
    tail = torch.zeros(B, seq_len)
    valid = torch.zeros(B, seq_len, dtype=torch.bool)
    ce = torch.full((B, seq_len), float("nan"))
    for r, (t, c) in enumerate(zip(rows, ces, strict=True)):
        n = min(t.ids.shape[0], seq_len)
        ids[r, :n, : t.k] = torch.as_tensor(t.ids[:n])
        lp[r, :n, : t.k] = torch.as_tensor(t.logprobs[:n]).float()
        tail[r, :n] = torch.as_tensor(t.tail[:n]).float()
        valid[r, :n] = torch.as_tensor(t.valid[:n])
        ce[r, :n] = c[:n]
    return SparseTarget(ids, lp, tail, valid), ce


# --- loss settings ------------------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """``kind``: a stillroom divergence (``forward_kl`` …) or ``"emo"``; ``ce_weight`` is λ."""

    kind: str = "forward_kl"
    ce_weight: float = 0.9
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    chunk_size: int | None = None  # None: the loss picks (about 16M logits per chunk)
    emo_mode: int | None = 1  # EMO + MLE combination (stillroom.losses.emo)
    emo_cost: str = "fixed"  # "fixed": frozen copy of the initial head; "adaptive": the current head


@dataclass
class FusionConfig:
    method: str = "min_ce"
    level: str = "sequence"
    weight_temperature: float = 1.0
    top_k: int | None = None


# --- the trainer --------------------------------------------------------------------------------------------


def _last_hidden(model, inputs: dict[str, Any]) -> torch.Tensor:
    """The student's final hidden states (input of ``lm_head``), taken by a hook on the base model while the
    forward goes through the (possibly DDP/FSDP-wrapped) model with ``logits_to_keep=1``: the full logits are
    never materialised and the wrapper's gradient hooks still run."""
    from transformers.modeling_utils import unwrap_model

    base = unwrap_model(model).base_model
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = base.register_forward_hook(hook)
    try:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1,
              use_cache=False)
    finally:
        handle.remove()
    return seen["h"]


class DistillTrainer(Trainer):
    """``transformers.Trainer`` whose loss is λ·CE + (1−λ)·D(fused teacher targets ‖ student).

    ``teachers``: objects following :class:`Teacher` (empty = plain CE, or EMO with ``loss.kind="emo"``).
    Teacher models are frozen, put in eval mode and placed on the training device (wrapped by accelerate in
    evaluation mode under DeepSpeed/FSDP so they are sharded too). Batches come from :class:`BlockCollator`.
    ``fast_activations`` (default on): the student's Python-level tanh-GELU modules are swapped, in place, for
    PyTorch's fused kernel of the same formula (see :mod:`stillroom.modeling`); its config and saved weights
    are unchanged.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, teachers: list | None = None, loss: LossConfig | None = None,
                 fusion: FusionConfig | None = None, fast_activations: bool = True, **kwargs):
        args_ = kwargs.get("args") or (args[1] if len(args) > 1 else None)
        if args_ is not None and getattr(args_, "remove_unused_columns", False):
            args_.remove_unused_columns = False  # text / example_id must reach compute_loss
        super().__init__(*args, **kwargs)
        if fast_activations:
            modeling.fast_activations(self.model)
        self.teachers = list(teachers or [])
        self.loss_cfg = loss or LossConfig()
        self.fusion_cfg = fusion or FusionConfig()
        if self.loss_cfg.kind != "emo" and not self.teachers and self.loss_cfg.ce_weight != 1.0:
            raise ValueError("DistillTrainer: no teachers, so loss.ce_weight must be 1.0 (plain CE) "
                             "or loss.kind must be 'emo'")
        self.emo_cost = None
        self._fusion_share: torch.Tensor | None = None
        if self.loss_cfg.kind == "emo" and self.loss_cfg.emo_cost == "fixed":
            head = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight
            self.emo_cost = head.detach().clone()
        for t in self.teachers:
            m = getattr(t, "model", None)
            if isinstance(m, torch.nn.Module):
                modeling.freeze_teacher(m)
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
        """Every teacher's target over the student's positions, fused (``stillroom.fusion.fuse``); rows no
        teacher reached get the one-hot gold next token (FuseLLM's fallback)."""
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
        fused = fuse(targets, ces, f.method, f.level, weight_temperature=f.weight_temperature, top_k=f.top_k)
        return fused.fill_onehot(next_labels(inputs["labels"]))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._fusion_share is not None and "loss" in logs:
            total = float(self._fusion_share.sum()) or 1.0
            for t, v in zip(self.teachers, self._fusion_share.tolist(), strict=True):
                logs[f"fusion_share/{t.name}"] = v / total
            self._fusion_share = None
        super().log(logs, *args, **kwargs)

    def loss_sum(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """Σ over labelled positions of λ·CE + (1−λ)·D (not yet divided by N)."""
        from stillroom import losses

        hidden = _last_hidden(model, inputs)[:, :-1]
        labels = inputs["labels"][:, 1:]
        H = hidden.shape[-1]
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        h, y = hidden.reshape(-1, H), labels.reshape(-1)
        c = self.loss_cfg
        if not model.training or (not self.teachers and c.kind != "emo"):  # evaluation always reports CE
            return losses.fused_linear_distill_loss(h, weight, labels=y, ce_weight=1.0, chunk_size=c.chunk_size,
                                                    reduction="sum")
        if c.kind == "emo":  # EMO (Ren et al. 2023) vs the gold token, MLE mixed in per c.emo_mode
            cost = self.emo_cost if c.emo_cost == "fixed" else None
            return losses.fused_linear_emo_loss(h, weight, cost, labels=y, mode=c.emo_mode,
                                                chunk_size=c.chunk_size, reduction="sum")
        t0 = self.teachers[0]
        if len(self.teachers) == 1 and isinstance(t0, SameTokenizerTeacher) and t0.top_k is None:
            with torch.no_grad():
                th = _last_hidden(t0.model, inputs)[:, :-1]
            tw = self.accelerator.unwrap_model(t0.model).get_output_embeddings().weight
            return losses.fused_linear_distill_loss(
                h, weight, teacher_hidden=th.reshape(h.shape[0], -1), teacher_weight=tw, labels=y,
                ce_weight=c.ce_weight, kind=c.kind, temperature=c.temperature, beta=c.beta, alpha=c.alpha,
                chunk_size=c.chunk_size, reduction="sum")
        fused = self.fused_target(inputs)
        T = fused.ids.shape[1]
        tgt = SparseTarget(fused.ids[:, : T - 1].reshape(h.shape[0], -1),
                           fused.logprobs[:, : T - 1].reshape(h.shape[0], -1),
                           fused.tail[:, : T - 1].reshape(-1),
                           (fused.valid[:, : T - 1] & labels.ne(-100)).reshape(-1))
        return losses.fused_linear_distill_loss(
            h, weight, target=tgt, labels=y, ce_weight=c.ce_weight, kind=c.kind, temperature=c.temperature,
            beta=c.beta, alpha=c.alpha, chunk_size=c.chunk_size, reduction="sum")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total = self.loss_sum(model, inputs)
        if num_items_in_batch is None:
            num_items_in_batch = inputs["labels"][:, 1:].ne(-100).sum()
        loss = total / num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) \
            else total / max(int(num_items_in_batch), 1)
        if self.args.average_tokens_across_devices and self.args.world_size > 1 and model.training:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Student CE per token (nats) and bits per byte of the evaluation blocks (first token of a block
        without BOS is not scored)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            return {}
        loader = self.get_eval_dataloader(dataset)
        model = self.model
        was_training = model.training
        model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=self.args.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.args.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for batch in loader:
                batch = self._prepare_inputs(batch)
                nll += self.loss_sum(model, batch).double()
                tokens += batch["labels"][:, 1:].ne(-100).sum().double()
                nbytes += sum(len(t.encode("utf-8")) for t in batch["text"])
        if self.args.world_size > 1:
            nll, tokens, nbytes = (self.accelerator.reduce(x, reduction="sum") for x in (nll, tokens, nbytes))
        model.train(was_training)
        metrics = {f"{metric_key_prefix}_loss": (nll / tokens.clamp_min(1)).item(),
                   f"{metric_key_prefix}_bpb": (nll / math.log(2) / nbytes.clamp_min(1)).item()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


@dataclass
class TrainResult:
    """What :func:`stillroom.trainer.train` returns."""

    output_dir: str
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    model: Any = None


# --- callbacks ----------------------------------------------------------------------------------------------

from transformers import TrainerCallback  # noqa: E402


class MetricsJsonlCallback(TrainerCallback):
    """Appends every logged dict (with its step) to ``metrics.jsonl`` on the main process."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        import json

        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class RichProgressCallback(TrainerCallback):
    """A Rich progress bar over optimizer steps with the latest loss; replaces the tqdm bars."""

    def __init__(self):
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        parts = [f"{k}={v:.4g}" for k, v in logs.items()
                 if k in ("loss", "eval_loss", "eval_bpb", "learning_rate") and isinstance(v, (int, float))]
        if parts:
            self.progress.update(self.task, info=" ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def plot_losses(history: list[dict], path) -> None:
    """Training loss (and eval loss/bpb when present) against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (λ·CE + (1−λ)·D)")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval CE (nats/token)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if train or evals:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- recipe -> run ------------------------------------------------------------------------------------------


def check_recipe(recipe) -> dict:
    """Checks that need tokenizers or cache metadata but no model: run before anything heavy loads.

    Returns the loaded tokenizers (``student`` and one per teacher)."""
    student_tok = student_tokenizer(recipe.student)
    teacher_toks = []
    for i, spec in enumerate(recipe.teachers):
        tok = load_tokenizer(spec.path, f"teachers.{i}.path")  # a .gguf teacher is converted here, once
        teacher_toks.append(tok)
        if recipe.fusion.projection == "none" and not same_tokenizer(student_tok, tok):
            raise ValueError(f"teachers.{i}.path: {spec.path} uses a different tokenizer from the student and "
                             "fusion.projection is 'none'; set fusion.projection to 'onehot' or 'bytes' "
                             "to project it onto the student vocabulary")
        if recipe.fusion.top_k is None and (len(recipe.teachers) != 1 or spec.cache is not None
                                            or recipe.fusion.include_student or not same_tokenizer(student_tok, tok)):
            raise ValueError("fusion.top_k: null (the dense teacher distribution) needs exactly one online "
                             "teacher with the student's tokenizer; set fusion.top_k to a number (e.g. 10)")
        if spec.cache is not None:
            _check_cache(spec.cache, resolve_model(spec.path), recipe.loss.temperature, f"teachers.{i}.cache")
    return {"student": student_tok, "teachers": teacher_toks}


def _check_cache(cache_dir: str, teacher_path: str, temperature: float, key: str) -> None:
    """The cache must have been built for this teacher (weights and tokenizer hashes) and temperature."""
    from stillroom.cache import CachedTeacher

    try:
        CachedTeacher(cache_dir, teacher=teacher_path, temperature=temperature)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{key}: {e}") from None


def build_teachers(recipe, toks: dict, device=None) -> list:
    """One :class:`Teacher` per ``recipe.teachers`` entry: same-tokenizer fast path, online-aligned, or cached."""
    teachers = []
    student_tok = toks["student"]
    for i, (spec, tok) in enumerate(zip(recipe.teachers, toks["teachers"], strict=True)):
        name = spec.name or f"teacher{i}"
        if spec.cache is None and same_tokenizer(student_tok, tok):
            model = load_causal_lm(spec.path, f"teachers.{i}.path")
            teachers.append(SameTokenizerTeacher(model, recipe.fusion.top_k, recipe.loss.temperature, name))
            continue
        from stillroom.tokens import TokenTable
        from stillroom.vocab import VocabMap

        s_table, t_table = TokenTable.from_tokenizer(student_tok), TokenTable.from_tokenizer(tok)
        vmap = VocabMap.cached(t_table, s_table)
        if spec.cache is not None:
            from stillroom.cache import CachedTeacher

            source = CachedTeacher(spec.cache)
        else:
            from stillroom.cache import OnlineTeacher

            source = OnlineTeacher(str(resolve_model(spec.path)), top_k=recipe.fusion.top_k, temperature=recipe.loss.temperature)
        fallback = recipe.fusion.projection if recipe.fusion.projection != "none" else "onehot"
        teachers.append(AlignedTeacher(source, s_table, t_table, vmap, fallback, name))
    return teachers


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
    )


def model_card(recipe, metrics: dict, n_blocks: int, student=None) -> str:
    import yaml

    teachers = "\n".join(f"- `{t.path}`" + (f" (offline cache `{t.cache}`)" if t.cache else "")
                         for t in recipe.teachers) or "- none (plain CE / EMO)"
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    origin = describe_student(recipe.student, student)
    return (f"---\nlibrary_name: transformers\ntags: [stillroom, distillation]\n---\n\n# {recipe.name}\n\n"
            f"{origin[0].upper()}{origin[1:]}, trained by stillroom.\n\n"
            f"## Teachers\n\n{teachers}\n\nFusion: {recipe.fusion.method} at {recipe.fusion.level} level, "
            f"top-k {recipe.fusion.top_k}; loss: λ={recipe.loss.ce_weight} CE + (1−λ) {recipe.loss.kind}.\n\n"
            f"## Data\n\n- train: `{recipe.data.train}` ({n_blocks} blocks of ≤ {recipe.data.seq_len} tokens)\n"
            f"- eval: `{recipe.data.eval}`\n\n## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
            f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe.model_dump(), sort_keys=False)}```\n")


def train(recipe, overrides: list[str] | tuple[str, ...] = (), callbacks: list | None = None) -> TrainResult:
    """Run a recipe (a :class:`~stillroom.recipe.Recipe`, a dict or a YAML path) end to end.

    Validates (recipe, tokenizers, caches) before loading any model; then builds blocks, teachers and a
    :class:`DistillTrainer`; trains (resuming when ``train.resume``); evaluates; saves the student, a model
    card, ``metrics.jsonl`` and ``loss_curve.png`` in ``train.output_dir``.
    """
    from pathlib import Path

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from stillroom.data_io import load_texts
    from stillroom.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        recipe = load_recipe(recipe.model_dump(), overrides)
    toks = check_recipe(recipe)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    tok = toks["student"]
    seq = recipe.data.seq_len
    blocks = make_blocks(load_texts(recipe.data.train, recipe.data.text_field), tok, seq, recipe.data.add_bos)
    if recipe.data.max_blocks:
        blocks = blocks[: recipe.data.max_blocks]
    eval_blocks = None
    if recipe.data.eval:
        eval_blocks = make_blocks(load_texts(recipe.data.eval, recipe.data.text_field), tok, seq,
                                  recipe.data.add_bos)

    args = training_arguments(recipe, eval_blocks is not None)
    from transformers import set_seed

    set_seed(recipe.train.seed)
    student = build_student(recipe.student, tok)
    if int(os.environ.get("RANK", "0")) == 0:  # which kind of student: said once, never silent
        from rich.console import Console

        Console(stderr=True).print(describe_student(recipe.student, student), highlight=False, soft_wrap=True)
    teachers = build_teachers(recipe, toks)
    if recipe.fusion.include_student:  # FuseLLM lets the target model's own distribution compete too
        import copy

        teachers.append(SameTokenizerTeacher(copy.deepcopy(student), recipe.fusion.top_k, recipe.loss.temperature,
                                             "student@init"))
    out = Path(recipe.train.output_dir)
    cbs = [MetricsJsonlCallback(out / "metrics.jsonl")] + (callbacks or [])
    if recipe.train.progress:
        cbs.append(RichProgressCallback())
    r = recipe.loss
    loss = LossConfig(r.kind, r.ce_weight if teachers else 1.0, r.temperature, r.beta, r.alpha, r.chunk_size,
                      r.emo_mode, r.emo_cost)
    fusion = FusionConfig(recipe.fusion.method, recipe.fusion.level, recipe.fusion.weight_temperature, None)
    trainer = DistillTrainer(model=student, args=args, train_dataset=BlockDataset(blocks),
                             eval_dataset=BlockDataset(eval_blocks) if eval_blocks else None,
                             data_collator=BlockCollator(tok, seq), processing_class=tok, teachers=teachers,
                             loss=loss, fusion=fusion, callbacks=cbs)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume = recipe.train.resume
    if resume is True and not any(out.glob("checkpoint-*")):
        resume = False
    if resume is False and trainer.is_world_process_zero() and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    result = trainer.train(resume_from_checkpoint=resume or None)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if eval_blocks:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        tok.save_pretrained(out)
        (out / "README.md").write_text(model_card(recipe, metrics, len(blocks), trainer.model), encoding="utf-8")
        history = [dict(h) for h in trainer.state.log_history]
        if recipe.train.plot:
            plot_losses(history, out / "loss_curve.png")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has saved the student before any rank returns (and exits)
    return TrainResult(str(out), metrics, [dict(h) for h in trainer.state.log_history], trainer.model)


def export_training_blocks(recipe, path) -> int:
    """Write the recipe's training blocks as JSONL ``{"id", "text"}``: build a teacher cache on exactly these
    texts with ``stillroom cache --data PATH`` and point ``teachers.N.cache`` at it (evaluation needs no
    teacher)."""
    import json
    from pathlib import Path

    from stillroom.data_io import load_texts

    tok = student_tokenizer(recipe.student)
    blocks = make_blocks(load_texts(recipe.data.train, recipe.data.text_field), tok, recipe.data.seq_len,
                         recipe.data.add_bos)
    if recipe.data.max_blocks:
        blocks = blocks[: recipe.data.max_blocks]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for b in blocks:
            f.write(json.dumps({"id": b.example_id, "text": b.text}) + "\n")
    return len(blocks)
