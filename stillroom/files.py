"""Files: where stillroom keeps things, and how it writes them without harming what the user had.

One definition each: :data:`PACKAGE_DATA` (the shipped corpus and default models, ``pkg:`` paths),
:func:`cache_dir` (``$STILLROOM_CACHE`` or ``~/.cache/stillroom``: converted models, vocabulary maps, speed
probes), :func:`atomic_write` (whole or nothing, durable) and the output checks below.

A file output replaces an existing file only when stillroom wrote it for the same job (``ours``) or the user
passed ``--overwrite``; anything else is an :class:`~stillroom.errors.OutputExistsError` raised before any work
starts. Writes are atomic (a temporary file in the same folder, fsync, rename): on failure the old file is intact
and no temporary file is left; after the rename the folder is fsynced too, so a crash right after a write
never loses it. The new file gets the ordinary 0644 mode (minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from stillroom.errors import OutputExistsError

PACKAGE_DATA = Path(__file__).parent / "data"  # the shipped corpus and default models (``pkg:`` paths)


def cache_dir(kind: str = "") -> Path:
    """stillroom's cache folder: ``$STILLROOM_CACHE/KIND``, else ``~/.cache/stillroom/KIND`` (``kind``: ``models``,
    ``vocab``, ... ; empty: the base folder). Not created here."""
    base = os.environ.get("STILLROOM_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "stillroom"
    return root / kind if kind else root


def check_output_file(path: str | os.PathLike, option: str, *, overwrite: bool = False,
                      ours: Callable[[Path], bool] | None = None) -> Path:
    """``path`` if writing it harms nothing, else :class:`OutputExistsError` naming ``option`` and the fix."""
    p = Path(path)
    if p.is_dir():
        raise OutputExistsError(f"{option} {p} is an existing folder; pass a file path")
    if p.exists() and not overwrite and not (ours is not None and ours(p)):
        raise OutputExistsError(f"{option} {p} already exists and stillroom did not write it for this job; "
                                "choose another path or pass --overwrite to replace it")
    if p.parent.exists() and not p.parent.is_dir():
        raise OutputExistsError(f"{option} {p}: {p.parent} is a file, not a folder; choose another path")
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None] | bytes | str) -> Path:
    """Create ``path`` whole or not at all: ``write`` (bytes, text, or a function writing to the temporary path it
    is given) fills a temporary file next to it, which is fsynced and renamed over ``path``; then the folder is
    fsynced. The one atomic write of stillroom (caches, markers, metrics, maps, model cards)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, str)):
                f.write(write.encode("utf-8") if isinstance(write, str) else write)
        if callable(write):
            write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(p.parent)
    return p


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_dir(path: str | os.PathLike, option: str, *, marker: str, create: bool = True) -> Path:
    """Create folder ``path`` for output (``create``), or reuse it when it is empty or holds ``marker`` (our earlier,
    resumable run); a file, or a folder of someone else's files, is an :class:`OutputExistsError`."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"{option} {p} is an existing file; pass a folder path (new or from an earlier run)")
    if p.is_dir() and not (p / marker).exists() and any(p.iterdir()):
        raise OutputExistsError(f"{option} {p} already holds files that stillroom did not write (no {marker}); "
                                "choose a new or empty folder")
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p
