"""Load a text corpus (DATA) as ``(example_id, text)`` pairs, the unit every stage keys on.

Accepted DATA, detected from the path:

- a ``.jsonl`` / ``.json`` file: one JSON object per line (or, in a ``.json`` file, one JSON array of objects)
  with a ``text`` field (``text_field`` overrides);
  an ``id`` field, when present, is the example id, otherwise ``"<file stem>:<line number>"``;
- any other file: plain text, one example per line; blank lines are skipped (ids ``"<stem>:<line>"`` keep
  the original 1-based line numbers, so they do not shift when blank lines are added or removed);
- a folder holding ``dataset_info.json`` / ``state.json``: a Hugging Face ``datasets`` dataset saved with
  ``save_to_disk`` (a ``DatasetDict`` must have exactly one split: no split is picked silently); ids come from an
  ``id`` column when present, else the row number;
- any other folder: every ``*.txt`` below it (sorted) is one example, id = path relative to the folder.

Ids must be unique; texts must be non-empty UTF-8 (no NUL bytes). Both are checked here so later stages never see bad rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from stillroom.errors import DataError, MissingPathError

PACKAGE_DATA = Path(__file__).parent / "data"  # the shipped corpus and default models (``pkg:`` paths)


def load_texts(path: str | os.PathLike, text_field: str = "text") -> list[tuple[str, str]]:
    """Read DATA at ``path``; returns ``[(example_id, text), ...]`` in a stable order."""
    path = Path(path)
    if not path.exists():
        raise MissingPathError(f"DATA {path} does not exist (expected a text file, a folder of .txt, "
                                f"a .jsonl file with a {text_field!r} field, or a datasets folder)")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or \
                (path / "dataset_dict.json").exists():
            rows = _load_datasets_dir(path, text_field)
        else:
            rows = _load_txt_folder(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = _load_jsonl(path, text_field)
    else:
        rows = _load_lines(path)
    if not rows:
        raise DataError(f"DATA {path} holds no examples; add text (one example per line, or records with a "
                        f"{text_field!r} field)")
    seen: set[str] = set()
    for ex_id, _ in rows:
        if ex_id in seen:
            raise DataError(f"DATA {path}: example id {ex_id!r} occurs twice; ids must be unique")
        seen.add(ex_id)
    return rows


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


def _load_lines(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            rows.append((f"{path.stem}:{n}", line))
    return rows


def _load_txt_folder(path: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"DATA folder {path} holds no .txt files; add some or pass a file")
    rows = []
    for p in files:
        text = _read_text(p)
        if not text.strip():
            raise DataError(f"DATA file {p} is empty; remove it or add text")
        rows.append((p.relative_to(path).as_posix(), text))
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
