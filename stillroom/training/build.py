"""A recipe's objects: its training data, its teachers.

The recipe (:mod:`stillroom.training.recipe`) is checked once by :func:`stillroom.training.plan.check_recipe`;
these builders turn its sections into what the trainer consumes — blocks or a stream of blocks, completion
datasets, same-tokenizer / aligned / ALM / ULD teachers — and are shared by ``train``, ``train --check`` and
``train --export-blocks``.
"""

from __future__ import annotations

from stillroom.errors import ConfigError
from stillroom.inputs.blocks import Block, StreamingBlocks, export_blocks, iter_blocks, make_blocks
from stillroom.inputs.chat import CompletionCollator, Example, ExampleDataset, load_examples
from stillroom.models import precision
from stillroom.models.loading import load_causal_lm
from stillroom.models.student import student_tokenizer
from stillroom.teachers import objectives
from stillroom.teachers.kd import AlignedTeacher, SameTokenizerTeacher
from stillroom.teachers.objectives import ObjectiveConfig, ObjectiveTeacher
from stillroom.tokenization.tokens import same_tokenizer


def training_data(recipe, tokenizer) -> tuple[ExampleDataset, CompletionCollator, list[Example] | None]:
    """A recipe's completion data (``data.format`` prompt_completion / chat): the training examples (the first
    ``data.max_blocks`` when set), their collator (rows of at most ``data.seq_len`` tokens) and the evaluation
    examples of ``data.eval`` (the first ``train.eval_max_blocks`` when set), or None."""
    d = recipe.data
    train = load_examples(d.train)[: d.max_blocks or None]
    evals = load_examples(d.eval)[: recipe.train.eval_max_blocks or None] if d.eval else None
    return ExampleDataset(train), CompletionCollator(tokenizer, d.seq_len), evals


def build_teachers(recipe, toks: dict, device=None) -> list:
    """One :class:`Teacher` per ``recipe.teachers`` entry: same-tokenizer fast path, online-aligned, or cached."""
    teachers = []
    student_tok = toks["student"]
    for i, (spec, tok) in enumerate(zip(recipe.teachers, toks["teachers"], strict=True)):
        name = spec.name or f"teacher{i}"
        if spec.objective != "kd":  # its own ALM / ULD term, never projected or fused
            teachers.append(objectives.build_teacher(spec, i, student_tok, tok, recipe))
            continue
        if spec.cache is None and same_tokenizer(student_tok, tok):
            dtype = precision.auto_dtype(device or precision.training_device(), spec.dtype)
            model = load_causal_lm(spec.path, f"teachers.{i}.path", tokenizer=tok, dtype=dtype)
            teachers.append(SameTokenizerTeacher(model, recipe.fusion.top_k, recipe.loss.temperature, name))
            continue
        from stillroom.tokenization.tokens import TokenTable
        from stillroom.tokenization.vocab import VocabMap

        s_table, t_table = TokenTable.from_tokenizer(student_tok), TokenTable.from_tokenizer(tok)
        vmap = VocabMap.cached(t_table, s_table)
        if spec.cache is not None:
            from stillroom.teachers.cache import CachedTeacher

            source = CachedTeacher(spec.cache)
        else:
            from stillroom.teachers.online import OnlineTeacher

            source = OnlineTeacher(spec.path, top_k=recipe.fusion.top_k, temperature=recipe.loss.temperature,
                                   dtype=spec.dtype)
        fallback = recipe.fusion.projection if recipe.fusion.projection != "none" else "onehot"
        teachers.append(AlignedTeacher(source, s_table, t_table, vmap, fallback, name))
    return teachers


