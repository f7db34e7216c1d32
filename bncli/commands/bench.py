"""``bncli bench``: time the shared engine against nn.BatchNorm2d and the copy bandwidth."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, BinaryIO

import typer

from bncli.commands.common import Device, DeviceOpt, JsonOpt, handle_errors, print_json


class Preset(str, Enum):
    """The sweeps of :data:`bncli.bench.PRESETS` (kept in step by a test)."""

    quick = "quick"
    full = "full"
    resnet50 = "resnet50"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float64 = "float64"


class Modes(str, Enum):
    train = "train"
    eval = "eval"
    both = "both"


class Layouts(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"
    both = "both"


# More threads than cores only oversubscribes them; far more crashes OpenMP (100000: SIGSEGV).
MAX_THREADS = 4 * (os.cpu_count() or 1)
MAX_DIM = 2**31 - 1  # torch's int32 index limit per size; the memory check bounds their product


def in_range(lo: int, hi: int, what: str) -> Callable[[int | None], int | None]:
    """An option callback: ``value`` in [lo, hi], else a usage error naming the allowed range."""
    def check(value: int | None) -> int | None:
        if value is not None and not lo <= value <= hi:
            raise typer.BadParameter(f"{value} is outside the allowed range {lo} to {hi} ({what}).")
        return value
    return check


def parse_shape(value: str) -> tuple[int, int, int, int]:
    """``8,3,224,224`` or ``8x3x224x224`` -> (8, 3, 224, 224)."""
    parts = value.replace("x", ",").replace("X", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 1:
        raise typer.BadParameter(f"{value!r} is not a shape N,C,H,W of 4 positive integers, e.g. 8,3,224,224.")
    if max(sizes) > MAX_DIM:
        raise typer.BadParameter(f"{value!r} has a size above {MAX_DIM}: each of N,C,H,W must be 1 to {MAX_DIM}.")
    return sizes  # narrowed to 4 ints by the length check above


def _check_shapes(values: list[str] | None) -> list[str] | None:
    for value in values or ():
        parse_shape(value)  # refuse a bad --shape while parsing, so the message names the option
    return values


@handle_errors
def bench(
    device: DeviceOpt = Device.cpu,
    preset: Annotated[Preset | None, typer.Option(
        "--preset", help="quick: 3 small shapes, float32+bfloat16 (the CPU default, < 1 min); full: "
                         "(8,3,224,224) (32,64,112,112) (128,2048,7,7) in 3 dtypes (the GPU default); "
                         "resnet50: every BatchNorm2d input of ResNet-50, batch 32.")] = None,
    shape: Annotated[list[str] | None, typer.Option(
        "--shape", metavar="N,C,H,W", callback=_check_shapes,
        help="Time this shape instead of a preset's (repeatable).")] = None,
    batch: Annotated[int | None, typer.Option(
        "--batch", callback=in_range(1, MAX_DIM, "a batch size; the memory check bounds it further"),
        help="Replace the preset shapes' batch size N (e.g. --preset resnet50 --batch 8).")] = None,
    dtype: Annotated[list[DType] | None, typer.Option(
        "--dtype", help="dtype to time (repeatable); default: the preset's. Unsupported ones are skipped.")] = None,
    mode: Annotated[Modes, typer.Option("--mode", "-m", case_sensitive=False,
                                        help="train, eval or both.")] = Modes.both,
    layout: Annotated[Layouts, typer.Option(
        "--layout", case_sensitive=False,
        help="nchw, nhwc (channels-last memory, as `normalize --layout nhwc`) or both.")] = Layouts.both,
    backward: Annotated[bool, typer.Option(
        "--backward", help="Also time forward+backward of nn.BatchNorm2d (the engine has no autograd path).")] = False,
    compile_: Annotated[bool, typer.Option(
        "--compile", help="Also time torch.compile of nn.BatchNorm2d; slow to build, skipped with a note "
                          "if it fails (e.g. no C++ compiler).")] = False,
    cuda_graphs: Annotated[bool, typer.Option(
        "--cuda-graphs", help="CUDA: time CUDA-graph replays, without launch overhead.")] = False,
    flush: Annotated[bool, typer.Option(
        "--flush/--no-flush", help="CUDA: flush the L2 cache before every timed call.")] = True,
    threads: Annotated[int | None, typer.Option(
        "--threads", callback=in_range(1, MAX_THREADS, f"4x the {os.cpu_count()} CPU cores"),
        help=f"CPU threads for torch, 1 to {MAX_THREADS} (4x the cores); default: torch's own. "
             "Reported either way.")] = None,
    reps: Annotated[int | None, typer.Option(
        "--reps", callback=in_range(3, 100_000, "timed calls per variant"),
        help="Timed calls per variant (3 to 100000); default: enough for ~0.3 s per row (15 to 500).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", callback=in_range(0, 10_000, "untimed calls"),
                                        help="Untimed calls per variant first (0 to 10000).")] = 3,
    as_json: JsonOpt = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", readable=False,
        help="Also save the JSON document here (.json; written atomically).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
) -> None:
    """Time BatchNorm2d: the engine `normalize` uses, against nn.BatchNorm2d and a copy.

    Each row (shape, dtype, layout, mode) times, interleaved: the engine, plain
    nn.BatchNorm2d, and y.copy_(x) of the same bytes, the practical bandwidth ceiling.
    Every variant is checked against a float64 reference first; train rows reset the
    running stats before every call. Reported: median and IQR, bytes moved (eval: read +
    write; train: two reads + one write), GB/s, % of the copy's bandwidth, engine/nn.

    Examples:

        bncli bench --device cpu

        bncli bench --device cuda --preset resnet50 --cuda-graphs -o h100.json

        bncli bench --shape 8,3,224,224 --dtype float32 --mode train --threads 1
    """
    from bncli import bench as core
    from bncli import io
    from bncli.render_bench import live_progress, render

    allowed = (".json",)
    if output is not None:
        io.check_output(output, force=force, allowed=allowed)  # fail before minutes of timing
    settings = core.Settings(
        device=device.value, preset=preset.value if preset else None,
        shapes=tuple(parse_shape(s) for s in shape or ()), batch=batch,
        dtypes=tuple(d.value for d in dtype or ()),
        modes=("train", "eval") if mode is Modes.both else (mode.value,),
        layouts=("nchw", "nhwc") if layout is Layouts.both else (layout.value,),
        backward=backward, compile=compile_, cuda_graphs=cuda_graphs, flush_l2=flush,
        threads=threads, reps=reps, warmup=warmup)
    too_big = core.memory_problem(settings)  # before anything is allocated
    if too_big:
        raise typer.BadParameter(too_big, param_hint="'--shape' / '--batch'")
    with live_progress() as progress:
        doc = core.run(settings, progress=progress).to_json()
    if output is not None:
        text = json.dumps(doc, indent=2, allow_nan=False).encode() + b"\n"

        def writer(fh: BinaryIO) -> None:
            fh.write(text)

        io.write_atomic(output, writer, force=force, allowed=allowed)
    if as_json:
        print_json(doc)
    else:
        render(doc)
        if output is not None:
            from bncli.render import console

            console(stderr=True).print(f"Saved the JSON document to {output}.")
