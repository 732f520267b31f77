"""A recipe's data: what the trainer reads, from the recipe's ``data`` section.

:func:`training_data` gives the training dataset, its collator and the evaluation documents or examples for
every ``data.format``: packed text blocks (in memory, or streamed with ``data.streaming``), or completion
records (prompt/completion, chat; prompt-only records with ``onpolicy.lambda`` = 1). The same functions serve
``train``, ``train --check`` (caches must cover exactly :func:`training_blocks`) and ``train --export-blocks``.
"""

from __future__ import annotations

import itertools

from stillroom.errors import ConfigError
from stillroom.files import check_output_file
from stillroom.inputs.blocks import (
    Block,
    BlockCollator,
    BlockDataset,
    StreamingBlocks,
    cap_documents,
    export_blocks,
    iter_blocks,
    make_blocks,
)
from stillroom.inputs.chat import CompletionCollator, ExampleDataset, PromptCollator, load_examples
from stillroom.inputs.text import is_blocks_file, iter_texts, load_texts
from stillroom.models.student import student_tokenizer


def training_data(recipe, tokenizer) -> tuple:
    """``(train_dataset, collator, eval_docs)`` for the recipe: eval_docs is a list of documents (text) or of
    examples (completion data), the first ``train.eval_max_blocks`` × ``data.seq_len`` tokens of ``data.eval``
    (records: the first ``train.eval_max_blocks``), or None without ``data.eval``."""
    d, cap = recipe.data, recipe.train.eval_max_blocks
    if d.format == "text":
        train = streaming_blocks(recipe, tokenizer) if d.streaming else BlockDataset(training_blocks(recipe, tokenizer))
        evals = None
        if d.eval:
            evals = [t for _, t in load_texts(d.eval, d.text_field, d.documents)]
            if cap:
                evals = cap_documents(evals, tokenizer, cap * d.seq_len)
        return train, BlockCollator(tokenizer, d.seq_len, d.isolate_documents), evals
    o = recipe.onpolicy
    prompts_only = o is not None and o.lambda_ >= 1  # every completion is the student's: prompts suffice
    train = load_examples(d.train, need_completion=not prompts_only)[: d.max_blocks or None]
    evals = load_examples(d.eval)[: cap or None] if d.eval else None
    collator = (PromptCollator(tokenizer, d.seq_len, o.max_new_tokens) if prompts_only
                else CompletionCollator(tokenizer, d.seq_len))
    return ExampleDataset(train), collator, evals


def sample_texts(recipe):
    """The training data's texts: documents, or on completion data each record's prompt text and completion."""
    d = recipe.data
    if d.format == "text":
        yield from (text for _, text in iter_texts(d.train, d.text_field, d.documents))
        return
    for ex in load_examples(d.train, need_completion=False):
        parts = [m.get("content") for m in ex.messages] if ex.messages is not None else [ex.prompt]
        yield "\n".join(p for p in [*parts, ex.completion] if isinstance(p, str) and p)


def training_blocks(recipe, tokenizer) -> list[Block]:
    """The recipe's training blocks: its documents (``data.documents``) packed or not (``data.packing``)."""
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
    d = recipe.data
    if d.format != "text":  # completion records are rendered per model: no text blocks to cache
        raise ConfigError(f"--export-blocks: data.format {d.format!r} has no text blocks; its teachers run online")
    check_output_file(path, "--export-blocks", overwrite=overwrite, ours=is_blocks_file)
    tok = student_tokenizer(recipe.student)
    blocks = iter_blocks(iter_texts(d.train, d.text_field, d.documents), tok, d.seq_len, d.add_bos, d.packing)
    return export_blocks(itertools.islice(blocks, d.max_blocks), path)
