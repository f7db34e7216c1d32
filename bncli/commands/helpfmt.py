"""Help that fits the terminal: click's layout, prose reflowed, options grouped by panel.

typer's rich panels put every option into a six-column table (long name, short name,
negative name, type, help): at 80 columns ``--track-running-stats`` and its negative
leave the help a dozen characters and get truncated with "…", and the type column shows
noise (``<bool>`` beside a flag, ``<list[Path]>`` beside the inputs). click's own layout
(``-o, --output PATH`` then the help, wrapped, or on the next line when the name is
long) never truncates and fits any width, so bncli uses it (``rich_markup_mode=None``),
with the sections that ``rich_help_panel`` names. typer also keeps a docstring's line
breaks inside a paragraph; :func:`reflow` joins them so each paragraph wraps to the
terminal once.
"""

from __future__ import annotations

import inspect
import re
import shutil
import sys
import textwrap
import types
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

# typer's type labels -> the metavars click itself prints.
_PLAIN = {"<path>": "PATH", "<str>": "TEXT", "<float>": "FLOAT", "<int>": "INT", "<int range>": "INT",
          "<float range>": "FLOAT", "<file>": "FILE", "<dir>": "DIR"}


def reflow(doc: str | None) -> str | None:
    """Join the lines of each prose paragraph; keep indented blocks (examples) line by line.

    Example blocks are marked with click's ``\\b`` so they are not rewrapped either.
    """
    if not doc:
        return doc
    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        if all(line.startswith((" ", "\t")) for line in lines if line.strip()):
            out.append("\b\n" + para)  # an example block: one command per line, as written
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


def _type_label(param: Any, ctx: Any) -> str | None:
    """The metavar beside an option: its own, a choice list, a plain type; none for flags."""
    if isinstance(param, TyperArgument) or getattr(param, "is_flag", False):
        return None  # a flag takes no value; an argument is named by its metavar already
    if param.metavar is not None:
        return str(param.metavar)
    label = type(param).display_type(param, ctx)
    if label is None:
        return None
    label = re.sub(r"^<list\[(.*)\]>$", r"<\1>", label)  # a repeatable option takes one value each time
    return _PLAIN.get(label, label.strip("<>"))


def tidy(param: Any) -> None:
    """Replace typer's type label of one parameter (``<bool>``, ``<list[Path]>``) by :func:`_type_label`."""
    param.display_type_rich = types.MethodType(_type_label, param)


def _format_sections(cmd: Any, ctx: Any, formatter: Any) -> None:
    """Arguments, then options in the order declared, one section per ``rich_help_panel``."""
    arguments: list[tuple[str, str]] = []
    sections: dict[str, list[tuple[str, str]]] = {"Options": []}
    for param in cmd.get_params(ctx):
        tidy(param)
        record = param.get_help_record(ctx)
        if record is None:
            continue
        if param.param_type_name == "argument":
            arguments.append(record)
        else:
            sections.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
    if arguments:
        with formatter.section("Arguments"):
            formatter.write_dl(arguments)
    for title, records in sections.items():
        if records:
            with formatter.section(title):
                formatter.write_dl(records)


class Command(TyperCommand):
    """A typer command whose help is reflowed and grouped (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _format_sections(self, ctx, formatter)


def show_usage_error(exc: Any) -> NoReturn:
    """click's usage-error report, its ``Error:`` line wrapped to the terminal, then exit 2.

    click prints that line unwrapped; an option's allowed range makes it longer than 80
    columns.
    """
    width = max(shutil.get_terminal_size().columns, 40)
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        hint = ""
        if ctx.command.get_help_option(ctx) is not None:
            hint = f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.\n"
        typer.echo(f"{ctx.get_usage()}\n{hint}", err=True)
    # typer's choice checks go through pydantic, whose "Value error, " prefix says nothing here.
    message = exc.format_message().replace(": Value error, ", ": ", 1)
    typer.echo(textwrap.fill(f"Error: {message}", width=width, break_on_hyphens=False,
                             break_long_words=False), err=True)
    sys.exit(exc.exit_code)


class Group(TyperGroup):
    """The top-level group, with the same layout as :class:`Command`, and wrapped usage errors."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        _format_sections(self, ctx, formatter)
        self.format_commands(ctx, formatter)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        """typer's main, except that a usage error is shown by :func:`show_usage_error`."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.BadParameter as exc:  # a bad option value: its message states the range
            show_usage_error(exc)
        except typer.TyperException as exc:  # other usage errors (unknown option, help with no args)
            show = getattr(exc, "show", None)
            if show is None:
                raise
            show()
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        # Without standalone mode typer returns a command's exit code (or its return value).
        sys.exit(code if isinstance(code, int) else 0)
