"""stillroom.inputs.text: what one document of a plain .txt is (file / paragraph / line), hand-checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stillroom.errors import ConfigError, DataError
from stillroom.inputs.text import load_texts

TEXT = "  Shall I compare thee\nto a summer's day?\n\n\n  Thou art more lovely\n \nand more temperate.\n"


def test_documents_modes_on_a_small_file(tmp_path):
    p = tmp_path / "sonnet.txt"
    p.write_text(TEXT, encoding="utf-8")
    assert load_texts(p) == [("sonnet", TEXT)]  # default: the whole file, every byte
    assert load_texts(p, documents="file") == [("sonnet", TEXT)]
    assert load_texts(p, documents="paragraph") == [
        ("sonnet:1", "  Shall I compare thee\nto a summer's day?"),
        ("sonnet:5", "  Thou art more lovely"),  # a line of spaces is blank: it ends the paragraph
        ("sonnet:7", "and more temperate."),
    ]
    assert load_texts(p, documents="line") == [
        ("sonnet:1", "  Shall I compare thee"), ("sonnet:2", "to a summer's day?"),
        ("sonnet:5", "  Thou art more lovely"), ("sonnet:7", "and more temperate."),
    ]


def test_documents_modes_in_a_folder_and_windows_newlines(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n")
    (tmp_path / "b.txt").write_text("solo", encoding="utf-8")
    assert load_texts(tmp_path) == [("a.txt", "one\ntwo\n\nthree\n"), ("b.txt", "solo")]
    assert load_texts(tmp_path, documents="paragraph") == [("a.txt:1", "one\ntwo"), ("a.txt:4", "three"),
                                                           ("b.txt:1", "solo")]
    assert load_texts(tmp_path, documents="line") == [("a.txt:1", "one"), ("a.txt:2", "two"),
                                                      ("a.txt:4", "three"), ("b.txt:1", "solo")]


def test_documents_mode_does_not_touch_jsonl_and_rejects_unknown_modes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a\\n\\nb"}\n', encoding="utf-8")
    assert load_texts(p, documents="line") == [("d:1", "a\n\nb")]  # a record is a document whatever the mode
    with pytest.raises(ConfigError, match=r"documents='lines' is not one of 'file', 'paragraph', 'line'"):
        load_texts(p, documents="lines")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no examples"):
        load_texts(blank)


# --- lazy readers: iter_texts equals load_texts on every DATA kind ------------------------------------------

MESSY = "α first line\r\nsecond\r\n\r\n  third\rfourth\n\n\n \nlast paragraph\nno newline at end"


def _kinds(tmp: Path) -> dict[str, Path]:
    """One DATA of every kind, with the awkward parts: CRLF, lone CR, blank runs, ids present or not."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp / "messy.txt").write_bytes(MESSY.encode("utf-8"))
    folder = tmp / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    (folder / "a.txt").write_bytes(MESSY.encode("utf-8"))
    (folder / "sub" / "c.txt").write_text("deep\n", encoding="utf-8")
    (folder / "skip.md").write_text("not text data\n", encoding="utf-8")
    recs = [{"id": "x", "text": "with id"}, {"text": "no id\nhere"}, {"text": "α", "other": [1, {"a": "]"}]},
            {"id": 7, "text": "numeric id"}]
    (tmp / "recs.jsonl").write_text("\n".join(json.dumps(r) for r in recs[:2]) + "\n\n  \n" +
                                    "\n".join(json.dumps(r) for r in recs[2:]) + "\n", encoding="utf-8")
    (tmp / "lines.json").write_text("\n" + "\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    (tmp / "array.json").write_text("\n " + json.dumps(recs, indent=2), encoding="utf-8")
    many = [{"text": f"record {i} " + "y" * (i % 50), "meta": {"k": [i, "]"]}} for i in range(3000)]
    (tmp / "compact.json").write_text(json.dumps(many), encoding="utf-8")  # one long line: parsed piece by piece
    datasets.Dataset.from_dict({"text": ["d0", "d1 β", "d2"]}).save_to_disk(str(tmp / "ds"))
    datasets.Dataset.from_dict({"id": ["p", "q"], "text": ["d0", "d1"], "n": [1, 2]}).save_to_disk(str(tmp / "dsid"))
    big = [f"row {i} " + "x" * (i % 7) for i in range(2500)]  # several Parquet / datasets batches
    pq.write_table(pa.table({"text": big}), tmp / "plain.parquet", row_group_size=700)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(2500)], "body": big}), tmp / "ids.parquet")
    datasets.Dataset.from_dict({"text": big}).save_to_disk(str(tmp / "dsbig"))
    return {"messy": tmp / "messy.txt", "folder": folder, "jsonl": tmp / "recs.jsonl", "json-lines": tmp / "lines.json",
            "json-array": tmp / "array.json", "json-compact": tmp / "compact.json", "datasets": tmp / "ds",
            "datasets-id": tmp / "dsid", "datasets-big": tmp / "dsbig", "parquet": tmp / "plain.parquet",
            "parquet-ids": tmp / "ids.parquet"}


