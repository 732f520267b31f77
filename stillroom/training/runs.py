"""One training run's life around the trainer: its output folder, its records, what it shows, what it leaves.

- the output folder is guarded: a run writes only into an empty folder, into its own folder when resuming
  (``stillroom_run.json`` records which recipe wrote it), or where the user said ``--overwrite``;
- ``metrics.jsonl`` holds one record per logged step, also across an interrupt and a resume;
- every phase longer than a moment shows progress with its elapsed time (a Rich bar on a terminal, one summary
  line per phase in a log), and Ctrl-C ends with one line naming the step and the last checkpoint;
- the loss plots draw like with like (cross-entropy against cross-entropy, bits per byte on their own axis);
- the model card carries the Hugging Face front matter (``base_model``, ``datasets``, ``license``).

The trainer module imports this one, never the other way round.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from stillroom.errors import OutputExistsError

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
    atomic_write_text(out / MARKER, json.dumps(record, indent=1))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary sibling renamed over it, removed if anything fails."""
    import os

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


class MetricsJsonlCallback(TrainerCallback):
    """Appends every logged dict (with its step) to ``metrics.jsonl`` on the main process.

    When a run resumes from checkpoint M, records past step M (written by the interrupted run and about to be
    written again) are dropped first, so the file holds one record of each kind per step."""

    def __init__(self, path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0 and self.path.exists():
            kept = [r for r in read_history(self.path) if r.get("step", 0) <= state.global_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


# --- progress -----------------------------------------------------------------------------------------------


def _console():
    from rich.console import Console

    return Console()


def say(text: str) -> None:
    """One line about the run (which student was built, ...) on stderr, unwrapped, whatever the progress setting."""
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False, soft_wrap=True)


SHOWN = ("loss", "ce", "kd", "eval_loss", "eval_bpb", "learning_rate")
TERMS = ("alm/", "uld/")  # each ALM / ULD teacher's term (stillroom.teachers.objectives.term_logs)


class RichProgressCallback(TrainerCallback):
    """Progress over optimizer steps with elapsed and remaining time and the latest loss; replaces tqdm.

    On a terminal: a Rich bar. Without one (a log file, CI): one line per logging step, no cursor tricks."""

    def __init__(self, console=None):
        self.console = console or _console()
        self.progress = None
        self.task = None
        self.t0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.t0 = time.perf_counter()
        if not self.console.is_terminal:
            return
        import rich.progress as rp

        self.progress = rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TimeElapsedColumn(), rp.TextColumn("eta"), rp.TimeRemainingColumn(),
                                    rp.TextColumn("{task.fields[info]}"), console=self.console)
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
                               f"(elapsed {_clock(time.perf_counter() - self.t0)})", highlight=False,
                               soft_wrap=True)

    def stop(self) -> None:
        """Stop the live display: the cursor is shown again and the bar's line is ended."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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

    console = console or _console()
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


def untied_missing_keys(model, keys: list[str]) -> list[str]:
    """``keys`` without the parameters that share storage with another one (a tied ``lm_head.weight``):
    a checkpoint does not store them and nothing is missing."""
    ptr: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        ptr.setdefault(p.data_ptr(), []).append(name)
    tied = {n for names in ptr.values() if len(names) > 1 for n in names}
    return [k for k in keys if k not in tied]


# --- plots --------------------------------------------------------------------------------------------------

Series = dict[str, tuple[list[float], list[float]]]


def points(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key`` over the records that have it (one per step, the last one wins)."""
    by_step = {h["step"]: h[key] for h in history if key in h and "step" in h}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def loss_panels(history: list[dict]) -> dict[str, Series]:
    """One run's curves, grouped so each panel holds one quantity in one unit: cross-entropy of the gold
    token (training ``ce`` and held-out ``eval_loss``, nats/token), the distillation term ``kd``, each ALM
    teacher's term ``alm/NAME`` (binary divergence per student token), each ULD teacher's ``uld/NAME`` (L1
    between sorted distributions, per token) and held-out bits per byte. Empty series and panels are left out."""
    keys = sorted({k for h in history for k in h})
    panels = {"cross-entropy (nats/token)": {"train CE": points(history, "ce"),
                                             "held-out CE": points(history, "eval_loss")},
              "distillation term D (nats/token)": {"train D": points(history, "kd")},
              "ALM term (per token)": {k[4:]: points(history, k) for k in keys if k.startswith("alm/")},
              "ULD term (per token)": {k[4:]: points(history, k) for k in keys if k.startswith("uld/")},
              "held-out bits per byte": {"held-out": points(history, "eval_bpb")}}
    return _nonempty(panels)


