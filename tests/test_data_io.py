"""stillroom.data_io: what one document of a plain .txt is (file / paragraph / line), hand-checked."""

from __future__ import annotations

import pytest

from stillroom.data_io import load_texts
from stillroom.errors import ConfigError

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
