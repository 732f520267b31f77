"""The ``stillroom`` command line. Each verb is a thin wrapper over a library function.

Only verbs that work exist. Verbs are grouped by the module they front; keep each one short.

One error path for every verb: library code raises the :class:`~stillroom.errors.StillroomError` family (and
typer its usage errors); the command group catches them once, prints ``error: <one line>`` on stderr — nothing on
stdout, no traceback — and exits with status 2 (the group class ``_Verbs`` does it, so ``python -m stillroom``,
the ``stillroom`` script and typer's ``CliRunner`` all take the same path). Verbs check cheap things (options, paths, data) before
loading any model, and nothing heavy (torch, transformers) is imported at import time, so ``--help`` and
``--version`` answer at once.
"""

# isort: off
# each module registers its verbs on the one app, in the order --help lists them
from stillroom.cli import pipeline, text, tokenizers, models  # noqa: F401
# isort: on
from stillroom.cli.app import app, main

__all__ = ["app", "main"]
