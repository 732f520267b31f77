"""A recipe resolved into a plan: everything about a run that can be known before training starts.

``recipe → plan → run``: :func:`make_plan` validates the recipe once, cheapest checks first, and returns a
:class:`Plan` (the recipe, the student's and teachers' tokenizers, the notes to show); ``stillroom train
--check`` stops there, :func:`stillroom.training.run.train` builds the run from the same plan. It loads tokenizers, model configs, data and cache manifests — never model weights — so a run
that would crash after the models load (or, worse, train on garbage) fails in seconds with one line naming the
key and the fix: folders without weights or tokenizer, a tokenizer that does not fit its model's embedding,
``data.seq_len`` beyond the student's context, empty or unreadable data, a cache built for another teacher or
over other texts, ``report_to`` loggers that are not installed, speed switches that cannot work here
(:mod:`stillroom.training.switches`; those that work but will be slow come back as warnings).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stillroom.errors import ConfigError, ModelError
from stillroom.inputs.chat import load_examples
from stillroom.inputs.text import iter_texts, load_texts, text_sha
from stillroom.models.loading import check_vocab_fits, load_tokenizer, model_context, resolve_model
from stillroom.models.student import student_tokenizer
from stillroom.teachers.cache import CachedTeacher
from stillroom.tokenization.tokens import TokenTable, same_tokenizer
from stillroom.training import switches
from stillroom.training.data import streaming_blocks, training_blocks
from stillroom.training.recipe import REPORTERS, Recipe, load_recipe


@dataclass
class Plan:
    """A checked recipe and what checking it loaded: the student's tokenizer, one tokenizer per teacher (in
    ``recipe.teachers`` order) and ``warnings`` (one-line notes on switches that will work, but slowly)."""

    recipe: Recipe
    student_tokenizer: Any
    teacher_tokenizers: list = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def make_plan(recipe: Recipe | dict | str | os.PathLike, overrides: Sequence[str] = ()) -> Plan:
    """Validate ``recipe`` (a :class:`Recipe`, a dict or a YAML path, with ``key=value`` overrides) and resolve
    it into a :class:`Plan`; raises a :class:`~stillroom.errors.StillroomError` naming the key and the fix."""
    from transformers import AutoConfig

    if not isinstance(recipe, Recipe) or overrides:
        recipe = load_recipe(recipe, list(overrides))
    spec = recipe.student
    student_tok = student_tokenizer(spec)
    if spec.kind == "scratch":
        cfg = spec.config
        context = next((int(cfg[k]) for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in cfg), None)
        try:
            config = AutoConfig.for_model(**cfg)
        except ValueError:
            raise ConfigError(f"student.config.model_type: {cfg['model_type']!r} is not a model type transformers "
                              "knows; use one it does (e.g. gpt2, llama)") from None
    else:
        key = "student.init_from" if spec.kind == "cut" else "student.path"
        folder = resolve_model(spec.source, key)  # a .gguf student is converted here, once
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        check_vocab_fits(config, student_tok, f"{key} {spec.source}")
        context = model_context(config)
    if context is not None and recipe.data.seq_len > context:
        raise ConfigError(f"data.seq_len: got {recipe.data.seq_len}, but the student's context is {context} "
                          f"tokens; set data.seq_len={context} or less")
    if recipe.data.format != "text":
        _check_completion_data(recipe)
    elif recipe.data.streaming:  # a stream is checked as it is read; here only that it opens and holds a document
        next(iter_texts(recipe.data.train, recipe.data.text_field, recipe.data.documents))
    else:
        load_texts(recipe.data.train, recipe.data.text_field, recipe.data.documents)
    if recipe.data.eval and recipe.data.format == "text":
        load_texts(recipe.data.eval, recipe.data.text_field, recipe.data.documents)
    for name in recipe.train.report_to:
        modules = REPORTERS.get(name, ())
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            fix = "pip install 'stillroom[tensorboard]'" if name == "tensorboard" else f"pip install {modules[0]}"
            raise ConfigError(f"train.report_to: {name!r} needs the {modules[0]} package, which is not installed; "
                              f"{fix}, or remove {name!r}")
    warnings = switches.check(recipe, config)
    teacher_toks = []
    for i, spec in enumerate(recipe.teachers):
        key = f"teachers.{i}.path"
        if spec.server is not None:  # scored by the server: only its tokenizer is needed here
            tok = load_tokenizer(spec.path, key, model=False)  # a folder or a .gguf, its weights untouched
        else:
            tok = load_tokenizer(spec.path, key)
            folder = resolve_model(spec.path, key)  # a .gguf teacher is converted here, once
            check_vocab_fits(AutoConfig.from_pretrained(folder, trust_remote_code=False), tok, f"{key} {spec.path}")
        teacher_toks.append(tok)
        if recipe.fusion.projection == "none" and not same_tokenizer(student_tok, tok):
            raise ConfigError(f"{key}: {spec.path} uses a different tokenizer from the student and "
                              "fusion.projection is 'none'; set fusion.projection to 'onehot' or 'bytes' "
                              "to project it onto the student vocabulary")
        if recipe.fusion.top_k is None and (len(recipe.teachers) != 1 or spec.cache is not None or spec.server
                                            or recipe.fusion.include_student or not same_tokenizer(student_tok, tok)):
            raise ConfigError("fusion.top_k: null (the dense teacher distribution) needs exactly one online "
                              "teacher with the student's tokenizer; set fusion.top_k to a number (e.g. 10)")
        if spec.cache is not None:
            _check_cache(recipe, spec, i, student_tok, tok)
    return Plan(recipe=recipe, student_tokenizer=student_tok, teacher_tokenizers=teacher_toks, warnings=warnings)


def _check_cache(recipe, spec, i: int, student_tok, tok) -> None:
    """The cache must have been built for this teacher (weights and tokenizer hashes) and temperature, over the
    recipe's training blocks (``train --export-blocks``): every block's id must be in it, with the same text."""

    key = f"teachers.{i}.cache"
    try:
        if spec.server is None:
            cached = CachedTeacher(spec.cache, teacher=resolve_model(spec.path, f"teachers.{i}.path"),
                                   temperature=recipe.loss.temperature)
        else:  # weights live on the server: the cache must be of this tokenizer (and the server's own record)
            cached = CachedTeacher(spec.cache, temperature=recipe.loss.temperature)
            if cached.tokenizer_hash != TokenTable.from_tokenizer(tok).hash:
                raise ConfigError(f"cache {spec.cache} was built with another tokenizer than {spec.path}'s; "
                                  "rebuild it with stillroom cache --server for this teacher")
    except (ConfigError, ModelError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{key}: {e}") from None
    d = recipe.data
    blocks = streaming_blocks(recipe, student_tok).blocks() if d.streaming else training_blocks(recipe, student_tok)
    index = cached._index  # id -> (shard, row, text sha); read-only use
    n, bad = 0, []  # ids of the blocks the cache lacks
    for b in blocks:  # a stream is read once, block by block
        n += 1
        if b.example_id not in index or index[b.example_id][2] != text_sha(b.text):
            bad.append(b.example_id)
    if bad:
        raise ConfigError(f"{key}: {spec.cache} was built over other texts ({len(bad)} of {n} training "
                          f"blocks, e.g. {bad[0]!r}, are not in it); rebuild it: stillroom train RECIPE "
                          "--export-blocks blocks.jsonl, then stillroom cache --data blocks.jsonl")


def _check_completion_data(recipe) -> None:
    """``data.format`` prompt_completion / chat: records of that form, and only what trains on them."""
    d = recipe.data
    for key in ("streaming", "packing"):
        if getattr(d, key) and key in d.model_fields_set:
            raise ConfigError(f"data.{key}: does not apply to data.format {d.format!r} (one record per row, "
                              f"completion-only loss); remove data.{key}")
    for key, path in (("data.train", d.train), ("data.eval", d.eval)):
        if path is None:
            continue
        on = recipe.onpolicy  # λ = 1: every completion is the student's, so prompt-only records do
        examples = load_examples(path, need_completion=key != "data.train" or on is None or on.lambda_ < 1)
        form = "chat" if examples[0].messages is not None else "prompt_completion"
        other = next((e for e in examples if (e.messages is not None) != (form == "chat")), None)
        if form != d.format or other is not None:
            raise ConfigError(f"{key}: {path} holds {form if form != d.format else 'mixed'} records but "
                              f"data.format is {d.format!r}; set data.format={form} or fix the file")
    for i, t in enumerate(recipe.teachers):
        if t.cache is not None:
            raise ConfigError(f"teachers.{i}.cache: the offline cache does not support data.format {d.format!r} "
                              "yet (each teacher renders the prompt with its own template); remove the cache to "
                              "run the teacher online")
