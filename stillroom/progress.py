"""Progress on long work: one look for every bar, spinner and phase line stillroom shows.

On a terminal a live Rich display on stderr (stdout stays for results); without one (a log file, CI) no cursor
tricks: bars stay quiet and phases print one ``TITLE: done in S s`` line. Every verb and the trainer use these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


def stderr_console() -> Console:
    """The console progress and notes go to (stderr)."""
    return Console(stderr=True)


def say(text: str) -> None:
    """One line on stderr, unwrapped and unhighlighted (which student was built, a warning, ...)."""
    stderr_console().print(text, highlight=False, soft_wrap=True)


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def bar(*fields: str, console: Console | None = None, enabled: bool = True, counts: str = "of",
        eta: bool = False, transient: bool = False):
    """A Rich ``Progress`` in stillroom's one style: description, bar, counts (``"of"``: n/N, ``"percent"``, or
    ``""``), elapsed time, with ``eta`` the time remaining, then extra text columns (``fields``: Rich format
    strings such as ``"{task.fields[tps]}"``). ``enabled=False`` draws nothing."""
    import rich.progress as rp

    cols: list = [rp.TextColumn("{task.description}"), rp.BarColumn()]
    if counts == "of":
        cols.append(rp.MofNCompleteColumn())
    elif counts == "percent":
        cols.append(rp.TextColumn("{task.percentage:>5.1f}%"))
    cols.append(rp.TimeElapsedColumn())
    if eta:
        cols += [rp.TextColumn("eta"), rp.TimeRemainingColumn()]
    cols += [rp.TextColumn(f) for f in fields]
    return rp.Progress(*cols, console=console or stderr_console(), disable=not enabled, transient=transient)


@contextmanager
def spinner(text: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with elapsed time while something slow with no known length runs (converting a model)."""
    if not enabled:
        yield
        return
    import rich.progress as rp

    progress = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.TimeElapsedColumn(),
                           console=stderr_console(), transient=False)
    progress.start()
    progress.add_task(text, total=None)
    try:
        yield
    finally:
        progress.stop()


@contextmanager
def phase(title: str, total: int | None = None, enabled: bool = True, progress=None, console=None):
    """Show one phase (loading, evaluating, saving) with its elapsed time; yields ``advance(n=1)``.

    ``progress``: a live Rich ``Progress`` to add a task to (the training bar during periodic evaluation).
    Otherwise a transient bar on a terminal, and one ``TITLE: done in S s`` line without one.
    """
    if not enabled:
        yield lambda n=1: None
        return
    import rich.progress as rp

    console = console or Console()
    t0 = time.perf_counter()
    own = None
    if progress is None and console.is_terminal:
        cols = [rp.SpinnerColumn(), rp.TextColumn(title)] + ([rp.BarColumn(), rp.MofNCompleteColumn()] if total else [])
        own = progress = rp.Progress(*cols, rp.TimeElapsedColumn(), console=console, transient=True)
        own.start()
    task = progress.add_task(title, total=total, info="") if progress is not None else None
    try:
        yield (lambda n=1: progress.advance(task, n)) if task is not None else (lambda n=1: None)
    finally:
        if own is not None:
            own.stop()
        elif task is not None:
            progress.remove_task(task)
        if own is not None or not console.is_terminal:
            console.print(f"{title}: done in {time.perf_counter() - t0:.1f} s", highlight=False, soft_wrap=True)
