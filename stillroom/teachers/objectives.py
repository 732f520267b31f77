"""Per-teacher cross-tokenizer objectives next to projected KD: ALM and ULD terms of the training loss.

A recipe teacher has ``objective: kd | alm | uld``. ``kd`` teachers (the default) are projected onto the
student's vocabulary and fused (``stillroom.teachers.fusion``) into the one target of the (1 − λ)·D term, as before.
An ``alm`` or ``uld`` teacher is never fused or projected: it adds its own term, so the loss per optimizer step is

    L = (1/N) · [ λ·ΣCE + (1 − λ)·ΣD(fused kd target ‖ q) + Σ_i w_i · ΣD_i ]      (w_i default 1 − λ)

- ALM (``stillroom.losses.alm_loss``, Minixhofer et al. 2025): chunks are the ``exact`` alignment groups of the
  teacher's and the student's tokenizations of the block text (``stillroom.tokenization.align.align``); the teacher side is
  its per-token log-prob of its own tokens (``−gold_ce``, online or from any cache — no top-k needed), the
  student side its own next-token log-probs, gathered chunk by chunk from the logits (:func:`own_logprobs`).
  Each chunk is weighted by its number of student tokens and summed, so ΣD_i is on the per-token scale of ΣCE.
- ``alm_chunks: unbiased`` merges the exact groups up to boundaries whose tokenization bias is small on both
  sides (``stillroom.tokenization.unbiased``: the paper's outcome-chunk debiasing; unigram counts from the training data).
- Several ALM teachers are fused into one term (``stillroom.teachers.alm_fusion``): ``fusion.method`` min_ce / avg_ce /
  mean weighs them on joint chunks, per sequence or per chunk (``fusion.level: token``); it is logged as
  ``alm/fused``.
- ULD (``stillroom.losses.uld_loss``, Boizard et al. 2024): on the student rows paired with a teacher row
  through a one-to-one exact group (both predict the same token text from the same byte prefix), the teacher's
  top-k in its own vocabulary against the sorted student distribution; summed over the pairs.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from stillroom.losses import alm_loss, token_logprobs, uld_loss
from stillroom.losses.fused_linear import auto_chunk_size
from stillroom.losses.own_logprob import own_logprobs
from stillroom.targets import SparseTarget
from stillroom.teachers.alm_fusion import fused_alm
from stillroom.teachers.config import ObjectiveConfig
from stillroom.tokenization.align import align


@runtime_checkable
class TermTeacher(Protocol):
    """A teacher that adds its own term to the loss instead of a target to fuse: ``loss_sum`` gives w · ΣD_i
    over the batch's labelled student positions (not divided by N), from the student's last hidden states
    ``hidden [B, T-1, H]`` (row j predicts student token j+1) and its head ``weight [V, H]``. ``objective`` and
    ``name`` label its log key (``objective/name``), ``config.weight`` is its w, ``last_sum`` its unweighted ΣD on
    the last training micro-batch (for the logs). Adding an objective = one class with these members (see
    :class:`ALMTeacher`), registered in :data:`OBJECTIVES` for recipes."""

    name: str
    objective: str
    config: ObjectiveConfig
    last_sum: torch.Tensor | None

    def loss_sum(self, hidden: torch.Tensor, weight: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor: ...


class ObjectiveTeacher:
    """What every aligned term teacher shares: a signal ``source`` (an ``OnlineTeacher`` or ``CachedTeacher``),
    the byte alignment of its tokens with the student's, and the bookkeeping of :class:`TermTeacher`.
    Subclasses give :meth:`term`, the unweighted ΣD over the batch."""

    objective = ""

    def __init__(self, source, student_table, teacher_table, config: ObjectiveConfig, name: str = "teacher"):
        self.source, self.student_table, self.teacher_table = source, student_table, teacher_table
        self.config, self.name = config, name
        self.last_sum: torch.Tensor | None = None  # ΣD_i of the last training micro-batch, unweighted (for the logs)

    @torch.no_grad()
    def aligned(self, batch: dict[str, Any]) -> list[tuple[Any, Any]]:
        """Per batch row: (teacher output, alignment with the teacher as source and the student's unpadded ids).
        On a completion batch (``prompt_len``; :mod:`stillroom.inputs.chat`) both are the completion regions'
        (:func:`stillroom.teachers.completion.aligned_regions`: each model renders the prompt with its own template)."""

        if "prompt_len" in batch:
            from stillroom.teachers.completion import aligned_regions

            return aligned_regions(self, batch)

        outs = self.source.signal(batch["text"], batch["example_id"])
        ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
        return [(out, align(out.input_ids.numpy(), ids[r][mask[r]].numpy(), self.teacher_table, self.student_table))
                for r, out in enumerate(outs)]

    def term(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pairs,
             offsets: list[int] | None) -> torch.Tensor:
        raise NotImplementedError

    def loss_sum(self, hidden: torch.Tensor, weight: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """w · ΣD of this teacher on the batch (:class:`TermTeacher`)."""
        d = self.term(hidden, weight, batch["labels"], self.aligned(batch), region_offsets(batch))
        self.last_sum = d.detach()
        return self.config.weight * d


class ALMTeacher(ObjectiveTeacher):
    """ALM (Minixhofer et al. 2025): chunk likelihoods of teacher and student over aligned chunks, compared as
    Bernoullis (:func:`alm_term`); ``bias_rule`` (a :class:`~stillroom.tokenization.unbiased.BoundaryBias`) is
    needed for ``alm_chunks="unbiased"``."""

    objective = "alm"

    def __init__(self, source, student_table, teacher_table, config: ObjectiveConfig, name: str = "teacher",
                 bias_rule=None):
        super().__init__(source, student_table, teacher_table, config, name)
        self.bias_rule = bias_rule
        if config.alm_chunks == "unbiased" and bias_rule is None:
            raise ValueError(f"teacher {name}: alm_chunks='unbiased' needs a bias_rule "
                             "(stillroom.tokenization.unbiased.BoundaryBias)")

    def term(self, hidden, weight, labels, pairs, offsets):
        return alm_term(hidden, weight, labels, pairs, self.config, self.chunks(pairs), offsets)

    def chunks(self, pairs) -> tuple[list, list | None]:
        """ALM's chunks per batch row: (groups, masks) — the alignment groups with the ``exact`` ones kept
        (``alm_chunks="exact"``) or all kept (``"all"``, masks None), or the unbiased chunks (``"unbiased"``:
        groups merged up to unbiased boundaries, exact ones kept; :func:`stillroom.tokenization.unbiased.unbiased_chunks`)."""
        kind = self.config.alm_chunks
        if kind == "unbiased":
            from stillroom.tokenization.unbiased import unbiased_chunks

            merged = [unbiased_chunks(al, self.bias_rule) for _, al in pairs]
            return [g for g, _ in merged], [e for _, e in merged]
        return [al.groups for _, al in pairs], ([al.exact for _, al in pairs] if kind == "exact" else None)


class ULDTeacher(ObjectiveTeacher):
    """ULD (Boizard et al. 2024): sorted teacher and student distributions compared rank by rank on the
    one-to-one exact pairs (:func:`uld_term`)."""

    objective = "uld"

    def term(self, hidden, weight, labels, pairs, offsets):
        return uld_term(hidden, weight, labels, pairs, self.config, offsets)


OBJECTIVES: dict[str, type[ObjectiveTeacher]] = {"alm": ALMTeacher, "uld": ULDTeacher}


def objective_teacher(source, student_table, teacher_table, config: ObjectiveConfig, name: str = "teacher",
                      bias_rule=None) -> ObjectiveTeacher:
    """The term teacher of ``config.kind`` (a key of :data:`OBJECTIVES`; ``xtoken`` teachers are built as
    :class:`stillroom.teachers.xtoken.XTokenTeacher` with their map)."""
    if config.kind not in OBJECTIVES:
        raise ValueError(f"objective {config.kind!r}: use one of {', '.join(OBJECTIVES)}")
    extra = {"bias_rule": bias_rule} if config.kind == "alm" else {}
    return OBJECTIVES[config.kind](source, student_table, teacher_table, config, name, **extra)


def term_sums(extra: list[TermTeacher], device) -> list[torch.Tensor]:
    """ΣD_i of each ALM / ULD teacher on the last micro-batch (float64; 0 before any), for the step's logs."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return [zero if t.last_sum is None else t.last_sum.to(device, torch.float64) for t in extra]


def term_logs(extra: list[TermTeacher], terms: list[float], ce: float, loss: float, ce_weight: float,
              fused: bool) -> dict[str, float]:
    """The loss's distillation parts per labelled token, averaged like ``loss``: ``"alm/NAME"`` / ``"uld/NAME"``,
    each teacher's unweighted term D_i, and (``fused``: there are kd teachers) ``"kd"``, the fused term, from
    ``loss = λ·ce + (1 − λ)·kd + Σ_i w_i · D_i``."""
    logs = {f"{t.objective}/{t.name}": v for t, v in zip(extra, terms, strict=True)}
    if fused and ce_weight < 1:
        own = sum(t.config.weight * v for t, v in zip(extra, terms, strict=True))
        logs["kd"] = (loss - ce_weight * ce - own) / (1 - ce_weight)
    return logs


def region_offsets(batch: dict[str, Any]) -> list[int] | None:
    """Where each row's alignment starts in the student's row: ``prompt_len − 1`` on a completion batch (the
    region's marker sits on the last prompt token), None (0) on text blocks."""
    if "prompt_len" not in batch:
        return None
    return [int(p) - 1 for p in batch["prompt_len"]]


def region_view(x: torch.Tensor, offsets: list[int], lengths: list[int]) -> torch.Tensor:
    """``[B, max(lengths)]``: row b is ``x[b, offsets[b] : offsets[b] + lengths[b]]`` then ``nan`` (differentiable)."""
    width = max(lengths)
    off = torch.as_tensor(offsets, device=x.device)[:, None]
    j = torch.arange(width, device=x.device)[None]
    idx = (off + j).clamp_max(x.shape[1] - 1)
    inside = j < torch.as_tensor(lengths, device=x.device)[:, None]
    return torch.where(inside, x.gather(1, idx), torch.full_like(idx, float("nan"), dtype=x.dtype))


def _padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float32)
    for r, x in enumerate(rows):
        out[r, : x.shape[0]] = x
    return out


