"""Load a text corpus (DATA) as ``(example_id, text)`` pairs, the unit every stage keys on.

Accepted DATA, detected from the path:

- a ``.jsonl`` / ``.json`` file: one JSON object per line (or, in a ``.json`` file, one JSON array of objects)
  with a ``text`` field (``text_field`` overrides);
  an ``id`` field, when present, is the example id, otherwise ``"<file stem>:<line number>"``;
- any other file: plain text, split into documents by ``documents`` (below);
- a ``.parquet`` file with a ``text`` column (``text_field`` overrides); ids from an ``id`` column, else the row
  number;
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

Two forms: :func:`load_texts` returns the list (small data), :func:`iter_texts` yields the same pairs in the same
order while holding one document at a time (data that does not fit in memory): text and JSONL files are read
line by line, a JSON array record by record, Parquet and ``datasets`` in batches. Only ``documents="file"``
holds a whole file (it is one document); uniqueness of ids read from the data (records with an ``id``) is
checked with a set of those ids, while generated ids (file, line number, row) are unique by construction.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

from stillroom.errors import ConfigError, DataError, MissingPathError

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
        if _is_datasets_dir(path):
            rows = _load_datasets_dir(path, text_field)
        else:
            rows = _load_txt_folder(path, documents)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = _load_jsonl(path, text_field)
    elif path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        cols = _parquet_columns(path, pq.ParquetFile(path).schema_arrow.names, text_field)
        table = pq.read_table(path, columns=cols).to_pydict()
        ids = table.get("id")
        rows = [(_row_id(ids[i] if ids is not None else None, str(i)), _check_text(t, f"{path} row {i}"))
                for i, t in enumerate(table[text_field])]
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


def _is_datasets_dir(path: Path) -> bool:
    return any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _parquet_columns(path: Path, names: list[str], text_field: str) -> list[str]:
    if text_field not in names:
        raise DataError(f"DATA {path}: Parquet file has no {text_field!r} column (columns: {names}); name the "
                        "column with --text-field (cache) or data.text_field=NAME (recipes)")
    return list(dict.fromkeys([text_field] + (["id"] if "id" in names else [])))


# --- lazy readers -------------------------------------------------------------------------------------------


def iter_texts(path: str | os.PathLike, text_field: str = "text", documents: str = "file"
               ) -> Iterator[tuple[str, str]]:
    """:func:`load_texts` as an iterator: the same ``(id, text)`` pairs in the same order, with the same errors
    (raised when the reader reaches the bad row), never holding more than one document (or one batch of a
    Parquet / ``datasets`` source). Each call starts a fresh pass, so a caller may iterate twice."""
    if documents not in DOCUMENTS:
        load_texts(path, text_field, documents)  # raises the ConfigError
    path = Path(path)
    if not path.exists():
        load_texts(path, text_field, documents)  # raises the MissingPathError
    if path.is_dir():
        rows = _iter_datasets_dir(path, text_field) if _is_datasets_dir(path) else _iter_txt_folder(path, documents)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows = _iter_json(path, text_field)
    elif path.suffix.lower() == ".parquet":
        rows = _iter_parquet(path, text_field)
    else:
        rows = _iter_text_file(path, path.stem, documents)
    return _checked(rows, path, text_field)


def _checked(rows: Iterator[tuple[str, str, bool]], path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """Drop the ``from_data`` flag; ids from the data must be unique; an empty source is an error."""
    seen: set[str] = set()
    empty = True
    for ex_id, text, from_data in rows:
        if from_data:  # generated ids cannot collide with each other, only with ids read from the data
            if ex_id in seen:
                raise DataError(f"DATA {path}: example id {ex_id!r} occurs twice; ids must be unique")
            seen.add(ex_id)
        empty = False
        yield ex_id, text
    if empty:
        raise DataError(f"DATA {path} holds no examples; add text (one example per line, or records with a "
                        f"{text_field!r} field)")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file read line by line with universal newlines (``\\r\\n`` and ``\\r``
    end a line, as :func:`_read_text`); the same UTF-8 and NUL errors, naming the line."""
    n = 0
    with path.open("rb") as f:
        for raw_n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"DATA {path}: line {raw_n} is not UTF-8 (byte 0x{raw[e.start]:02x}); DATA must be "
                                "UTF-8 text: convert it (e.g. iconv -t UTF-8) or pass another file") from None
            if "\x00" in line:
                raise DataError(f"DATA {path}: line {raw_n} holds NUL bytes, so this is a binary file; DATA must "
                                "be UTF-8 text")
            ended = line.endswith("\n")
            line = line[:-1] if ended else line
            if ended and line.endswith("\r"):
                line = line[:-1]
            for part in line.split("\r"):
                n += 1
                yield n, part


