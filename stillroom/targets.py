"""The data contracts shared by alignment, cache, fusion and losses.

:class:`TeacherOutput`: what a teacher said about one example in its *own* tokenization (top-k ids and
log-probs per position, the tail mass, the CE of its own next token), online or read from a cache.

:class:`SparseTarget`: a sparse (top-k) teacher distribution over the *student's* vocabulary, one row per student
position:

- ``ids``      ``[..., k]`` int64 token ids (padding entries: id 0 with log-prob ``-inf``);
- ``logprobs`` ``[..., k]`` float log-probabilities of those ids (``-inf`` = no mass);
- ``tail``     ``[...]``    probability mass outside ``ids`` (``1 - sum(exp(logprobs))``, clamped at 0);
- ``valid``    ``[...]``    bool, ``False`` where no target could be transferred (masked out of the loss).

Ids within a row are unique (duplicates are summed before a target is built). ``valid=False`` rows carry
arbitrary (but finite-or-``-inf``) values and must be ignored by consumers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SparseTarget:
    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(
                f"SparseTarget: ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} differ"
            )
        if self.tail.shape != self.ids.shape[:-1] or self.valid.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"SparseTarget: tail {tuple(self.tail.shape)} and valid {tuple(self.valid.shape)} must have "
                f"the leading shape of ids {tuple(self.ids.shape[:-1])}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def to(self, device: torch.device | str) -> SparseTarget:
        return SparseTarget(self.ids.to(device), self.logprobs.to(device), self.tail.to(device), self.valid.to(device))

    @staticmethod
    def from_probs(ids: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor | None = None) -> SparseTarget:
        """Build from probabilities (zeros become ``-inf`` log-probs); the tail is what they leave out."""
        probs = probs.clamp_min(0)
        tail = (1.0 - probs.sum(-1)).clamp_min(0)
        logprobs = torch.where(probs > 0, probs.clamp_min(1e-45).log(), torch.full_like(probs, float("-inf")))
        if valid is None:
            valid = torch.ones(ids.shape[:-1], dtype=torch.bool, device=ids.device)
        return SparseTarget(ids.long(), logprobs, tail, valid)

    def fill_onehot(self, next_ids: torch.Tensor) -> SparseTarget:
        """Rows that are not valid but have a next token (``next_ids >= 0``; ``-100`` = none) become the one-hot
        target on it — FuseLLM's fallback where no teacher distribution reached a position, applied after
        fusion so that any teacher with a distribution there is used first."""
        fill = ~self.valid & (next_ids >= 0)
        if not bool(fill.any()):
            return self
        ids, lp, tail = self.ids.clone(), self.logprobs.clone(), self.tail.clone()
        lp[fill] = float("-inf")
        ids[fill] = 0
        ids[..., 0] = torch.where(fill, next_ids.clamp_min(0), ids[..., 0])
        lp[..., 0] = torch.where(fill, torch.zeros_like(lp[..., 0]), lp[..., 0])
        tail[fill] = 0.0
        return SparseTarget(ids, lp, tail, self.valid | fill)

    def soften_support(self, temperature: float) -> SparseTarget:
        """The target with its spread inside each row's support set by ``temperature``, its support mass and tail kept:

            p'_j = m · p_j^{1/T} / Σ_{i ∈ S} p_i^{1/T},   m = Σ_{i ∈ S} p_i,   tail' = tail

        over the row's live entries S (finite log-prob). T > 1 softens, T < 1 sharpens, T = 1 is the target itself.
        Unlike KD's temperature (both sides softened, ``loss.temperature``), this changes the teacher's target only,
        and where the target is a top-k of a large vocabulary it does not move the support's mass into the tail.
        """
        if temperature <= 0:
            raise ValueError(f"support temperature must be > 0, got {temperature}")
        if temperature == 1.0:
            return self
        live = torch.isfinite(self.logprobs)
        mass = torch.logsumexp(self.logprobs, -1, keepdim=True)  # log m (−inf for a row without entries)
        scaled = self.logprobs / temperature
        lp = scaled - torch.logsumexp(scaled, -1, keepdim=True) + mass
        lp = torch.where(live, lp, torch.full_like(lp, float("-inf")))
        return SparseTarget(self.ids, lp, self.tail, self.valid)


def stack_rows(rows: list[SparseTarget], ces: list[torch.Tensor], seq_len: int
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


@dataclass
class TeacherOutput:
    """One example as the teacher sees it (teacher tokenization, T positions, row i predicts token i+1)."""

    example_id: str
    input_ids: torch.Tensor  # int64 [T]
    topk_ids: torch.Tensor  # int64 [T, k], sorted by descending log-prob
    topk_logprobs: torch.Tensor  # float32 [T, k], at the teacher temperature
    tail: torch.Tensor  # float32 [T], probability mass outside the top-k
    gold_ce: torch.Tensor  # float32 [T], CE of the gold next token at tau=1; nan at the last position

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def target(self) -> SparseTarget:
        """The teacher's own-vocabulary SparseTarget (last row invalid)."""
        valid = torch.ones(len(self), dtype=torch.bool)
        if len(self):
            valid[-1] = False
        return SparseTarget(self.topk_ids, self.topk_logprobs, self.tail, valid)