def student_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk_size: int | None = None) -> torch.Tensor:
    """``[B, T]`` token-indexed log-probs of the student's own tokens (entry j from row j − 1; ``nan`` at 0 and
    where the label is -100), from ``hidden [B, T-1, H]`` chunk by chunk (:func:`own_logprobs`)."""

    B, R, H = hidden.shape
    rows = own_logprobs(hidden.reshape(-1, H), weight, labels[:, 1:].reshape(-1), chunk_size).view(B, R)
    nan = torch.full((B, 1), float("nan"), dtype=rows.dtype, device=rows.device)
    return token_logprobs(torch.cat([rows, nan], 1))


def alm_term(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pairs, config: ObjectiveConfig,
             chunks: tuple[list, list | None] | None = None, offsets: list[int] | None = None) -> torch.Tensor:
    """Σ over the batch of ALM (token-weighted sum over chunks) between the student's chunk likelihoods, from its
    own-token log-probs, and the teacher's, from ``gold_ce``; ``chunks``: (groups, masks) per row
    (:meth:`ObjectiveTeacher.chunks`; default the alignment groups, exact ones kept); ``offsets``: where each
    alignment starts in the student's row (:func:`region_offsets`)."""

    student = student_token_logprobs(hidden, weight, labels, config.chunk_size)
    if offsets is not None:
        student = region_view(student, offsets, [al.tgt_len for _, al in pairs])
    width = max(len(out) for out, _ in pairs)
    teacher = token_logprobs(_padded([-out.gold_ce.float() for out, _ in pairs], width)).to(student.device)
    groups, masks = chunks or ([al.groups for _, al in pairs], [al.exact for _, al in pairs])
    return alm_loss(student, teacher, groups, chunk_mask=masks, temperature=config.alm_temperature,
                    divergence=config.alm_divergence, weighting="tokens", reduction="sum")


