"""What every command shares: error -> exit-code mapping, and JSON on stdout.

Option types and value parsers are in :mod:`bncli.commands.options`. No torch here;
commands import the core lazily inside their bodies.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Any, TypeVar, overload

import typer

from bncli.commands import options
from bncli.errors import BncliError

F = TypeVar("F", bound=Callable[..., Any])

# Set by the top-level --debug flag (or BNCLI_DEBUG=1): show tracebacks.
DEBUG = {"on": bool(os.environ.get("BNCLI_DEBUG"))}

#: Exit code of an internal error (a bug): sysexits' EX_SOFTWARE, apart from 1 (expected failure).
EXIT_INTERNAL = 70
#: Exit code when stdout is closed early (``| head``): 128 + SIGPIPE, what a shell reports for a
#: Unix tool killed by SIGPIPE.
EXIT_PIPE = 141


def __getattr__(name: str) -> Any:
    """The option types moved to :mod:`bncli.commands.options`; importing them from here still works."""
    try:
        return getattr(options, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def print_error(message: str, hint: str | None = None) -> None:
    """One red ``Error:`` line and a ``Fix:`` line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    # Wrapped to the terminal (COLUMNS, else 80 when stderr is a file), like every other line.
    err = Console(stderr=True, highlight=False)
    err.print(f"[bold red]Error:[/] {escape(message)}")
    if hint:
        err.print(f"[yellow]Fix:[/] {escape(hint)}")


#: The running command's ``--json`` (and whether its document is out yet): a failure
#: with ``--json`` also goes to stdout, as the one JSON document a script reads.
_RUN = {"json": False, "printed": False}


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    """Print one red error line (and the fix) on stderr; return the Exit to raise.

    With ``--json``, and no JSON document printed yet, stdout gets one too:
    ``{"error": {"message", "hint", "exit_code"}}``, so a script's parser never meets
    an empty stdout.
    """
    print_error(message, hint)
    if _RUN["json"] and not _RUN["printed"]:
        with contextlib.suppress(OSError):  # stdout itself may be what failed
            print_json({"error": {"message": message, "hint": hint, "exit_code": code}})
            sys.stdout.flush()
    return typer.Exit(code)


def internal_error(exc: BaseException) -> typer.Exit:
    """The one-line report of a bug (an exception that is no :class:`BncliError`)."""
    detail = " ".join(str(exc).split())[:300]
    return fail(f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}).",
                "This is a bug in bncli. Rerun with --debug (bncli --debug COMMAND ...) for the "
                "traceback and report it with the command line.", EXIT_INTERNAL)


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of a dead stdout cannot fail."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # in-process (CliRunner): nothing to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def os_failure(exc: OSError) -> typer.Exit:
    """An OS error that escaped :mod:`bncli.io` (which maps file errors itself): stdout, or a path.

    A closed pipe (``bncli ... | head -1``) exits quietly with :data:`EXIT_PIPE`, as a Unix
    tool killed by SIGPIPE does; a full disk or other failure on stdout is one clear error.
    """
    if exc.errno == errno.EPIPE:
        _silence_stdout()
        return typer.Exit(EXIT_PIPE)
    if exc.filename is None:
        _silence_stdout()
        return fail(f"cannot write to standard output: {exc.strerror or exc} [{_errno_name(exc)}].",
                    "Free space on the device standard output goes to, or redirect it elsewhere "
                    "(results already written to files are complete).")
    return fail(f"{exc.filename}: {exc.strerror or exc} [{_errno_name(exc)}].",
                "Check that the path exists and that you may read (or write) it.")


