"""Inputs: the user's data read and batched for a student — documents packed into blocks, or chat records.

Contract: files in, batches out (``input_ids``, ``labels``, ``attention_mask``, texts and example ids for the
teachers); one-line :class:`~stillroom.errors.DataError` naming file, line, field and fix. No teachers, no
alignment (that is :mod:`stillroom.teachers`). (``stillroom/data/`` holds the files the package ships.)

- ``text``: :func:`load_texts`, :func:`iter_texts` — text files, folders, JSONL, Parquet, ``datasets`` folders;
- ``blocks``: documents packed into fixed-length blocks (:func:`make_blocks`, :class:`StreamingBlocks`) and
  their :class:`BlockCollator`;
- ``chat``: prompt/completion and chat records, templates, completion-only collators.
"""

from stillroom.exports import lazy

_EXPORTS = {
    "TextSource": "stillroom.inputs.text",
    "data_fingerprint": "stillroom.inputs.text",
    "iter_texts": "stillroom.inputs.text",
    "load_texts": "stillroom.inputs.text",
    "Block": "stillroom.inputs.blocks",
    "BlockCollator": "stillroom.inputs.blocks",
    "BlockDataset": "stillroom.inputs.blocks",
    "StreamingBlocks": "stillroom.inputs.blocks",
    "iter_blocks": "stillroom.inputs.blocks",
    "make_blocks": "stillroom.inputs.blocks",
    "CompletionCollator": "stillroom.inputs.chat",
    "Example": "stillroom.inputs.chat",
    "ExampleDataset": "stillroom.inputs.chat",
    "PromptCollator": "stillroom.inputs.chat",
    "completion_ids": "stillroom.inputs.chat",
    "load_examples": "stillroom.inputs.chat",
    "prompt_ids": "stillroom.inputs.chat",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
