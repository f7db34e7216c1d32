"""``bncli normalize``: apply nn.BatchNorm2d to tensor files and write the results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import handle_errors, primary_rank_reports, print_error, print_json
from bncli.commands.options import (
    AffineOpt,
    BiasOpt,
    ChunkSizeOpt,
    DatasetStatsOpt,
    Device,
    DeviceOpt,
    EpsOpt,
    ForceOpt,
    FormatOpt,
    GlobOpt,
    JsonOpt,
    KeysOpt,
    Layout,
    LayoutOpt,
    Mode,
    ModeOpt,
    MomentumOpt,
    NormalizeInputsArg,
    NumFeaturesOpt,
    OutputDirOpt,
    PrefixOpt,
    SaveStateOpt,
    StateOpt,
    TrackOpt,
    WeightOpt,
    parse_momentum,
)

#: Names a folder input does not contribute (unless --glob is given): normalize's own outputs.
OWN_OUTPUTS = ("*.bn.*",)


@handle_errors(writes=True)
def normalize(
    inputs: NormalizeInputsArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE|-", readable=False,
        help="Where to write (one input); the extension picks the format; - for standard output "
             "(see --format). Default: INPUT's name with .bn before the extension, beside it.")] = None,
    output_dir: OutputDirOpt = None,
    key: KeysOpt = None,
    glob: GlobOpt = None,
    dataset_stats: DatasetStatsOpt = False,
    mode: ModeOpt = Mode.train,
    layout: LayoutOpt = Layout.nchw,
    eps: EpsOpt = 1e-5,
    momentum: MomentumOpt = "0.1",
    affine: AffineOpt = True,
    track_running_stats: TrackOpt = True,
    num_features: NumFeaturesOpt = None,
    weight: WeightOpt = None,
    bias: BiasOpt = None,
    state: StateOpt = None,
    prefix: PrefixOpt = None,
    save_state: SaveStateOpt = None,
    device: DeviceOpt = Device.cpu,
    force: ForceOpt = False,
    out_of_core: Annotated[bool | None, typer.Option(
        "--out-of-core/--in-memory", show_default="auto",
        help="Stream a .npy in two passes with memory bounded by --chunk-size, or load it whole. "
             "Default: stream .npy files of 256 MiB or more, or too big for the free memory.")] = None,
    chunk_size: ChunkSizeOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Normalize each INPUT exactly as torch.nn.BatchNorm2d would.

    Reports shapes and per-channel mean/std before and after. Inputs are never
    modified; outputs are written atomically (no partial file on failure or
    Ctrl-C), one input's output and --save-state together or neither, and an
    existing file is kept unless --force. The dtype is kept, and so are a
    container's other tensors.

    Several inputs (files, folders: see --glob) run through one layer, in
    order: in train mode each input is one batch, so N inputs are N train
    steps, and --save-state saves the state after the last; --dataset-stats
    makes them one batch instead. A bad input does not stop the others: a
    summary at the end, exit 1 if any failed. - reads standard input and -o -
    writes standard output (the report then goes to stderr).

    Examples:

        bncli normalize batch.npy                   # train mode: batch.bn.npy

        bncli normalize batch.npy --mode eval --state resnet.pt --prefix bn1

        bncli normalize images_nhwc.npy --layout nhwc -o out.pt --json

        bncli normalize shards/ --output-dir out --dataset-stats

        bncli normalize multi.pt --key images --key crops   # masks kept as is

        bncli normalize - -o - --format npy < a.npy > b.npy

        bncli normalize huge.npy --out-of-core --chunk-size 64M
    """
    from bncli import batch, core, distributed, io, render_normalize
    from bncli.errors import InputError
    from bncli.progress import progress_callback

    keys = _check_usage(inputs, output, output_dir, key, fmt, dataset_stats, mode, as_json)
    files = io.expand_inputs(inputs, glob=glob, allow_stdin=True, exclude=() if glob else OWN_OUTPUTS)
    if output is not None and len(files) > 1:
        raise typer.BadParameter(f"-o names one output, and the inputs are {len(files)} files; use "
                                 "--output-dir DIR for several.", param_hint="'-o'")
    opts = core.EngineOptions(
        eps=eps, momentum=parse_momentum(momentum), affine=affine,
        track_running_stats=track_running_stats, num_features=num_features, state=state,
        prefix=prefix, weight=weight, bias=bias, device=device.value)
    execution = "auto" if out_of_core is None else "out-of-core" if out_of_core else "in-memory"
    to_stdout = output is not None and io.is_stdio(output)
    # One file named as itself: its own report, as ever; anything more: the run's report.
    single = len(inputs) == 1 and files == [Path(inputs[0])] and len(keys) == 1
    with primary_rank_reports(), distributed.session() as world:
        if world.size > 1 and any(io.is_stdio(f) for f in files):
            raise InputError("- (standard input) cannot be shared by torchrun's ranks.",
                             hint="Save it to a file first and pass the file.")
        sources: list[io.Source] = [io.read_stdin() if io.is_stdio(f) else f for f in files]
        outputs = batch.output_paths(sources, output=output, output_dir=output_dir)
        show = not as_json and world.is_primary
        header = render_normalize.header if single else _once(render_normalize.batch_header, files=len(sources),
                                                               keys=keys, dataset=dataset_stats)
        with io.output_folder(output_dir, create=world.is_primary), progress_callback(enabled=show) as progress:
            result = batch.normalize_many(
                sources, outputs, keys=keys, mode=mode.value, layout=layout.value, opts=opts, force=force,
                save_state=save_state, dataset=dataset_stats, execution=execution, chunk_bytes=chunk_size,
                out_format=io.FORMATS[fmt.value] if fmt else None, progress=progress,
                on_start=(lambda plan: header(plan, stderr=to_stdout)) if show else None, world=world)
        if not world.is_primary:
            return
        if single:
            r = result.files[0].results[0]
            if as_json:
                print_json(render_normalize.to_json(r))
            else:
                render_normalize.render(r, stderr=to_stdout)
            return
        if as_json:
            print_json(render_normalize.batch_json(result))
        else:
            render_normalize.render_batch(result)
        for f in result.failed:
            print_error(f.error["message"] if f.error else "", f.error["hint"] if f.error else None)
        if result.failed:
            raise typer.Exit(1)


