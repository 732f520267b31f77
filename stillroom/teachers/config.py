"""A teacher objective's settings, torch-free so a recipe (``teachers[].alm_*``) can read its defaults cheaply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ObjectiveConfig:
    """One teacher's own term: ``kind`` alm | uld | xtoken, its weight w in λ·CE + Σ w·D, and the ALM options (see
    :func:`stillroom.losses.alm_loss`). These defaults are the recipe's: ``teachers[].alm_*`` read them."""

    kind: str = "alm"
    weight: float = 0.5
    alm_temperature: float = 1.0
    alm_divergence: str = "bce"
    alm_chunks: str = "exact"  # "exact" groups; "all" groups; "unbiased" chunks (ObjectiveTeacher.chunks)
    temperature: float = 1.0  # uld / xtoken: the student softmax temperature (the recipe's loss.temperature)
    chunk_size: int | None = None
    alm_bias_threshold: float = 1e-4
