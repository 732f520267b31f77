"""stillroom.files: a user's file is never replaced unasked, and writes are whole or nothing."""

from __future__ import annotations

import os

import pytest

from stillroom.errors import OutputExistsError
from stillroom.files import atomic_write, check_output_dir, check_output_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_is_whole_or_nothing(tmp_path):
    p = tmp_path / "out.jsonl"
    atomic_write(p, "first\n")
    assert p.read_text() == "first\n" and p.stat().st_mode & 0o777 == 0o644 & ~_umask()

    def fails(tmp):
        tmp.write_text("half of the sec")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(p, fails)
    assert p.read_text() == "first\n"  # the old file is intact
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]  # and no temporary file is left
    atomic_write(p, b"\x00bytes")
    assert p.read_bytes() == b"\x00bytes"
    atomic_write(tmp_path / "new" / "deep.txt", "made")  # parent folders are created
    assert (tmp_path / "new" / "deep.txt").read_text() == "made"


def test_check_output_file_refuses_what_is_not_ours(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("user data")
    assert check_output_file(tmp_path / "new.txt", "--out") == tmp_path / "new.txt"
    with pytest.raises(OutputExistsError, match=r"--out .*mine.txt already exists .* --overwrite"):
        check_output_file(mine, "--out")
    assert check_output_file(mine, "--out", overwrite=True) == mine
    assert check_output_file(mine, "--out", ours=lambda p: p.read_text() == "user data") == mine
    with pytest.raises(OutputExistsError, match="is an existing folder"):
        check_output_file(tmp_path, "--out", overwrite=True)
    with pytest.raises(FileExistsError):  # the builtin it also is
        check_output_file(mine / "below.txt", "--out")
    assert mine.read_text() == "user data"


def test_check_output_dir_reuses_only_empty_or_marked_folders(tmp_path):
    assert check_output_dir(tmp_path / "fresh", "--out", marker="plan.json", create=False) == tmp_path / "fresh"
    assert not (tmp_path / "fresh").exists()
    assert check_output_dir(tmp_path / "fresh", "--out", marker="plan.json").is_dir()
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "plan.json").write_text("{}")
    check_output_dir(tmp_path / "ours", "--out", marker="plan.json")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="did not write"):
        check_output_dir(tmp_path / "theirs", "--out", marker="plan.json")
    with pytest.raises(OutputExistsError, match="is an existing file"):
        check_output_dir(tmp_path / "theirs" / "notes.txt", "--out", marker="plan.json")


def test_cache_dir_is_one_rule(tmp_path, monkeypatch):
    from stillroom.files import cache_dir

    monkeypatch.setenv("STILLROOM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir("models") == tmp_path / "c" / "models"
    monkeypatch.delenv("STILLROOM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("vocab") == tmp_path / "home" / ".cache" / "stillroom" / "vocab"


def test_atomic_write_fsyncs_the_file_and_then_its_folder(tmp_path, monkeypatch):
    """Durable: the data is on disk before the rename, and the rename itself once the folder is synced."""
    import stat

    from stillroom import files

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    files.atomic_write(tmp_path / "a" / "x.json", "{}")
    assert synced == ["file", "dir"] and (tmp_path / "a" / "x.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]  # no temporary left
