"""Options every command shares: choices, value parsers with their allowed ranges, typer aliases.

A value outside its range is a usage error (``typer.BadParameter``, exit 2) whose message
states the range, before any file is read.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


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


#: Largest channel count accepted (--num-features, --weight/--bias lists): 16.7 million, far
#: above any real layer, far below what would overflow an allocation.
MAX_CHANNELS = 1 << 24
#: --chunk-size range. A chunk smaller than one sample still reads one sample; peak memory is a
#: few chunks, so more than 16 GiB per chunk is a typo, not a setting.
MIN_CHUNK_BYTES = 1
MAX_CHUNK_BYTES = 16 << 30
#: --scale range: 255 and 65535 are the usual ones; outside this the values under- or overflow.
MIN_SCALE, MAX_SCALE = 1e-12, 1e12


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


def check_momentum(value: str | None) -> str | None:
    """A ``--momentum`` callback: refuse a bad value while parsing, before any file is read."""
    if value is not None:
        parse_momentum(value)
    return value


def parse_eps(value: float) -> float:
    """``--eps``: a finite number > 0."""
    if not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"{value} is not allowed; eps must be a finite number > 0 "
                                 "(PyTorch's default is 1e-5).")
    return value


def parse_channels(value: int | None) -> int | None:
    """``--num-features``: 1 to :data:`MAX_CHANNELS`."""
    if value is not None and not 1 <= value <= MAX_CHANNELS:
        raise typer.BadParameter(f"{value} is outside the allowed range 1 to {MAX_CHANNELS:,} channels.")
    return value


def parse_vector_option(value: str | None) -> str | None:
    """``--weight``/``--bias``: a comma list of finite numbers (checked here), or a tensor file (read later)."""
    if value is None or Path(value).suffix.lower() in (".npy", ".npz", ".pt", ".pth", ".safetensors"):
        return value
    try:
        numbers = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither a comma-separated list of numbers nor a tensor file; "
                                 "e.g. 1.0,0.5,2.0 (one value per channel) or weight.npy.") from None
    if not numbers:
        raise typer.BadParameter("no values given; e.g. 1.0,0.5,2.0 (one value per channel).")
    if len(numbers) > MAX_CHANNELS:
        raise typer.BadParameter(f"{len(numbers):,} values; the allowed range is 1 to {MAX_CHANNELS:,}.")
    bad = [v for v in numbers if not math.isfinite(v)]
    if bad:
        raise typer.BadParameter(f"{bad[0]} is not a finite number; every value must be finite.")
    return value


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):,.1f} GiB" if nbytes >= 1 << 30 else f"{nbytes:,} bytes"


def parse_chunk_size(value: str | None) -> int | None:
    """``--chunk-size 8M`` -> bytes, within :data:`MIN_CHUNK_BYTES` .. :data:`MAX_CHUNK_BYTES`."""
    if value is None:
        return None
    from bncli.outofcore import parse_size

    try:
        nbytes = parse_size(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if not MIN_CHUNK_BYTES <= nbytes <= MAX_CHUNK_BYTES:
        raise typer.BadParameter(f"{value} is {_gib(nbytes)}; the allowed range is 1 byte to "
                                 f"{_gib(MAX_CHUNK_BYTES)} (default 8M).")
    return nbytes


def parse_scale(value: float) -> float:
    """``--scale``: a divisor between :data:`MIN_SCALE` and :data:`MAX_SCALE`."""
    if not (math.isfinite(value) and MIN_SCALE <= value <= MAX_SCALE):
        raise typer.BadParameter(f"{value} is outside the allowed range {MIN_SCALE:g} to {MAX_SCALE:g} "
                                 "(e.g. 255 for uint8 images).")
    return value


# -- options shared by every command that builds an engine --------------------------------
LAYER_PANEL = "BatchNorm2d layer (same names as the module's arguments)"
# Annotated aliases so normalize and compare spell each flag (and its help) once.
# readable=False everywhere: bncli.io reports an unreadable file itself (exit 1, the file and
# the permission named, a fix); typer's own check would make it a usage error (exit 2).
InputArg = Annotated[Path, typer.Argument(help="Tensor file: .npy, .pt/.pth/.ckpt, .npz or .safetensors.",
                                          show_default=False, metavar="INPUT", readable=False)]
InputsArg = Annotated[list[Path], typer.Argument(
    help="Tensor files (.npy .npz .pt/.pth .safetensors) or folders of them.", show_default=False,
    metavar="INPUT", readable=False)]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", "-k", help="Which tensor of a .pt/.npz/.safetensors that holds several (listed if ambiguous).")]
ModeOpt = Annotated[Mode, typer.Option(
    "--mode", "-m", case_sensitive=False,
    help="train: batch statistics, running stats updated (a fresh module's default); "
         "eval: running statistics, as after model.eval().")]
LayoutOpt = Annotated[Layout, typer.Option(
    "--layout", case_sensitive=False,
    help="nchw: (N, C, H, W); nhwc: channels-last (N, H, W, C) arrays, written back NHWC.")]
EpsOpt = Annotated[float, typer.Option("--eps", callback=parse_eps,
                                       help="Added to the variance for stability (BatchNorm2d eps).",
    rich_help_panel=LAYER_PANEL)]
MomentumOpt = Annotated[str, typer.Option(
    "--momentum", metavar="FLOAT|none", callback=check_momentum,
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
    "--num-features", "-C", callback=parse_channels,
    help="Channel count C of the layer (default: from --state, else the data).",
    rich_help_panel=LAYER_PANEL)]
def _vector_option(flag: str, what: str, example: str) -> typer.models.OptionInfo:
    return typer.Option(flag, metavar="LIST|FILE", callback=parse_vector_option,
                        help=f"Per-channel {what}: '{example}' or a 1D tensor file.", rich_help_panel=LAYER_PANEL)


WeightOpt = Annotated[str | None, _vector_option("--weight", "weight (gamma)", "1,0.5,2")]
BiasOpt = Annotated[str | None, _vector_option("--bias", "bias (beta)", "0,0.1,0")]
StateOpt = Annotated[Path | None, typer.Option(
    "--state", metavar="FILE", readable=False,
    help="state_dict or checkpoint (.pt/.pth, Lightning .ckpt, .safetensors) to take weight, bias and "
         "running stats from (audited: see bncli inspect).",
    rich_help_panel=LAYER_PANEL)]
PrefixOpt = Annotated[str | None, typer.Option(
    "--prefix", metavar="NAME", help="Layer in a model checkpoint, e.g. layer1.0.bn1; containers and "
    "module./_orig_mod. wrappers need not be typed (lists the layers if wrong).",
    rich_help_panel=LAYER_PANEL)]
DeviceOpt = Annotated[Device, typer.Option("--device", case_sensitive=False,
                                           help="Where to run; auto picks cuda/mps when available.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]
ChunkSizeOpt = Annotated[int | None, typer.Option(
    "--chunk-size", metavar="SIZE", parser=parse_chunk_size,
    help="Bytes read per chunk, e.g. 4M, 64MiB, 1G (default 8M, at most 16G). "
         "Peak memory is a few chunks.")]
SaveStateOpt = Annotated[Path | None, typer.Option(
    "--save-state", metavar="FILE", readable=False,
    help="Write the layer's state_dict after this step (after the last, for several inputs; only "
         "if all succeed) as .pt/.safetensors, loadable with nn.BatchNorm2d.load_state_dict and --state.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing output files.")]


# -- many inputs (files, folders) ----------------------------------------------------------
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


GlobOpt = Annotated[str | None, typer.Option(
    "--glob", metavar="PATTERNS", callback=parse_glob_option,
    help="Files to take from a folder input: comma-separated patterns, e.g. 'train_*.npy' "
         "(default: every format bncli reads). Sub-folders are not searched; files named "
         "directly are always taken.")]


# -- normalize over many inputs, stdin and stdout ------------------------------------------
class Format(str, Enum):
    """The format of -o - (standard output)."""

    npy = "npy"
    npz = "npz"
    pt = "pt"
    safetensors = "safetensors"


NormalizeInputsArg = Annotated[list[Path], typer.Argument(
    help="Tensor files (.npy .npz .pt/.pth/.ckpt .safetensors), folders of them, or - for standard input.",
    show_default=False, metavar="INPUT", readable=False)]
KeysOpt = Annotated[list[str] | None, typer.Option(
    "--key", "-k", metavar="KEY",
    help="Which tensor of a .pt/.npz/.safetensors to normalize (listed if ambiguous); repeat it for "
         "several, each its own batch. The file's other tensors are written through unchanged.")]
OutputDirOpt = Annotated[Path | None, typer.Option(
    "--output-dir", metavar="DIR", file_okay=False, readable=False,
    help="Write each result into DIR (created if missing) as NAME.bn.EXT. Default: beside each input.")]
FormatOpt = Annotated[Format | None, typer.Option(
    "--format", case_sensitive=False, show_default="the input's",
    help="Format of -o - (standard output). Standard input's format is told from its bytes.")]
DatasetStatsOpt = Annotated[bool, typer.Option(
    "--dataset-stats",
    help="One exact pass over all inputs first, then normalize each with the pooled statistics "
         "and update the running stats once, as one batch of everything (train mode). Default: "
         "each input its own batch, in order.")]
