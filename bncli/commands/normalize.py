"""``bncli normalize``: apply nn.BatchNorm2d to a tensor file and write the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import finite_or_none, handle_errors, print_json, state_findings
from bncli.commands.options import (
    AffineOpt,
    BiasOpt,
    ChunkSizeOpt,
    Device,
    DeviceOpt,
    EpsOpt,
    ForceOpt,
    InputArg,
    JsonOpt,
    KeyOpt,
    Layout,
    LayoutOpt,
    Mode,
    ModeOpt,
    MomentumOpt,
    NumFeaturesOpt,
    PrefixOpt,
    SaveStateOpt,
    StateOpt,
    TrackOpt,
    WeightOpt,
    parse_momentum,
)


@handle_errors
def normalize(
    input: InputArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="FILE", readable=False,
        help="Where to write; the extension picks the format. "
             "Default: INPUT's name with .bn before the extension, beside it.")] = None,
    key: KeyOpt = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Normalize INPUT exactly as torch.nn.BatchNorm2d would.

    Reports shapes and per-channel mean/std before and after. The input is never
    modified; the outputs are written atomically (no partial file on failure or
    Ctrl-C), the output and --save-state together or neither, and an existing file
    is kept unless --force. The dtype is kept.

    Examples:

        bncli normalize batch.npy                   # train mode: batch.bn.npy

        bncli normalize batch.npy --mode eval --state resnet.pt --prefix bn1

        bncli normalize images_nhwc.npy --layout nhwc -o out.pt --json

        bncli normalize huge.npy --out-of-core --chunk-size 64M
    """
    from bncli import core, io
    from bncli.progress import progress_callback

    opts = core.EngineOptions(
        eps=eps, momentum=parse_momentum(momentum), affine=affine,
        track_running_stats=track_running_stats, num_features=num_features, state=state,
        prefix=prefix, weight=weight, bias=bias, device=device.value)
    execution = "auto" if out_of_core is None else "out-of-core" if out_of_core else "in-memory"
    with progress_callback(enabled=not as_json) as progress:
        result = core.normalize_file(
            input, output or io.default_output(input), key=key, mode=mode.value, layout=layout.value,
            opts=opts, force=force, save_state=save_state, execution=execution,
            chunk_bytes=chunk_size, progress=progress, on_start=None if as_json else _render_header)
    if as_json:
        print_json(_to_json(result))
    else:
        _render(result)


def _to_json(r: Any) -> dict[str, Any]:
    def lst(a: Any) -> list[float | None]:
        return [finite_or_none(float(v)) for v in a]

    state = {k: (v.tolist() if v.ndim else v.item()) for k, v in r.state.items()}
    return {
        "input": str(r.input), "output": str(r.output), "key": r.key, "shape": list(r.shape),
        "dtype": r.dtype, "mode": r.mode, "layout": r.layout, "device": r.device,
        "state_source": r.source.description,
        "ignored_state_keys": r.source.ignored_keys,
        "state_findings": state_findings(r.source),
        "save_state": str(r.state_path) if r.state_path else None,
        "execution": r.execution,
        "channels": [
            {"channel": i, "mean_before": mb, "std_before": sb, "mean_after": ma, "std_after": sa}
            for i, (mb, sb, ma, sa) in enumerate(zip(lst(r.mean_before), lst(r.std_before),
                                                     lst(r.mean_after), lst(r.std_after), strict=True))
        ],
        "state": state,
    }


def _render_header(plan: Any) -> None:
    """What will happen, printed before the passes (and their progress bars) start."""
    from bncli.render import console, kv_line, size_text

    out = console()
    out.print(kv_line([("input", str(plan.input) + (f" [{plan.key}]" if plan.key else "")),
                       ("shape", str(plan.shape)), ("dtype", plan.dtype), ("layout", plan.layout)], out.width))
    out.print(kv_line([("mode", plan.mode), ("device", plan.device), ("state", plan.source.description)], out.width))
    if plan.execution.get("path") == "out-of-core":
        passes = plan.execution["passes"]
        out.print(kv_line([("out-of-core", f"{passes} {'pass' if passes == 1 else 'passes'}, "
                                           f"{size_text(plan.execution['chunk_bytes'])} chunks; 'after' "
                                           "columns derived from input stats")], out.width))


def _render(r: Any) -> None:
    from bncli.render import console, kv_line, normalize_table

    out = console()
    cols = [("mean before", r.mean_before), ("std before", r.std_before),
            ("mean after", r.mean_after), ("std after", r.std_after)]
    title = "Per-channel statistics (biased std, as BatchNorm uses)"
    out.print(normalize_table(len(r.mean_before), cols, title))
    if "num_batches_tracked" in r.state:
        out.print(kv_line([("num_batches_tracked", str(int(r.state["num_batches_tracked"])))], out.width))
    out.print(kv_line([("wrote", str(r.output))] +
                      ([("state", str(r.state_path))] if r.state_path else []), out.width))
    audit = r.source.audit
    if r.mode == "eval" and audit is not None and audit.findings:
        # Eval output is only as good as the running stats: say what bncli inspect would.
        from rich.text import Text

        from bncli.render import finding_text

        notes = Text(f"Note: the state ({r.source.description}) has findings "
                     "(as bncli inspect reports them):\n", style="yellow")
        for f in audit.findings:
            finding_text(f, notes)
        notes.rstrip()
        console(stderr=True).print(notes)
    if r.source.ignored_keys:
        console(stderr=True).print(f"[yellow]Note:[/] ignored state keys {r.source.ignored_keys} "
                                   "(not used with these options).")
