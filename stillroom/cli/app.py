"""The ``stillroom`` command group: the one error boundary, shared option checks, ``--version``.

Library code raises the :class:`~stillroom.errors.StillroomError` family (and typer its usage errors); the group
catches them once, prints ``error: <one line>`` on stderr — nothing on stdout, no traceback — and exits non-zero
(``_Verbs``: ``python -m stillroom``, the ``stillroom`` script and typer's ``CliRunner`` take the same path).
"""


from __future__ import annotations

import sys

import typer
from rich.console import Console
from typer.core import TyperGroup

import stillroom
from stillroom.errors import ConfigError, StillroomError


class _Verbs(TyperGroup):
    """The command group, with the one error path of every verb (see the module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = _run(lambda: super(_Verbs, self).main(args, prog_name, complete_var, standalone_mode=False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


def _fail(message: str, code: int = 2) -> int:
    # plain print: one unwrapped line on stderr (Rich would wrap it at 80 columns)
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _run(invoke) -> int:
    try:  # typer >= 0.22 vendors click as typer._click; older typer uses click itself
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover
        from click import exceptions as cx

    try:
        rv = invoke()
    except StillroomError as e:
        return _fail(str(e), e.exit_code)
    except cx.NoArgsIsHelpError as e:  # bare `stillroom`: the help, as usual
        print(e.ctx.get_help())
        return 0
    except cx.UsageError as e:
        verb = e.ctx.command_path if e.ctx is not None else "stillroom"
        return _fail(f"{e.format_message()} (see `{verb} --help`)", 2)
    except cx.ClickException as e:
        return _fail(e.format_message(), e.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return rv if isinstance(rv, int) else 0


app = typer.Typer(
    cls=_Verbs,
    name="stillroom",
    help="Distil and fuse teacher language models into a student, whatever tokenizers they use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version(value: bool) -> None:
    if value:
        print(f"stillroom {stillroom.__version__}")
        raise typer.Exit()


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(allowed)}; pick one of those")
    return value


def _positive(option: str, value, *, strict: bool = True, minimum=None):
    """``value`` when it is > 0 (``strict``) or >= 0, or >= ``minimum``; None passes (= the default)."""
    low = minimum if minimum is not None else 0
    if value is not None and (value < low or (strict and minimum is None and value == 0)):
        need = f">= {minimum}" if minimum is not None else ("> 0" if strict else ">= 0")
        raise ConfigError(f"{option} must be {need}, got {value}")
    return value


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Distil and fuse teacher language models into a student, whatever tokenizers they use."""


def main() -> None:
    app()