class _PipeGuard:
    """stdout that survives its reader going away (``bncli normalize X -o Y | head -1``).

    A write or flush that meets a closed pipe silences stdout for the rest of the run
    instead of raising: the work goes on and every output file is committed, whenever
    the reader left (before, during or after the report); the command then exits
    :data:`EXIT_PIPE`. Everything else is the wrapped stream's.
    """

    def __init__(self, stream: Any, state: dict[str, bool]) -> None:
        self._stream, self._state = stream, state

    def _closed(self) -> None:
        if not self._state["closed"]:
            self._state["closed"] = True
            _silence_stdout()

    def write(self, data: Any) -> int:
        if not self._state["closed"]:
            try:
                return int(self._stream.write(data))
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._closed()
        return len(data)

    def flush(self) -> None:
        if not self._state["closed"]:
            try:
                self._stream.flush()
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self._closed()

    @property
    def buffer(self) -> Any:  # -o -: the binary data, guarded alike
        return _PipeGuard(self._stream.buffer, self._state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_stdout(enabled: bool = True) -> Iterator[dict[str, bool]]:
    """Run with stdout wrapped in :class:`_PipeGuard` (if ``enabled``); yields its state (``closed``)."""
    state = {"closed": False}
    if not enabled:
        yield state
        return
    original = sys.stdout
    sys.stdout = _PipeGuard(original, state)
    try:
        yield state
    finally:
        sys.stdout = original


def flush_stdout() -> None:
    """Flush stdout now, inside the error mapping, not at interpreter exit where it cannot be reported."""
    sys.stdout.flush()


@overload
def handle_errors(func: F) -> F: ...
@overload
def handle_errors(*, writes: bool = ...) -> Callable[[F], F]: ...


def handle_errors(func: F | None = None, *, writes: bool = False) -> Any:
    """Map every failure to one message and an exit code; ``--debug`` keeps the traceback.

    ``@handle_errors`` for a command that only reports: a closed stdout (``| head -1``)
    stops it there, exit :data:`EXIT_PIPE`. ``@handle_errors(writes=True)`` for one that
    writes files: a closed stdout does not stop the work (:class:`_PipeGuard`); it
    finishes, commits its files, then exits :data:`EXIT_PIPE`.

    Expected failures (:class:`BncliError`) exit 1 with a fix; a closed stdout exits
    :data:`EXIT_PIPE` quietly (see above for when); a full disk on stdout exits 1;
    anything else is a bug: one ``internal error`` line and :data:`EXIT_INTERNAL`.
    """
    if func is None:
        return functools.partial(handle_errors, writes=writes)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # -o - fills stdout with data: no JSON there (normalize refuses --json with it anyway).
        output = kwargs.get("output")
        _RUN.update(json=bool(kwargs.get("as_json")) and not (output is not None and os.fspath(output) == "-"),
                    printed=False)
        try:
            with guarded_stdout(enabled=writes) as stdout:
                result = func(*args, **kwargs)
                flush_stdout()
            if stdout["closed"]:  # the reader left; the work is done and its files are written
                raise typer.Exit(EXIT_PIPE)
            return result
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own exits and usage errors (exit 2)
        except BncliError as exc:
            if DEBUG["on"]:
                raise
            raise fail(exc.message, exc.hint, exc.exit_code) from None
        except KeyboardInterrupt:
            if DEBUG["on"]:
                raise
            raise fail("Interrupted; no partial output was left behind.", code=130) from None
        except MemoryError:
            if DEBUG["on"]:
                raise
            raise fail("Out of memory while processing the input.",
                       "Free memory, use a smaller input, or (for .npy) stream it: "
                       "bncli normalize --out-of-core.") from None
        except OSError as exc:
            if DEBUG["on"] and exc.errno != errno.EPIPE:
                raise
            raise os_failure(exc) from None
        except Exception as exc:
            if DEBUG["on"]:
                raise
            raise internal_error(exc) from None

    return wrapper


_SCALAR = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
_SCALAR_LIST = re.compile(rf"\[\s+({_SCALAR}(?:,\s+{_SCALAR})*)\s+\]")


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data: arrays and tensors to lists, paths to str, NaN/Inf to None.

    JSON has no NaN or Infinity; every command reports them as ``null`` (``--json`` output
    is read by strict parsers), wherever they occur in the document.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(obj.tolist())
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    if isinstance(obj, Enum):
        return jsonable(obj.value)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json(doc: Any) -> str:
    """Indented JSON with lists of numbers kept on one line (shapes, per-channel vectors)."""
    text = json.dumps(jsonable(doc), indent=2, allow_nan=False)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def print_json(doc: Any) -> None:
    """Exactly one JSON document on stdout (and nothing else there)."""
    _RUN["printed"] = True
    sys.stdout.write(to_json(doc) + "\n")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: report them as null."""
    return value if math.isfinite(value) else None


def state_findings(source: Any) -> list[dict[str, Any]]:
    """The ``--state`` layer's audit findings (``bncli inspect``'s) for a JSON document."""
    from bncli.audit import findings_json

    return findings_json(getattr(source, "audit", None))


@contextlib.contextmanager
def primary_rank_reports() -> Iterator[None]:
    """Under torchrun every rank raises the same error; only rank 0 prints it.

    The other ranks exit 1 without a message, so the user sees one ``Error:`` line,
    not one per process. Outside torchrun this does nothing.
    """
    try:
        yield
    except BncliError:
        from bncli.distributed import env_rank

        if env_rank() != 0:
            raise typer.Exit(1) from None
        raise
