"""What every command shares: option types, value parsers, and error -> exit-code mapping.

No torch here; commands import the core lazily inside their bodies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from bncli.errors import BncliError

F = TypeVar("F", bound=Callable[..., Any])

# Set by the top-level --debug flag (or BNCLI_DEBUG=1): show tracebacks.
DEBUG = {"on": bool(os.environ.get("BNCLI_DEBUG"))}


class Mode(str, Enum):
    """train: batch statistics (running stats updated); eval: running statistics."""

    train = "train"
    eval = "eval"


class Layout(str, Enum):
    """nchw: (N, C, H, W), PyTorch's layout; nhwc: (N, H, W, C), NumPy/PIL/TF's."""

    nchw = "nchw"
    nhwc = "nhwc"


class Device(str, Enum):
    """Where the engine runs."""

    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"
    auto = "auto"


def parse_momentum(value: str) -> float | None:
    """``--momentum 0.1`` -> 0.1; ``none`` -> None (cumulative moving average)."""
    if value.strip().lower() in ("none", "null", "cumulative"):
        return None
    try:
        m = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number; use a float in [0, 1] or 'none'.") from None
    if not 0.0 <= m <= 1.0:
        raise typer.BadParameter(f"{value} is outside [0, 1]; use e.g. 0.1 (PyTorch's default) or 'none'.")
    return m


def parse_eps(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"eps must be > 0 (PyTorch's default is 1e-5), got {value}.")
    return value


def print_error(message: str, hint: str | None = None) -> None:
    """One red ``Error:`` line and a ``Fix:`` line on stderr."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]Error:[/] {escape(message)}")
    if hint:
        err.print(f"[yellow]Fix:[/] {escape(hint)}")


def fail(message: str, hint: str | None = None, code: int = 1) -> typer.Exit:
    """Print one red error line (and the fix) on stderr; return the Exit to raise."""
    print_error(message, hint)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn expected failures into a message + exit code; ``--debug`` keeps the traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
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

    return wrapper  # type: ignore[return-value]


_SCALAR = r"(?:-?[0-9][0-9.eE+-]*|null|true|false)"
_SCALAR_LIST = re.compile(rf"\[\s+({_SCALAR}(?:,\s+{_SCALAR})*)\s+\]")


def to_json(doc: Any) -> str:
    """Indented JSON with lists of numbers kept on one line (shapes, per-channel vectors)."""
    text = json.dumps(doc, indent=2, allow_nan=False, default=_jsonable)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)


def print_json(doc: Any) -> None:
    """Exactly one JSON document on stdout (and nothing else there)."""
    sys.stdout.write(to_json(doc) + "\n")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def state_findings(source: Any) -> list[dict[str, Any]]:
    """The ``--state`` layer's audit findings (``bncli inspect``'s) for a JSON document."""
    if getattr(source, "audit", None) is None:
        return []
    from bncli.audit import finding_dict

    return [finding_dict(f) for f in source.audit.findings]


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/Inf: report them as null."""
    import math

    return value if math.isfinite(value) else None


# -- options shared by every command that builds an engine --------------------------------
LAYER_PANEL = "BatchNorm2d layer (same names as the module's arguments)"
# Annotated aliases so normalize and compare spell each flag (and its help) once.
InputArg = Annotated[Path, typer.Argument(help="Tensor file: .npy, .pt/.pth/.ckpt, .npz or .safetensors.",
                                          show_default=False, metavar="INPUT")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", "-k", help="Which tensor of a .pt/.npz/.safetensors that holds several (listed if ambiguous).")]
ModeOpt = Annotated[Mode, typer.Option(
    "--mode", "-m", help="train: batch statistics, running stats updated (a fresh module's default); "
                         "eval: running statistics, as after model.eval().")]
LayoutOpt = Annotated[Layout, typer.Option(
    "--layout", help="nchw: (N, C, H, W); nhwc: channels-last (N, H, W, C) arrays, written back NHWC.")]
EpsOpt = Annotated[float, typer.Option("--eps", callback=parse_eps,
                                       help="Added to the variance for stability (BatchNorm2d eps).",
    rich_help_panel=LAYER_PANEL)]
MomentumOpt = Annotated[str, typer.Option(
    "--momentum", metavar="FLOAT|none",
    help="Running-stats update weight in [0, 1]; 'none' = cumulative average (1/num_batches_tracked).",
    rich_help_panel=LAYER_PANEL)]
AffineOpt = Annotated[bool, typer.Option("--affine/--no-affine",
                                         help="Learnable per-channel weight and bias (BatchNorm2d affine).",
    rich_help_panel=LAYER_PANEL)]
TrackOpt = Annotated[bool, typer.Option(
    "--track-running-stats/--no-track-running-stats",
    help="Keep running mean/var; without them eval mode also uses batch statistics.",
    rich_help_panel=LAYER_PANEL)]
NumFeaturesOpt = Annotated[int | None, typer.Option(
    "--num-features", "-C", min=1, help="Channel count C of the layer (default: from --state, else the data).",
    rich_help_panel=LAYER_PANEL)]
WeightOpt = Annotated[str | None, typer.Option(
    "--weight", metavar="LIST|FILE", help="Per-channel weight (gamma): '1,0.5,2' or a 1D tensor file.",
    rich_help_panel=LAYER_PANEL)]
BiasOpt = Annotated[str | None, typer.Option(
    "--bias", metavar="LIST|FILE", help="Per-channel bias (beta): '0,0.1,0' or a 1D tensor file.",
    rich_help_panel=LAYER_PANEL)]
StateOpt = Annotated[Path | None, typer.Option(
    "--state", metavar="FILE",
    help="state_dict or checkpoint (.pt/.pth, Lightning .ckpt, .safetensors) to take weight, bias and "
         "running stats from (audited: see bncli inspect).",
    rich_help_panel=LAYER_PANEL)]
PrefixOpt = Annotated[str | None, typer.Option(
    "--prefix", metavar="NAME", help="Layer in a model checkpoint, e.g. layer1.0.bn1; containers and "
    "module./_orig_mod. wrappers need not be typed (lists the layers if wrong).",
    rich_help_panel=LAYER_PANEL)]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run; auto picks cuda/mps when available.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]


# -- many inputs (files, folders) and torchrun ---------------------------------------------
def parse_glob_option(value: str | None) -> str | None:
    """``--glob '*.npy,*.pt'``: at least one pattern (bad values exit 2)."""
    if value is None:
        return None
    from bncli.io.inputs import parse_glob

    try:
        parse_glob(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


InputsArg = Annotated[list[Path], typer.Argument(
    help="Tensor files (.npy .npz .pt/.pth .safetensors) or folders of them.",
    show_default=False, metavar="INPUT")]
GlobOpt = Annotated[str | None, typer.Option(
    "--glob", metavar="PATTERNS", callback=parse_glob_option,
    help="Files to take from a folder input: comma-separated patterns, e.g. 'train_*.npy' "
         "(default: every format bncli reads). Sub-folders are not searched; files named "
         "directly are always taken.")]


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
