"""A training run's output folder: guarded, resumable, and honest about interruptions.

- a run writes only into an empty folder, into its own folder when resuming (``stillroom_run.json`` records
  which recipe wrote it), or where the user said ``--overwrite``;
- checkpoints: the last complete one is found, incomplete ones are dropped after Ctrl-C, which ends with
  :class:`TrainInterrupted` naming the step and the last checkpoint;
- ``metrics.jsonl`` is read back as the run's history.

What a run shows while it trains is in :mod:`stillroom.training.callbacks`, what it leaves to read (curves, the
model card) in :mod:`stillroom.training.report`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from stillroom.errors import OutputExistsError
from stillroom.files import atomic_write

MARKER = "stillroom_run.json"
# Keys a resumed run may change without becoming another run (how long, how often, how it is shown).
RUN_CONTROL = {"train": {"output_dir", "resume", "overwrite", "max_steps", "progress", "plot", "threads",
                         "report_to", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
                         "eval_max_blocks"},
               "data": {"eval"}}


# --- the output folder --------------------------------------------------------------------------------------


def run_identity(recipe) -> dict:
    """The recipe without its run-control keys: two runs with the same identity train the same model."""
    d = recipe.model_dump()
    for section, keys in RUN_CONTROL.items():
        d[section] = {k: v for k, v in d[section].items() if k not in keys}
    return d


def _differences(a: Any, b: Any, key: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))]
    return [] if a == b else [key or "(recipe)"]


def read_marker(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / MARKER).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_marker(out: Path, recipe, **fields) -> None:
    """Record (atomically) that this recipe owns ``out``, with ``finished``/``step``/``metrics`` when known."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"identity": run_identity(recipe), "name": recipe.name, "finished": False, **fields}
    atomic_write(out / MARKER, json.dumps(record, indent=1))


def prepare_output_dir(recipe, overwrite: bool = False) -> dict | None:
    """Check that this run may write ``train.output_dir`` before anything is written; claim it when it may.

    Allowed: a missing or empty folder; this recipe's own folder with ``train.resume`` (same
    :func:`run_identity`); anything with ``overwrite`` (its ``checkpoint-*`` folders and ``metrics.jsonl`` are
    removed so no other run's state is resumed or mixed in). Returns the folder's record when resuming a run
    that already finished at or past ``train.max_steps`` (the caller then trains nothing); else ``None``.
    Raises :class:`~stillroom.errors.OutputExistsError` otherwise, leaving every file as it was.
    """
    out = Path(recipe.train.output_dir)
    overwrite = overwrite or recipe.train.overwrite
    if not is_main_process():  # rank 0 checks and claims the folder; the others only learn if it is finished
        marker = read_marker(out) if recipe.train.resume and not overwrite else None
        done = marker is not None and marker.get("finished") and marker.get("step", 0) >= recipe.train.max_steps
        return marker if done else None
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"train.output_dir: {out} is a file, not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if overwrite:
            for ckpt in out.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
            for name in ("metrics.jsonl", MARKER):
                (out / name).unlink(missing_ok=True)
        elif not recipe.train.resume:
            whose = f"run {marker['name']!r}" if marker else "files stillroom did not write"
            raise OutputExistsError(f"train.output_dir: {out} is not empty (it holds {whose}); set "
                                    "train.resume=true to continue this recipe's run, choose another output_dir, "
                                    "or pass --overwrite (train.overwrite=true) to replace it")
        elif marker is None:
            raise OutputExistsError(f"train.resume: {out} holds no {MARKER}, so no stillroom run of this recipe "
                                    "wrote it; choose another output_dir or pass --overwrite to replace it")
        else:
            diff = _differences(marker.get("identity"), run_identity(recipe))
            if diff:
                raise OutputExistsError(f"train.resume: {out} was written by another recipe ({', '.join(diff[:4])} "
                                        "differ); choose another output_dir or pass --overwrite to replace it")
            if marker.get("finished") and marker.get("step", 0) >= recipe.train.max_steps:
                return marker
            return None
    write_marker(out, recipe)
    return None


def is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def last_checkpoint(out: Path) -> int | None:
    """Step of the newest complete ``checkpoint-N`` (one whose ``trainer_state.json`` was written)."""
    steps = [int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").exists()]
    return max(steps) if steps else None


def drop_incomplete_checkpoints(out: Path) -> None:
    """Remove ``checkpoint-N`` folders an interrupt cut short, so a resume never loads half a checkpoint."""
    for p in Path(out).glob("checkpoint-*"):
        if p.is_dir() and not (p / "trainer_state.json").exists():
            shutil.rmtree(p, ignore_errors=True)


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: how far it got and where to resume from (the CLI prints it and exits 130)."""

    def __init__(self, step: int, checkpoint: int | None):
        self.step, self.checkpoint = step, checkpoint
        last = f"last checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet"
        super().__init__(f"interrupted at step {step}; {last}; rerun with train.resume=true")

    def __str__(self) -> str:
        return self.args[0]


def read_history(path: Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- records ------------------------------------------------------------------------------------------------


# --- progress -----------------------------------------------------------------------------------------------


def untied_missing_keys(model, keys: list[str]) -> list[str]:
    """``keys`` without the parameters that share storage with another one (a tied ``lm_head.weight``):
    a checkpoint does not store them and nothing is missing."""
    ptr: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ptr.setdefault(p.data_ptr(), []).append(name)
    tied = {n for names in ptr.values() if len(names) > 1 for n in names}
    return [k for k in keys if k not in tied]


# --- plots --------------------------------------------------------------------------------------------------


# --- model card ---------------------------------------------------------------------------------------------


