"""stillroom: distil and fuse teacher language models into a student, whatever tokenizers they use.

The public face: ``from stillroom import train, DistillTrainer, align, TokenTable, ...``; every name loads on
first use, so ``import stillroom`` stays cheap. The layers, bottom up (each imports only those below it;
docs/architecture.md draws them):

0. ``errors``, ``targets`` (the data contracts), ``exports``; 1. ``files``, ``progress`` (shared rules);
2. ``tokenization`` (bytes, alignment, vocabulary maps, projection), ``models`` (loading, cutting),
   ``losses`` (divergences, EMO, ALM, ULD, chunked fused-linear forms);
3. ``inputs`` (text, blocks, chat records);
4. ``teachers`` (online, cached, KD / ALM / ULD, fusion), ``generation`` (healing, sampling), ``evaluation``,
   ``testing`` (tiny local models for tests and examples);
5. ``training`` (recipe → plan → run); 6. ``demo``; 7. ``cli``.
"""

from stillroom.exports import lazy

__version__ = "0.1.0"

_EXPORTS = {
    "train": "stillroom.training.run",
    "TrainResult": "stillroom.training.run",
    "make_plan": "stillroom.training.plan",
    "load_recipe": "stillroom.training.recipe",
    "DistillTrainer": "stillroom.training.trainer",
    "OnPolicyTrainer": "stillroom.training.onpolicy",
    "LossSpec": "stillroom.training.recipe",
    "FusionSpec": "stillroom.training.recipe",
    "distill_loss": "stillroom.losses.distill",
    "fused_linear_distill_loss": "stillroom.losses.fused_linear",
    "TokenTable": "stillroom.tokenization.tokens",
    "align": "stillroom.tokenization.align",
    "project": "stillroom.tokenization.project",
    "VocabMap": "stillroom.tokenization.vocab",
    "SparseTarget": "stillroom.targets",
    "TeacherOutput": "stillroom.targets",
    "OnlineTeacher": "stillroom.teachers.online",
    "CachedTeacher": "stillroom.teachers.cache",
    "write_cache": "stillroom.teachers.cache",
    "SameTokenizerTeacher": "stillroom.teachers.kd",
    "AlignedTeacher": "stillroom.teachers.kd",
    "fuse": "stillroom.teachers.fusion",
    "generate": "stillroom.generation.healing",
    "evaluate": "stillroom.evaluation",
    "load_model": "stillroom.evaluation",
    "load_texts": "stillroom.inputs.text",
    "StillroomError": "stillroom.errors",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