def test_iter_texts_equals_load_texts_on_every_kind(tmp_path, shared):
    from stillroom.inputs.text import iter_texts

    kinds = _kinds(tmp_path)
    kinds["shakespeare"] = shared / "corpus" / "shakespeare"
    kinds["botchan"] = shared / "corpus" / "botchan.txt"
    for name, path in kinds.items():
        field = "body" if name == "parquet-ids" else "text"
        for documents in ("file", "paragraph", "line"):
            ref = load_texts(path, field, documents)
            got = iter_texts(path, field, documents)
            assert not isinstance(got, list)
            assert list(got) == ref, (name, documents)
    # hand-checked: lone CR and CRLF end lines; ids count the original lines; records keep their ids
    assert list(iter_texts(kinds["messy"], documents="line")) == [
        ("messy:1", "α first line"), ("messy:2", "second"), ("messy:4", "  third"), ("messy:5", "fourth"),
        ("messy:9", "last paragraph"), ("messy:10", "no newline at end")]
    assert [i for i, _ in iter_texts(kinds["jsonl"])] == ["x", "recs:2", "recs:5", "7"]
    assert [i for i, _ in iter_texts(kinds["json-array"])] == ["x", "array:2", "array:3", "7"]
    parquet = list(iter_texts(kinds["parquet-ids"], "body"))
    assert len(parquet) == 2500 and parquet[3] == ("r3", "row 3 xxx")
    assert list(iter_texts(kinds["parquet"]))[2499] == ("2499", "row 2499 " + "x" * (2499 % 7))


def test_iter_texts_is_lazy_and_gives_the_same_errors(tmp_path):
    from stillroom.inputs.text import iter_texts

    # a bad line far into the file: the documents before it arrive before the error (nothing read ahead whole)
    p = tmp_path / "late.txt"
    p.write_bytes(b"good one\ngood two\n" + b"fine\n" * 1000 + b"bad \xff byte\n")
    it = iter_texts(p, documents="line")
    assert next(it) == ("late:1", "good one")
    with pytest.raises(DataError) as lazy:
        list(it)
    with pytest.raises(DataError) as eager:
        load_texts(p, documents="line")
    assert str(lazy.value) == str(eager.value) and "line 1003 is not UTF-8 (byte 0xff)" in str(lazy.value)
    cases = {
        "nul.txt": b"text\nwith \x00 nul\n",
        "dup.jsonl": b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n',
        "badline.jsonl": b'{"text": "x"}\n{"text": \n',
        "nofield.jsonl": b'{"text": "x"}\n{"body": "y"}\n',
        "emptytext.jsonl": b'{"text": "x"}\n{"text": "  "}\n',
        "blank.txt": b"\n  \n\n",
        "empty.json": b"[]",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError) as eager:
            load_texts(tmp_path / name, documents="line")
        with pytest.raises(DataError) as lazy:
            list(iter_texts(tmp_path / name, documents="line"))
        assert str(lazy.value) == str(eager.value), name
    for bad in (b'[{"text": "a"}, {"text": "b"', b'[{"text": "a"} {"text": "b"}]', b'[{"text": "a"}] extra',
                b'[{"text": "a"},]'):
        (tmp_path / "bad.json").write_bytes(bad)
        with pytest.raises(DataError, match="not valid JSON"):
            load_texts(tmp_path / "bad.json")
        with pytest.raises(DataError, match="not valid JSON"):
            list(iter_texts(tmp_path / "bad.json"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "body.parquet")
    with pytest.raises(DataError, match=r"no 'text' column \(columns: \['body'\]\)"):
        list(iter_texts(tmp_path / "body.parquet"))


def test_text_source_rereads_and_scan_matches_fingerprint(tmp_path):
    from stillroom.inputs.text import TextSource, data_fingerprint, scan_texts

    p = tmp_path / "c.txt"
    p.write_text("a b\n\nc d e\n\nf\n\ng h\n\ni\n", encoding="utf-8")
    src = TextSource(p, documents="paragraph")
    rows = load_texts(p, documents="paragraph")
    assert list(src) == list(src) == rows  # every pass is a fresh one
    fp, n, chars = scan_texts(src, 2)
    assert fp == data_fingerprint(rows) and n == 5
    assert chars == [len("a b") + len("c d e"), len("f") + len("g h"), len("i")]
    with pytest.raises(DataError, match="no examples"):
        scan_texts([], 2)
