"""Trainer callbacks: what a run shows and records while it trains.

:class:`MetricsJsonlCallback` keeps one record per logged step in ``metrics.jsonl`` across resumes;
:class:`RichProgressCallback` is the training bar (steps, elapsed, remaining, latest losses) in the one style of
:mod:`stillroom.progress`, and :func:`eval_phase` nests periodic evaluation in it.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from transformers import TrainerCallback

from stillroom.files import atomic_write
from stillroom.progress import bar, clock, phase
from stillroom.training.runs import read_history


class MetricsJsonlCallback(TrainerCallback):
    """Appends every logged dict (with its step) to ``metrics.jsonl`` on the main process.

    When a run resumes from checkpoint M, records past step M (written by the interrupted run and about to be
    written again) are dropped first, so the file holds one record of each kind per step."""

    def __init__(self, path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0 and self.path.exists():
            kept = [r for r in read_history(self.path) if r.get("step", 0) <= state.global_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


SHOWN = ("loss", "ce", "kd", "eval_loss", "eval_bpb", "learning_rate")


TERMS = ("alm/", "uld/", "xtoken/", "hybrid/")  # each ALM / ULD / X-Token teacher's term (stillroom.teachers.objectives.term_logs)


class RichProgressCallback(TrainerCallback):
    """Progress over optimizer steps with elapsed and remaining time and the latest loss; replaces tqdm.

    On a terminal: a Rich bar. Without one (a log file, CI): one line per logging step, no cursor tricks."""

    def __init__(self, console=None):
        self.console = console or Console()  # stdout: the run's own log
        self.progress = None
        self.task = None
        self.t0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.t0 = time.perf_counter()
        if not self.console.is_terminal:
            return

        self.progress = bar("{task.fields[info]}", console=self.console, eta=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        parts = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if (k in SHOWN or k.startswith(TERMS))
                         and isinstance(v, (int, float)))
        if not parts:
            return
        if self.progress is not None:
            self.progress.update(self.task, info=parts)
        else:
            self.console.print(f"train step {state.global_step}/{state.max_steps} {parts} "
                               f"(elapsed {clock(time.perf_counter() - self.t0)})", highlight=False,
                               soft_wrap=True)

    def stop(self) -> None:
        """Stop the live display: the cursor is shown again and the bar's line is ended."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()


def progress_callback(trainer) -> RichProgressCallback | None:
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, RichProgressCallback):
            return cb
    return None


def eval_phase(trainer, n_batches: int):
    """The evaluation's progress: a task on the training bar while it is live, its own display otherwise."""
    cb = progress_callback(trainer)
    return phase("evaluation", n_batches, enabled=cb is not None and trainer.is_world_process_zero(),
                 progress=cb.progress if cb is not None else None, console=cb.console if cb is not None else None)


@contextmanager
def quiet_transformers_bars():
    """Silence transformers' own tqdm bars (loading weights, writing shards) while ours run."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