def _iter_text_file(path: Path, name: str, documents: str) -> Iterator[tuple[str, str, bool]]:
    """One plain text file's documents, as :func:`_split` cuts them, streamed (``file``: one document)."""
    if documents == "file":
        text = _read_text(path)
        if text.strip():
            yield name, text, False
        return
    para: list[str] = []
    first = 0
    for n, line in numbered_lines(path):
        if documents == "line":
            if line.strip():
                yield f"{name}:{n}", line, False
        elif line.strip():
            if not para:
                first = n
            para.append(line)
        elif para:
            yield f"{name}:{first}", "\n".join(para), False
            para = []
    if para:
        yield f"{name}:{first}", "\n".join(para), False


def _iter_txt_folder(path: Path, documents: str) -> Iterator[tuple[str, str, bool]]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"DATA folder {path} holds no .txt files; add some or pass a file")
    for p in files:
        empty = True
        for row in _iter_text_file(p, p.relative_to(path).as_posix(), documents):
            empty = False
            yield row
        if empty:
            raise DataError(f"DATA file {p} is empty; remove it or add text")


def _iter_json(path: Path, text_field: str) -> Iterator[tuple[str, str, bool]]:
    """JSONL record by record, or a ``.json`` array element by element (an incremental parser over lines)."""
    lines = numbered_lines(path)
    if path.suffix.lower() == ".json":
        head = []
        for _n, line in lines:
            head.append(line)
            if line.strip():
                break
        if head and head[-1].lstrip().startswith("["):
            records = _json_array(path, "\n".join(head), lines)
        else:
            records = json_lines(path, itertools.chain(enumerate(head, 1), lines))
    else:
        records = json_lines(path, lines)
    for n, rec in records:
        if not isinstance(rec, dict) or text_field not in rec:
            raise DataError(f"DATA {path}:{n}: record has no {text_field!r} field (fields: "
                            f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}); name the field "
                            "with --text-field (cache) or data.text_field=NAME (recipes)")
        yield (_row_id(rec.get("id"), f"{path.stem}:{n}"), _check_text(rec[text_field], f"{path}:{n}"),
               rec.get("id") is not None)


def json_lines(path: Path, lines) -> Iterator[tuple[int, object]]:
    for n, line in lines:
        if not line.strip():
            continue  # blank lines between records are allowed in JSONL
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"DATA {path}: line {n} is not valid JSON ({e.msg}); JSONL needs one JSON "
                            "object per line") from None


