"""The ``bncli`` command line: the app, global flags and command registration.

Commands live in :mod:`bncli.commands`; each parses flags, calls the core, renders.
Importing this module (and running ``--help``) does not import torch.
"""

from __future__ import annotations

import os
import signal
import sys

import typer

from bncli import __version__
from bncli.commands import bench, check_shape, compare, fold, inspect, normalize, recalibrate, stats
from bncli.commands.common import DEBUG, EXIT_INTERNAL, EXIT_PIPE
from bncli.commands.helpfmt import Command, Group

app = typer.Typer(
    name="bncli",
    help=(
        "Apply torch.nn.BatchNorm2d to tensors saved on disk (.npy .pt .npz .safetensors), "
        "and explain what goes wrong around it.\n\n"
        "Start with `bncli check-shape FILE`, then `bncli normalize FILE`; "
        "`bncli compare FILE` shows what model.eval() changes; `bncli inspect CKPT` audits every "
        "BatchNorm layer of a checkpoint (NaN or tiny running_var, never-updated stats, dead "
        "channels); `bncli stats FILES` gives exact "
        "dataset mean/std; `bncli bench` times BatchNorm2d on this machine. "
        "Whole exported models (.pt2, read without running their code): `bncli compare MODEL.pt2 "
        "--data X` names the BN layer that breaks eval, `bncli recalibrate` re-estimates running "
        "stats, `bncli fold` folds BN into convs. "
        "Every command has --json for scripts."
    ),
    epilog=f"Exit codes: 0 success; 1 an expected failure (message and fix on stderr); "
           f"2 bad usage; {EXIT_INTERNAL} internal error (a bug: please report it); 130 interrupted; "
           f"{EXIT_PIPE} stdout closed early (e.g. | head). --debug shows tracebacks.",
    cls=Group,
    # click's help layout, not typer's rich panels: see bncli.commands.helpfmt.
    rich_markup_mode=None,
    no_args_is_help=True,
    # typer's --install-completion / --show-completion (bash, zsh, fish, PowerShell).
    add_completion=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bncli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors (for bug reports)."),
) -> None:
    """Exit codes: see the epilog of ``bncli --help`` and the README."""
    # Set on every invocation: in-process callers (tests, scripts) must not inherit it.
    DEBUG["on"] = debug or bool(os.environ.get("BNCLI_DEBUG"))


# Short help for the command list of `bncli --help`: one line each at 80 columns.
app.command("normalize", cls=Command, no_args_is_help=True,
            short_help="Apply nn.BatchNorm2d to a file, write the result.")(normalize.normalize)
app.command("check-shape", cls=Command, no_args_is_help=True,
            short_help="Is it a valid BatchNorm2d input? Findings and fixes.")(check_shape.check_shape)
app.command("compare", cls=Command, no_args_is_help=True,
            short_help="What model.eval() changes: train vs eval mode.")(compare.compare)
app.command("stats", cls=Command, no_args_is_help=True,
            short_help="Exact per-channel mean/std of a dataset on disk.")(stats.stats)
app.command("bench", cls=Command,
            short_help="Time BatchNorm2d here: engine, nn.BatchNorm2d, a copy.")(bench.bench)
app.command("inspect", cls=Command, no_args_is_help=True,
            short_help="Audit every BatchNorm layer of a checkpoint or .pt2.")(inspect.inspect)
app.command("recalibrate", cls=Command, no_args_is_help=True,
            short_help="Re-estimate a .pt2 model's BN running stats from data.")(recalibrate.recalibrate)
app.command("fold", cls=Command, no_args_is_help=True,
            short_help="Fold a .pt2 model's eval BatchNorm into the convs.")(fold.fold)


def main() -> None:
    """Console-script entry point.

    Command bodies map their own failures (:func:`bncli.commands.common.handle_errors`);
    this catches what is raised around them, e.g. while typer parses the options, so no
    traceback reaches the user without ``--debug``.
    """
    try:
        # The name completion scripts and usage lines use, also for `python -m bncli`.
        app(prog_name="bncli")
    except Exception as exc:
        if DEBUG["on"] or os.environ.get("BNCLI_DEBUG"):
            raise
        from bncli.commands.common import internal_error, os_failure

        failure = os_failure(exc) if isinstance(exc, OSError) else internal_error(exc)
        sys.exit(failure.exit_code)
    finally:
        # The command is over (its outputs committed or discarded). Python restores SIGINT's
        # default action before torch's teardown, so a Ctrl-C then would kill a finished run
        # (shell status 130, no message); ignored, the exit code stays the command's own.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