def _check_usage(inputs: list[Path], output: Path | None, output_dir: Path | None, key: list[str] | None,
                 fmt: Any, dataset: bool, mode: Mode, as_json: bool) -> list[str | None]:
    """Refuse option combinations that cannot work (exit 2), before any file is read; the keys."""
    from bncli.io import is_stdio

    stdin = any(is_stdio(p) for p in inputs)
    to_stdout = output is not None and is_stdio(output)
    checks = [
        (output is not None and output_dir is not None, "'-o'",
         "give -o FILE (one input) or --output-dir DIR, not both."),
        (stdin and len(inputs) > 1, "'INPUT'", "- (standard input) must be the only input."),
        (stdin and output is None, "'-o'", "standard input has no name to derive an output from; "
         "give -o FILE, or -o - for standard output."),
        (fmt is not None and not to_stdout, "'--format'",
         "--format is the format of -o - (standard output); a file's extension picks its format."),
        (to_stdout and as_json, "'--json'", "with -o - the data fills standard output, so no JSON "
         "document can go there; write the data to a file (-o FILE) for the JSON report."),
        (dataset and mode == Mode.eval, "'--dataset-stats'",
         "--dataset-stats computes batch statistics, which eval mode does not use; drop one of them."),
        (dataset and stdin, "'--dataset-stats'", "--dataset-stats reads its inputs twice and standard "
         "input can be read once; save it to a file first."),
    ]
    for failed, hint, message in checks:
        if failed:
            raise typer.BadParameter(message, param_hint=hint)
    keys: list[str | None] = list(key) if key else [None]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise typer.BadParameter(f"{twice!r} is given twice; name each tensor once.", param_hint="'--key'")
    return keys


def _once(render: Callable[..., None], **kwargs: Any) -> Callable[..., None]:
    """``render(plan, **kwargs)`` for the first plan only (the run's header)."""
    done: list[bool] = []

    def header(plan: Any, stderr: bool = False) -> None:
        if not done:
            done.append(True)
            render(plan, stderr=stderr, **kwargs)
    return header
