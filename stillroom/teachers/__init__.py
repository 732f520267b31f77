"""Teachers: what a teacher says about the student's batch, online or from a cache, one teacher or several fused.

Contract: two kinds of teacher, two small protocols the trainer calls.

- a **KD teacher** (:class:`Teacher`: ``targets(batch) -> (SparseTarget, CE)``) gives a top-k target over the
  student's positions and vocabulary; all KD teachers are fused into one target (``fusion``: MinCE / AvgCE);
  :class:`SameTokenizerTeacher`, :class:`AlignedTeacher` (byte-aligned and projected, ``kd``);
- a **term teacher** (:class:`TermTeacher`: ``loss_sum(hidden, weight, batch) -> w·ΣD``) adds its own term:
  :class:`ALMTeacher`, :class:`ULDTeacher` (``objectives``; several ALM teachers fuse into one term,
  ``alm_fusion``), :class:`XTokenTeacher` (a KL in the teacher's own vocabulary, ``xtoken``). A new objective is one class implementing :class:`TermTeacher`.

Their signals come from :class:`OnlineTeacher` (a model run in-process, ``online``), :class:`ServedTeacher` (a
model behind an OpenAI-compatible server — llama.cpp, vLLM — ``served``) or :class:`CachedTeacher`
(a compact top-k cache written once by :func:`write_cache`, ``cache`` + ``codec``); completion batches align
only the completion regions (``completion``).
"""

from stillroom.exports import lazy

_EXPORTS = {
    "AlignedTeacher": "stillroom.teachers.kd",
    "SameTokenizerTeacher": "stillroom.teachers.kd",
    "Teacher": "stillroom.teachers.kd",
    "ObjectiveConfig": "stillroom.teachers.config",
    "ALMTeacher": "stillroom.teachers.objectives",
    "ObjectiveTeacher": "stillroom.teachers.objectives",
    "TermTeacher": "stillroom.teachers.objectives",
    "ULDTeacher": "stillroom.teachers.objectives",
    "objective_teacher": "stillroom.teachers.objectives",
    "XTokenTeacher": "stillroom.teachers.xtoken",
    "OnlineTeacher": "stillroom.teachers.online",
    "TeacherSignal": "stillroom.teachers.online",
    "ServedTeacher": "stillroom.teachers.served",
    "ServedStats": "stillroom.teachers.served",
    "CachedTeacher": "stillroom.teachers.cache",
    "verify_cache": "stillroom.teachers.cache",
    "write_cache": "stillroom.teachers.cache",
    "fuse": "stillroom.teachers.fusion",
    "fusion_weights": "stillroom.teachers.fusion",
    "fused_alm": "stillroom.teachers.alm_fusion",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
