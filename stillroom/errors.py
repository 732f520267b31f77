"""One family of errors for everything a user can get wrong: bad input, incomplete models, existing outputs.

Every :class:`StillroomError` message is one line that names the thing (a file, a key, an option) and says what
to do. The CLI catches the family once, at its boundary, prints the message on stderr and exits non-zero; the
library raises them like any exception. Each subclass also derives from the builtin its callers would expect
(``ValueError``, ``FileNotFoundError``, ``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class StillroomError(Exception):
    """A user's mistake or an unusable input: the message is one line naming the thing and the fix."""

    exit_code = 2


class DataError(StillroomError, ValueError):
    """A data file that is missing, empty, not UTF-8 text, or has records without the expected fields."""


class ModelError(StillroomError, ValueError):
    """A model folder or file that cannot be used (no weights, no tokenizer, corrupt, mismatched vocabulary)."""


class OutputExistsError(StillroomError, FileExistsError):
    """An output path that already holds something stillroom did not write (or was told not to replace)."""


class ConfigError(StillroomError, ValueError):
    """A bad option or recipe value (the message echoes the value and says the allowed range)."""


class MissingPathError(StillroomError, FileNotFoundError):
    """An input path that does not exist."""


class ServerError(StillroomError, ConnectionError):
    """A teacher server that cannot be used: unreachable, not OpenAI-compatible, without log-probs, or whose
    answers no reading fits."""
