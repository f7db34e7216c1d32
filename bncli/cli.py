"""The ``bncli`` command line: the app, global flags and command registration.

Commands live in :mod:`bncli.commands`; each parses flags, calls the core, renders.
Importing this module (and running ``--help``) does not import torch.
"""

from __future__ import annotations

import os

import typer

from bncli import __version__
from bncli.commands import bench, check_shape, compare, fold, inspect, normalize, recalibrate, stats
from bncli.commands.common import DEBUG

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
    epilog="Exit codes: 0 success; 1 an expected failure (message and fix on stderr); "
           "2 bad usage; 130 interrupted. --debug shows tracebacks.",
    no_args_is_help=True,
    add_completion=False,
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
    """Exit codes: 0 success; 1 an expected failure (bad file, shape, state), with a message
    and a fix on stderr; 2 bad usage (unknown option, bad value); 130 interrupted."""
    # Set on every invocation: in-process callers (tests, scripts) must not inherit it.
    DEBUG["on"] = debug or bool(os.environ.get("BNCLI_DEBUG"))


app.command("normalize", no_args_is_help=True)(normalize.normalize)
app.command("check-shape", no_args_is_help=True)(check_shape.check_shape)
app.command("compare", no_args_is_help=True)(compare.compare)
app.command("inspect", no_args_is_help=True)(inspect.inspect)
app.command("stats", no_args_is_help=True)(stats.stats)
app.command("bench")(bench.bench)
app.command("recalibrate", no_args_is_help=True)(recalibrate.recalibrate)
app.command("fold", no_args_is_help=True)(fold.fold)


def main() -> None:
    """Console-script entry point."""
    app()
