"""A plan's teachers: every ``teachers[]`` entry of a checked recipe built into the object the trainer asks.

KD teachers give a top-k target over the student's positions (fused with the others): a same-tokenizer model
run in-process, or an online / cached teacher aligned at byte level and projected onto the student's vocabulary
(``fusion.projection``). ALM and ULD teachers each add their own term (:mod:`stillroom.teachers.objectives`).
"""

from __future__ import annotations

from stillroom.models import precision
from stillroom.models.loading import load_causal_lm
from stillroom.teachers.kd import AlignedTeacher, SameTokenizerTeacher
from stillroom.teachers.objectives import ObjectiveConfig, ObjectiveTeacher, objective_teacher
from stillroom.teachers.xtoken import HybridTeacher, XTokenTeacher
from stillroom.tokenization.reverse import exact_map, reverse_map, without_twin
from stillroom.tokenization.tokens import TokenTable, same_tokenizer
from stillroom.tokenization.unbiased import BoundaryBias, unigram_probs
from stillroom.tokenization.vocab import VocabMap
from stillroom.training.data import sample_texts
from stillroom.training.plan import Plan


def build_teachers(plan: Plan, device=None) -> list:
    """One teacher per ``recipe.teachers`` entry of the plan: a KD teacher (same-tokenizer fast path, online
    aligned, or cached; its target is fused) or an ALM / ULD teacher (its own term)."""
    recipe, teachers = plan.recipe, []
    student_tok = plan.student_tokenizer
    for i, (spec, tok) in enumerate(zip(recipe.teachers, plan.teacher_tokenizers, strict=True)):
        name = spec.name or f"teacher{i}"
        if spec.objective != "kd":  # its own ALM / ULD term, never projected or fused
            teachers.append(build_teacher(spec, i, student_tok, tok, recipe))
            continue
        if spec.cache is None and spec.server is None and same_tokenizer(student_tok, tok):
            dtype = precision.auto_dtype(device or precision.training_device(), spec.dtype)
            model = load_causal_lm(spec.path, f"teachers.{i}.path", tokenizer=tok, dtype=dtype)
            teachers.append(SameTokenizerTeacher(model, recipe.fusion.top_k, recipe.loss.temperature, name))
            continue

        s_table, t_table = TokenTable.from_tokenizer(student_tok), TokenTable.from_tokenizer(tok)
        vmap = VocabMap.cached(t_table, s_table)
        source = signal_source(spec, tok, recipe.fusion.top_k, recipe.loss.temperature)
        fallback = recipe.fusion.projection if recipe.fusion.projection != "none" else "onehot"
        teachers.append(AlignedTeacher(source, s_table, t_table, vmap, fallback, name))
    return teachers


def signal_source(spec, tok, top_k: int, temperature: float):
    """Where a teacher entry's signal comes from: its cache, its server, or the model run here."""
    if spec.cache is not None:
        from stillroom.teachers.cache import CachedTeacher

        return CachedTeacher(spec.cache)
    if spec.server is not None:
        from stillroom.teachers.served import ServedTeacher

        return ServedTeacher(spec.server, tok, model=spec.server_model, top_k=top_k, temperature=temperature,
                             concurrency=spec.server_concurrency, source=f"{spec.server} ({spec.name})")
    from stillroom.teachers.online import OnlineTeacher

    return OnlineTeacher(spec.path, top_k=top_k, temperature=temperature, dtype=spec.dtype)


def build_teacher(spec, index: int, student_tok, teacher_tok, recipe) -> ObjectiveTeacher:
    """The recipe's ``teachers[index]`` with ``objective: alm | uld | xtoken``: online (top-1 is enough for ALM, which
    reads only ``gold_ce``) or from its cache."""

    k = 1 if spec.objective == "alm" and spec.server is None else recipe.fusion.top_k  # ALM reads gold_ce only
    source = signal_source(spec, teacher_tok, k, recipe.loss.temperature)
    lam = recipe.loss.ce_weight
    cfg = ObjectiveConfig(kind=spec.objective, weight=1.0 - lam if spec.weight is None else spec.weight,
                          alm_temperature=spec.alm_temperature, alm_divergence=spec.alm_divergence,
                          alm_chunks=spec.alm_chunks, temperature=recipe.loss.temperature,
                          chunk_size=recipe.loss.chunk_size, alm_bias_threshold=spec.alm_bias_threshold)
    s_table, t_table = TokenTable.from_tokenizer(student_tok), TokenTable.from_tokenizer(teacher_tok)
    name = spec.name or f"teacher{index}"
    if spec.objective == "xtoken":  # the student's vocabulary moved into the teacher's
        return XTokenTeacher(source, s_table, t_table, cfg, name, reverse=reverse_map(s_table, t_table, teacher_tok))
    if spec.objective == "hybrid":  # GOLD's hybrid: exact twins id by id, the rest sorted
        twins = exact_map(s_table, t_table)
        return HybridTeacher(source, s_table, t_table, cfg, name, reverse=twins,
                             unmatched=without_twin(s_table, twins))
    rule = None
    if spec.objective == "alm" and spec.alm_chunks == "unbiased":
        rule = bias_rule(recipe, student_tok, teacher_tok, s_table, t_table, spec.alm_bias_threshold)
    return objective_teacher(source, s_table, t_table, cfg, name, rule)


def bias_rule(recipe, student_tok, teacher_tok, s_table, t_table, threshold: float, sample_chars: int = 1_000_000):
    """The unbiased-boundary rule of a teacher/student pair, with unigram probabilities counted on the first
    ``sample_chars`` characters of the training data (``stillroom.tokenization.unbiased``)."""

    texts, n = [], 0
    for text in sample_texts(recipe):
        texts.append(text[: sample_chars - n])
        n += len(texts[-1])
        if n >= sample_chars:
            break
    return BoundaryBias(t_table, s_table, unigram_probs(teacher_tok, texts, len(t_table.token_bytes)),
                        unigram_probs(student_tok, texts, len(s_table.token_bytes)), teacher_tok, student_tok,
                        threshold)


