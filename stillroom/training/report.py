"""What a run leaves to read: loss curves and the model card.

:func:`loss_panels` / :func:`compare_panels` group curves like with like (CE with CE, held-out bits/byte);
:func:`plot_panels` draws them (matplotlib, Agg); :func:`model_card` writes the student's README with its
recipe, metrics and Hugging Face front matter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillroom.models.student import describe_student

Series = dict[str, tuple[list[float], list[float]]]


def points(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` over the records that have it (one per step, the last one wins)."""
    by_step = {h["step"]: h[key] for h in history if key in h and "step" in h}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_panels(history: list[dict]) -> dict[str, Series]:
    """One run's curves, grouped so each panel holds one quantity in one unit: cross-entropy of the gold
    token (training ``ce`` and held-out ``eval_loss``, nats/token), the distillation term ``kd``, each ALM
    teacher's term ``alm/NAME`` (binary divergence per student token), each ULD teacher's ``uld/NAME`` (L1
    between sorted distributions, per token), each X-Token teacher's ``xtoken/NAME`` (KL in its vocabulary, per
    token) and held-out bits per byte. Empty series and panels are left out."""
    keys = sorted({k for h in history for k in h})
    panels = {"cross-entropy (nats/token)": {"train CE": points(history, "ce"),
                                             "held-out CE": points(history, "eval_loss")},
              "distillation term D (nats/token)": {"train D": points(history, "kd")},
              "ALM term (per token)": {k[4:]: points(history, k) for k in keys if k.startswith("alm/")},
              "ULD term (per token)": {k[4:]: points(history, k) for k in keys if k.startswith("uld/")},
              "X-Token term (nats/token)": {k[7:]: points(history, k) for k in keys if k.startswith("xtoken/")},
              "hybrid term (per token)": {k[7:]: points(history, k) for k in keys if k.startswith("hybrid/")},
              "held-out bits per byte": {"held-out": points(history, "eval_bpb")}}
    return _nonempty(panels)


def compare_panels(runs: dict[str, list[dict]]) -> dict[str, Series]:
    """Several runs on shared axes, like with like: training CE per run, held-out bits per byte per run."""
    return _nonempty({"training CE (nats/token)": {name: points(h, "ce") for name, h in runs.items()},
                      "held-out bits per byte": {name: points(h, "eval_bpb") for name, h in runs.items()}})


def _nonempty(panels: dict[str, Series]) -> dict[str, Series]:
    out = {title: {k: v for k, v in s.items() if v[0]} for title, s in panels.items()}
    return {title: s for title, s in out.items() if s}


def plot_panels(panels: dict[str, Series], path, title: str | None = None) -> None:
    """Side-by-side panels (one y-unit each) against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=False):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(x) < 12 else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(history: list[dict], path) -> None:
    """A run's ``loss_curve.png``: :func:`loss_panels` of its history."""
    plot_panels(loss_panels(history), path)


def _student_license(student: str) -> str | None:
    """``license`` from the student folder's own model card front matter, when it has one."""
    import yaml

    card = Path(student) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def card_metadata(recipe) -> dict:
    """Hugging Face model card front matter: ``base_model`` when the student starts from pretrained weights,
    ``datasets`` (the training data), ``license`` when the student's own card declares one."""
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["stillroom", "distillation"]}
    spec = recipe.student
    if spec.kind in ("pretrained", "cut"):
        meta["base_model"] = spec.source
    meta["datasets"] = [recipe.data.train]
    lic = _student_license(spec.source) if spec.kind != "scratch" else None
    if lic:
        meta["license"] = lic
    return meta


def model_card(recipe, metrics: dict, n_blocks: int | str, student=None) -> str:
    import yaml


    teachers = "\n".join(f"- `{t.path}`" + (f" (offline cache `{t.cache}`)" if t.cache else "")
                         for t in recipe.teachers) or "- none (plain CE / EMO)"
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    origin = describe_student(recipe.student, student)
    front = yaml.safe_dump(card_metadata(recipe), sort_keys=False, allow_unicode=True)
    return (f"---\n{front}---\n\n# {recipe.name}\n\n"
            f"{origin[0].upper()}{origin[1:]}, trained by stillroom.\n\n"
            f"## Teachers\n\n{teachers}\n\nFusion: {recipe.fusion.method} at {recipe.fusion.level} level, "
            f"top-k {recipe.fusion.top_k}; loss: λ={recipe.loss.ce_weight} CE + (1−λ) {recipe.loss.kind}.\n\n"
            f"## Data\n\n- train: `{recipe.data.train}` ({n_blocks} blocks of ≤ {recipe.data.seq_len} tokens)\n"
            f"- eval: `{recipe.data.eval}`\n\n## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
            f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe.model_dump(), sort_keys=False)}```\n")