def build_teacher(spec, index: int, student_tok, teacher_tok, recipe) -> ObjectiveTeacher:
    """The recipe's ``teachers[index]`` with ``objective: alm | uld``: online (top-1 is enough for ALM, which
    reads only ``gold_ce``) or from its cache."""
    from stillroom.tokenization.tokens import TokenTable

    if spec.cache is not None:
        from stillroom.teachers.cache import CachedTeacher

        source = CachedTeacher(spec.cache)
    else:
        from stillroom.teachers.online import OnlineTeacher

        k = 1 if spec.objective == "alm" else recipe.fusion.top_k
        source = OnlineTeacher(spec.path, top_k=k, temperature=recipe.loss.temperature, dtype=spec.dtype)
    lam = recipe.loss.ce_weight
    cfg = ObjectiveConfig(spec.objective, 1.0 - lam if spec.weight is None else spec.weight, spec.alm_temperature,
                          spec.alm_divergence, spec.alm_chunks, recipe.loss.temperature, recipe.loss.chunk_size,
                          spec.alm_bias_threshold)
    s_table, t_table = TokenTable.from_tokenizer(student_tok), TokenTable.from_tokenizer(teacher_tok)
    rule = None
    if spec.objective == "alm" and spec.alm_chunks == "unbiased":
        rule = bias_rule(recipe, student_tok, teacher_tok, s_table, t_table, spec.alm_bias_threshold)
    return ObjectiveTeacher(source, s_table, t_table, cfg, spec.name or f"teacher{index}", rule)


def _sample_texts(recipe):
    """The training data's texts: documents, or on completion data each record's prompt text and completion."""
    from stillroom.inputs.text import iter_texts

    d = recipe.data
    if d.format == "text":
        yield from (text for _, text in iter_texts(d.train, d.text_field, d.documents))
        return
    from stillroom.inputs.chat import load_examples

    for ex in load_examples(d.train, need_completion=False):
        parts = [m.get("content") for m in ex.messages] if ex.messages is not None else [ex.prompt]
        yield "\n".join(p for p in [*parts, ex.completion] if isinstance(p, str) and p)


def bias_rule(recipe, student_tok, teacher_tok, s_table, t_table, threshold: float, sample_chars: int = 1_000_000):
    """The unbiased-boundary rule of a teacher/student pair, with unigram probabilities counted on the first
    ``sample_chars`` characters of the training data (``stillroom.tokenization.unbiased``)."""
    from stillroom.tokenization.unbiased import BoundaryBias, unigram_probs

    texts, n = [], 0
    for text in _sample_texts(recipe):
        texts.append(text[: sample_chars - n])
        n += len(texts[-1])
        if n >= sample_chars:
            break
    return BoundaryBias(t_table, s_table, unigram_probs(teacher_tok, texts, len(t_table.token_bytes)),
                        unigram_probs(student_tok, texts, len(s_table.token_bytes)), teacher_tok, student_tok,
                        threshold)


def training_blocks(recipe, tokenizer) -> list[Block]:
    """The recipe's training blocks: its documents (``data.documents``) packed or not (``data.packing``)."""
    from stillroom.inputs.text import load_texts

    d = recipe.data
    blocks = make_blocks(load_texts(d.train, d.text_field, d.documents), tokenizer, d.seq_len, d.add_bos, d.packing)
    return blocks[: d.max_blocks] if d.max_blocks else blocks


def streaming_blocks(recipe, tokenizer) -> StreamingBlocks:
    """The recipe's training blocks packed on the fly (``data.streaming``): the same blocks as
    :func:`training_blocks`, never all in memory. One stream for all ranks: the Trainer's data loader
    (accelerate) gives each rank its own batches of it."""
    d = recipe.data
    return StreamingBlocks(d.train, tokenizer, d.seq_len, text_field=d.text_field, documents=d.documents,
                           add_bos=d.add_bos, pack=d.packing, max_blocks=d.max_blocks, rank=0, world_size=1)


def export_training_blocks(recipe, path, overwrite: bool = False) -> int:
    """Write the recipe's training blocks as JSONL ``{"id", "text"}``: build a teacher cache on exactly these
    texts with ``stillroom cache --data PATH`` and point ``teachers.N.cache`` at it (evaluation needs no
    teacher). Streamed: each block is written as it is packed, so any data size fits. An existing file is kept
    (:class:`~stillroom.errors.OutputExistsError`) unless ``overwrite``."""
    import itertools

    from stillroom.files import check_output_file
    from stillroom.inputs.text import is_blocks_file, iter_texts

    d = recipe.data
    if d.format != "text":  # completion records are rendered per model: no text blocks to cache
        raise ConfigError(f"--export-blocks: data.format {d.format!r} has no text blocks; its teachers run online")
    check_output_file(path, "--export-blocks", overwrite=overwrite, ours=is_blocks_file)
    tok = student_tokenizer(recipe.student)
    blocks = iter_blocks(iter_texts(d.train, d.text_field, d.documents), tok, d.seq_len, d.add_bos, d.packing)
    return export_blocks(itertools.islice(blocks, d.max_blocks), path)