def group_pairs(pairs, labels: torch.Tensor, offsets: list[int] | None = None, *, one_to_one: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, SparseTarget]:
    """(batch row, student row, the teacher's own target) for every alignment group starting past token 0 on both
    sides: student row s0 − 1 and teacher row t0 − 1 predict tokens starting at the group's first byte (student
    token indices shifted by ``offsets[b]`` where the alignment covers a region of the row). ``one_to_one``: only
    the one-to-one exact groups, where both predict the same token text (ULD); else every group start (X-Token)."""
    b_idx, s_rows, ids, lps, tails = [], [], [], [], []
    for b, (out, al) in enumerate(pairs):
        g = np.asarray(al.groups).reshape(-1, 4)
        if one_to_one:
            g = g[al.one_to_one & al.exact]
        g = g[(g[:, 0] >= 1) & (g[:, 2] >= 1)]
        if offsets is not None and len(g):
            g = g + np.array([0, 0, offsets[b], offsets[b]])
        g = g[labels[b, g[:, 2]].cpu().numpy() != -100] if len(g) else g
        t_rows = torch.as_tensor(g[:, 0] - 1, dtype=torch.long)
        b_idx.append(torch.full((len(g),), b, dtype=torch.long))
        s_rows.append(torch.as_tensor(g[:, 2] - 1, dtype=torch.long))
        ids.append(out.topk_ids[t_rows])
        lps.append(out.topk_logprobs[t_rows].float())
        tails.append(out.tail[t_rows].float())
    lp = torch.cat(lps)
    target = SparseTarget(torch.cat(ids), lp, torch.cat(tails), torch.ones(lp.shape[0], dtype=torch.bool))
    return torch.cat(b_idx), torch.cat(s_rows), target


