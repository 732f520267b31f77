"""Load a text corpus (DATA) as ``(example_id, text)`` pairs, the unit every stage keys on.

Accepted DATA, detected from the path:

- a ``.jsonl`` / ``.json`` file: one JSON object per line (or, in a ``.json`` file, one JSON array of objects)
  with a ``text`` field (``text_field`` overrides);
  an ``id`` field, when present, is the example id, otherwise ``"<file stem>:<line number>"``;
- any other file: plain text, split into documents by ``documents`` (below);
- a folder holding ``dataset_info.json`` / ``state.json``: a Hugging Face ``datasets`` dataset saved with
  ``save_to_disk`` (a ``DatasetDict`` must have exactly one split: no split is picked silently); ids come from an
  ``id`` column when present, else the row number;
- any other folder: every ``*.txt`` below it (sorted), id = path relative to the folder, split by ``documents``.

``documents`` says what one document (example) of a plain text file is — the same option for ``train``,
``eval`` and ``cache``, so every stage agrees:

- ``"file"`` (default): the whole file, every byte kept (prose and verse are read as the running text they are);
- ``"paragraph"``: each run of non-blank lines (blank lines separate documents and are dropped);
- ``"line"``: each non-blank line.

Ids of a paragraph or line are ``"<stem>:<first line number>"`` (1-based, counted in the original file, so they
do not shift when blank lines are added or removed); a folder's are ``"<relative path>:<line>"``.

Ids must be unique; texts must be non-empty UTF-8 (no NUL bytes). Both are checked here so later stages never see bad rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stillroom.errors import ConfigError, DataError, MissingPathError

PACKAGE_DATA = Path(__file__).parent / "data"  # the shipped corpus and default models (``pkg:`` paths)


DOCUMENTS = ("file", "paragraph", "line")


def load_texts(path: str | os.PathLike, text_field: str = "text", documents: str = "file") -> list[tuple[str, str]]:
    """Read DATA at ``path``; returns ``[(example_id, text), ...]`` in a stable order."""
    if documents not in DOCUMENTS:
        raise ConfigError(f"documents={documents!r} is not one of 'file', 'paragraph', 'line'; pick one "
                         "(what one document of a plain .txt file is)")
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"DATA {path} does not exist (expected a text file, a folder of .txt, "
                                f"a .jsonl file with a {text_field!r} field, or a datasets folder)")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or \
                (path / "dataset_dict.json").exists():
            rows = _load_datasets_dir(path, text_field)
        else:
            rows = _load_txt_folder(path, documents)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = _load_jsonl(path, text_field)
    else:
        rows = _split(_read_text(path), path.stem, documents)
    if not rows:
        raise DataError(f"DATA {path} holds no examples; add text (one example per line, or records with a "
                        f"{text_field!r} field)")
    seen: set[str] = set()
    for ex_id, _ in rows:
        if ex_id in seen:
            raise DataError(f"DATA {path}: example id {ex_id!r} occurs twice; ids must be unique")
        seen.add(ex_id)
    return rows


def is_blocks_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file ``train --export-blocks`` wrote (JSONL records of exactly ``id`` and ``text``),
    which a later export may replace."""
    try:
        with Path(path).open(encoding="utf-8") as f:
            first = f.readline()
        return sorted(json.loads(first)) == ["id", "text"]
    except (OSError, ValueError, TypeError, UnicodeDecodeError):
        return False


def data_fingerprint(rows: list[tuple[str, str]]) -> str:
    """sha256 over the ordered ``(id, text)`` pairs: two corpora with the same fingerprint are the same data."""
    h = hashlib.sha256()
    for ex_id, text in rows:
        for part in (ex_id, text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()


def text_sha(text: str) -> str:
    """Short content hash of one text (first 16 hex digits of its sha256)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_text(path: Path) -> str:
    """The file as text; a file that is not UTF-8 text is a :class:`DataError` naming the file and line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"DATA {path}: line {line} is not UTF-8 (byte 0x{raw[e.start]:02x}); DATA must be UTF-8 "
                        "text: convert it (e.g. iconv -t UTF-8) or pass another file") from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError(f"DATA {path}: line {line} holds NUL bytes, so this is a binary file; DATA must be "
                        "UTF-8 text")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text-mode open() reads


def _split(text: str, name: str, documents: str) -> list[tuple[str, str]]:
    """One file's text -> documents: the whole text, its paragraphs or its lines (see the module docstring)."""
    if documents == "file":
        return [(name, text)] if text.strip() else []
    rows: list[tuple[str, str]] = []
    para: list[str] = []
    first = 0
    for n, line in enumerate(text.split("\n"), 1):
        if documents == "line":
            if line.strip():
                rows.append((f"{name}:{n}", line))
        elif line.strip():
            if not para:
                first = n
            para.append(line)
        elif para:
            rows.append((f"{name}:{first}", "\n".join(para)))
            para = []
    if para:
        rows.append((f"{name}:{first}", "\n".join(para)))
    return rows


def _load_txt_folder(path: Path, documents: str = "file") -> list[tuple[str, str]]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"DATA folder {path} holds no .txt files; add some or pass a file")
    rows = []
    for p in files:
        text = _read_text(p)
        if not text.strip():
            raise DataError(f"DATA file {p} is empty; remove it or add text")
        rows += _split(text, p.relative_to(path).as_posix(), documents)
    return rows


def _load_jsonl(path: Path, text_field: str) -> list[tuple[str, str]]:
    rows = []
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):  # one JSON array of records
        try:
            records = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise DataError(f"DATA {path}: not valid JSON (line {e.lineno}: {e.msg}); fix it or write one record "
                            "per line (.jsonl)") from None
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue  # blank lines between records are allowed in JSONL
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"DATA {path}: line {n} is not valid JSON ({e.msg}); JSONL needs one JSON "
                                "object per line") from None
    for n, rec in records:
        if not isinstance(rec, dict) or text_field not in rec:
            raise DataError(f"DATA {path}:{n}: record has no {text_field!r} field (fields: "
                            f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}); name the field "
                            "with --text-field (cache) or data.text_field=NAME (recipes)")
        rows.append((_row_id(rec.get("id"), f"{path.stem}:{n}"), _check_text(rec[text_field], f"{path}:{n}")))
    return rows


def _load_datasets_dir(path: Path, text_field: str) -> list[tuple[str, str]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:  # never pick a split silently: train and test data must not mix by accident
            raise DataError(f"DATA {path} is a DatasetDict with splits {list(ds)}; pass one split's folder "
                            f"(e.g. {path / next(iter(ds))})")
        ds = next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise DataError(f"DATA {path}: dataset has no {text_field!r} column (columns: {ds.column_names}); name "
                        "the column with --text-field (cache) or data.text_field=NAME (recipes)")
    ids = ds["id"] if "id" in ds.column_names else None
    texts = ds[text_field]
    return [(_row_id(ids[i] if ids is not None else None, str(i)), _check_text(t, f"{path} row {i}"))
            for i, t in enumerate(texts)]


def _row_id(value, default: str) -> str:
    return default if value is None else str(value)


def _check_text(text, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"DATA {where}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"DATA {where}: text is empty; drop the record or fill it")
    return text