def compare_panels(runs: dict[str, list[dict]]) -> dict[str, Series]:
    """Several runs on shared axes, like with like: training CE per run, held-out bits per byte per run."""
    return _nonempty({"training CE (nats/token)": {name: points(h, "ce") for name, h in runs.items()},
                      "held-out bits per byte": {name: points(h, "eval_bpb") for name, h in runs.items()}})


def _nonempty(panels: dict[str, Series]) -> dict[str, Series]:
    out = {title: {k: v for k, v in s.items() if v[0]} for title, s in panels.items()}
    return {title: s for title, s in out.items() if s}


def plot_panels(panels: dict[str, Series], path, title: str | None = None) -> None:
    """Side-by-side panels (one y-unit each) against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=False):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o" if len(x) < 12 else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(history: list[dict], path) -> None:
    """A run's ``loss_curve.png``: :func:`loss_panels` of its history."""
    plot_panels(loss_panels(history), path)


# --- model card ---------------------------------------------------------------------------------------------


def _student_license(student: str) -> str | None:
    """``license`` from the student folder's own model card front matter, when it has one."""
    import yaml

    card = Path(student) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def card_metadata(recipe) -> dict:
    """Hugging Face model card front matter: ``base_model`` when the student starts from pretrained weights,
    ``datasets`` (the training data), ``license`` when the student's own card declares one."""
    meta: dict[str, Any] = {"library_name": "transformers", "tags": ["stillroom", "distillation"]}
    spec = recipe.student
    if spec.kind in ("pretrained", "cut"):
        meta["base_model"] = spec.source
    meta["datasets"] = [recipe.data.train]
    lic = _student_license(spec.source) if spec.kind != "scratch" else None
    if lic:
        meta["license"] = lic
    return meta


def model_card(recipe, metrics: dict, n_blocks: int | str, student=None) -> str:
    import yaml

    from stillroom.models.student import describe_student

    teachers = "\n".join(f"- `{t.path}`" + (f" (offline cache `{t.cache}`)" if t.cache else "")
                         for t in recipe.teachers) or "- none (plain CE / EMO)"
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in metrics.items() if isinstance(v, (int, float)))
    origin = describe_student(recipe.student, student)
    front = yaml.safe_dump(card_metadata(recipe), sort_keys=False, allow_unicode=True)
    return (f"---\n{front}---\n\n# {recipe.name}\n\n"
            f"{origin[0].upper()}{origin[1:]}, trained by stillroom.\n\n"
            f"## Teachers\n\n{teachers}\n\nFusion: {recipe.fusion.method} at {recipe.fusion.level} level, "
            f"top-k {recipe.fusion.top_k}; loss: λ={recipe.loss.ce_weight} CE + (1−λ) {recipe.loss.kind}.\n\n"
            f"## Data\n\n- train: `{recipe.data.train}` ({n_blocks} blocks of ≤ {recipe.data.seq_len} tokens)\n"
            f"- eval: `{recipe.data.eval}`\n\n## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
            f"## Recipe\n\n```yaml\n{yaml.safe_dump(recipe.model_dump(), sort_keys=False)}```\n")
