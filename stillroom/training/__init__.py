"""Training: a recipe becomes a plan, the plan a run (``stillroom train``).

Contract, one way down: ``recipe`` (pydantic specs: every key and default of a recipe, the one source of
configuration) → ``plan`` (:func:`make_plan`: validated once, cheapest checks first, no weights loaded) →
``data`` and ``build`` (the plan's datasets and teachers) → ``trainer`` / ``onpolicy`` (the
``transformers.Trainer`` subclasses) → ``run`` (:func:`train`: the whole run). ``runs``, ``callbacks``,
``report`` and ``switches`` serve the run: its folder, what it shows, what it leaves, its speed switches.
"""

from stillroom.exports import lazy

_EXPORTS = {
    "TrainResult": "stillroom.training.run",
    "train": "stillroom.training.run",
    "Plan": "stillroom.training.plan",
    "make_plan": "stillroom.training.plan",
    "DataSpec": "stillroom.training.recipe",
    "FusionSpec": "stillroom.training.recipe",
    "LossSpec": "stillroom.training.recipe",
    "OnPolicySpec": "stillroom.training.recipe",
    "Recipe": "stillroom.training.recipe",
    "StudentSpec": "stillroom.training.recipe",
    "TeacherSpec": "stillroom.training.recipe",
    "TrainSpec": "stillroom.training.recipe",
    "load_recipe": "stillroom.training.recipe",
    "DistillTrainer": "stillroom.training.trainer",
    "OnPolicyTrainer": "stillroom.training.onpolicy",
    "export_training_blocks": "stillroom.training.data",
    "training_blocks": "stillroom.training.data",
    "training_data": "stillroom.training.data",
    "build_teachers": "stillroom.training.build",
    "TrainInterrupted": "stillroom.training.runs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