def pair_term(hidden: torch.Tensor, weight: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, SparseTarget],
              divergence, chunk_size: int | None = None) -> torch.Tensor:
    """Σ of ``divergence(student_logits, target)`` (a sum over rows) over paired rows (:func:`group_pairs`),
    ``chunk_size`` rows of student logits at a time (each chunk recomputed in backward, so only one chunk × V
    exists at once)."""
    from torch.utils.checkpoint import checkpoint

    b, s, tgt = rows
    dev = hidden.device
    h = hidden[b.to(dev), s.to(dev)]
    tgt = tgt.to(dev)
    chunk = int(chunk_size or auto_chunk_size(weight.shape[0]))
    total = hidden.sum() * 0.0

    def piece(hc, w, ids, lp, tail, valid):
        return divergence(hc @ w.T, SparseTarget(ids, lp, tail, valid))

    for a in range(0, h.shape[0], chunk):
        sl = slice(a, a + chunk)
        total = total + checkpoint(piece, h[sl], weight, tgt.ids[sl], tgt.logprobs[sl], tgt.tail[sl], tgt.valid[sl],
                                   use_reentrant=False)
    return total


def uld_term(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pairs, config: ObjectiveConfig,
             offsets: list[int] | None = None) -> torch.Tensor:
    """Σ of ULD over the one-to-one exact pairs of the batch (:func:`group_pairs`), chunked (:func:`pair_term`)."""
    return pair_term(hidden, weight, group_pairs(pairs, labels, offsets),
                     lambda z, t: uld_loss(z, t, temperature=config.temperature, reduction="sum"), config.chunk_size)


class FusedALM:
    """Several ALM teachers as one term: on their joint chunks, ``fusion.method`` (min_ce / avg_ce / mean)
    weighs the teachers per sequence or per chunk (``level="token"``); see :func:`stillroom.teachers.alm_fusion.fused_alm`.
    The teachers share the weight and the ALM options (the recipe checks it)."""

    objective = "alm"

    def __init__(self, members: list[ALMTeacher], method: str = "min_ce", level: str = "sequence",
                 weight_temperature: float = 1.0, name: str = "fused"):
        c = members[0].config
        keys = [(m.config.weight, m.config.alm_temperature, m.config.alm_divergence, m.config.alm_chunks)
                for m in members]
        if len(set(keys)) > 1:
            raise ValueError(f"fused ALM teachers {[m.name for m in members]} must share weight, alm_temperature, "
                             f"alm_divergence and alm_chunks; got {keys}")
        self.members, self.config, self.name = members, c, name
        self.method, self.level, self.weight_temperature = method, level, weight_temperature
        self.last_sum: torch.Tensor | None = None

    def loss_sum(self, hidden: torch.Tensor, weight: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """w · Σ over the batch rows of the fused ALM term."""
        c = self.config
        student = student_token_logprobs(hidden, weight, batch["labels"], c.chunk_size)
        pairs = [m.aligned(batch) for m in self.members]  # [teacher][row] -> (out, alignment)
        chunks = [m.chunks(p) for m, p in zip(self.members, pairs, strict=True)]  # [teacher] -> (groups, masks)
        offsets = region_offsets(batch) or [0] * student.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for b in range(student.shape[0]):
            n, o = pairs[0][b][1].tgt_len, offsets[b]
            teachers = [token_logprobs(-p[b][0].gold_ce.float()).to(student.device) for p in pairs]
            d, _, _ = fused_alm(student[b, o:o + n], teachers, [g[b] for g, _ in chunks],
                                [None if m is None else m[b] for _, m in chunks],
                                method=self.method, level=self.level, weight_temperature=self.weight_temperature,
                                temperature=c.alm_temperature, divergence=c.alm_divergence)
            total = total + d
        self.last_sum = total.detach()
        return c.weight * total


def split_teachers(teachers: list, fusion=None) -> tuple[list, list]:
    """(kd teachers, fused into one target; teachers with their own ALM / ULD term). With ``fusion`` (method,
    level, weight_temperature) and several ALM teachers, those become one :class:`FusedALM` term."""
    extra = [t for t in teachers if isinstance(t, TermTeacher)]
    alm = [t for t in extra if t.objective == "alm"]
    if fusion is not None and len(alm) > 1:
        extra = [FusedALM(alm, fusion.method, fusion.level, fusion.weight_temperature)] + [
            t for t in extra if t.objective != "alm"]
    return [t for t in teachers if not isinstance(t, TermTeacher)], extra