def _json_array(path: Path, buf: str, lines) -> Iterator[tuple[int, object]]:
    """Elements of one JSON array ``[a, b, ...]``, parsed one at a time: the buffer holds one element plus at
    most one read-ahead chunk of lines. ``n`` is the element's 1-based index (as ``load_texts`` numbers them)."""
    decoder = json.JSONDecoder()
    done_lines = 0  # lines dropped from the buffer (for error line numbers)

    def more() -> bool:
        nonlocal buf
        chunk = list(itertools.islice(lines, 256))
        buf += "".join("\n" + line for _, line in chunk)
        return bool(chunk)

    def fail(msg: str, at: int):
        line = done_lines + buf[:at].count("\n") + 1
        raise DataError(f"DATA {path}: not valid JSON (line {line}: {msg}); fix it or write one record per line "
                        "(.jsonl)")

    pos, n, expect = buf.index("[") + 1, 0, "value"
    while True:
        while True:  # skip whitespace, reading on when the buffer runs out
            while pos < len(buf) and buf[pos] in " \t\n\r":
                pos += 1
            if pos < len(buf) or not more():
                break
        if pos >= len(buf):
            fail("the array is not closed", pos)
        c = buf[pos]
        if c == "]" and (expect == "comma" or n == 0):
            pos += 1
            while pos < len(buf) or more():
                if buf[pos:].strip():
                    fail("extra data after the array", pos + len(buf[pos:]) - len(buf[pos:].lstrip()))
                pos = len(buf)
            return
        if expect == "comma":
            if c != ",":
                fail("expected ',' or ']'", pos)
            pos, expect = pos + 1, "value"
            continue
        while True:
            try:
                rec, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and buf[pos] not in "{[\"" and more():
                    continue  # a bare number or literal may go on in the next chunk
                break
            except json.JSONDecodeError as e:
                if not more():
                    fail(e.msg, e.pos)
        n += 1
        yield n, rec
        done_lines += buf[:end].count("\n")
        buf, pos, expect = buf[end:], 0, "comma"


def _iter_datasets_dir(path: Path, text_field: str) -> Iterator[tuple[str, str, bool]]:
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read as the iterator reaches them
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            _load_datasets_dir(path, text_field)  # raises the DataError naming the splits
        ds = next(iter(ds.values()))
    if text_field not in ds.column_names:
        _load_datasets_dir(path, text_field)  # raises the DataError naming the columns
    has_id = "id" in ds.column_names
    ds = ds.select_columns(list(dict.fromkeys([text_field] + (["id"] if has_id else []))))
    i = 0
    for batch in ds.iter(batch_size=1000):
        for j, t in enumerate(batch[text_field]):
            value = batch["id"][j] if has_id else None
            yield _row_id(value, str(i)), _check_text(t, f"{path} row {i}"), value is not None
            i += 1


def _iter_parquet(path: Path, text_field: str) -> Iterator[tuple[str, str, bool]]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    cols = _parquet_columns(path, f.schema_arrow.names, text_field)
    i = 0
    for batch in f.iter_batches(batch_size=1000, columns=cols):
        d = batch.to_pydict()
        for j, t in enumerate(d[text_field]):
            value = d["id"][j] if "id" in d else None
            yield _row_id(value, str(i)), _check_text(t, f"{path} row {i}"), value is not None
            i += 1


class TextSource:
    """DATA at a path as a re-iterable: every ``iter()`` is a fresh :func:`iter_texts` pass (e.g. one pass to
    fingerprint the data, another to process it), so a corpus larger than memory can be read twice."""

    def __init__(self, path: str | os.PathLike, text_field: str = "text", documents: str = "file"):
        self.path, self.text_field, self.documents = Path(path), text_field, documents

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter_texts(self.path, self.text_field, self.documents)


def scan_texts(rows, chunk: int) -> tuple[str, int, list[int]]:
    """One pass over ``(id, text)`` pairs: their :func:`data_fingerprint`, their count and the characters in
    each run of ``chunk`` rows (a cache shard), holding one row at a time. ``rows`` must be re-iterable (a list,
    a :class:`TextSource`) when the caller reads it again."""
    h = hashlib.sha256()
    n, chars = 0, []
    for ex_id, text in rows:
        for part in (ex_id, text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        if n % chunk == 0:
            chars.append(0)
        chars[-1] += len(text)
        n += 1
    if not n:
        raise DataError("the data holds no examples; add some")
    return h.hexdigest(), n, chars
