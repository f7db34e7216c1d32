"""``bncli normalize``: apply nn.BatchNorm2d to a tensor file and write the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import (
    AffineOpt,
    BiasOpt,
    Device,
    DeviceOpt,
    EpsOpt,
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
    StateOpt,
    TrackOpt,
    WeightOpt,
    finite_or_none,
    handle_errors,
    parse_momentum,
    print_json,
    state_findings,
)
from bncli.commands.stats import ChunkSizeOpt


@handle_errors
def normalize(
    input: InputArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Where to write; the extension picks the format. "
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
    save_state: Annotated[Path | None, typer.Option(
        "--save-state", metavar="FILE",
        help="Write the layer's state_dict after this step (.pt/.safetensors), loadable "
             "with nn.BatchNorm2d.load_state_dict.")] = None,
    device: DeviceOpt = Device.cpu,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    out_of_core: Annotated[bool | None, typer.Option(
        "--out-of-core/--in-memory", show_default="auto",
        help="Stream a .npy in two passes with memory bounded by --chunk-size, or load it whole. "
             "Default: stream .npy files of 256 MiB or more, or too big for the free memory.")] = None,
    chunk_size: ChunkSizeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Normalize INPUT exactly as torch.nn.BatchNorm2d would.

    Reports shapes and per-channel mean/std before and after. The input is never
    modified; the output is written atomically (no partial file on failure or Ctrl-C)
    and an existing output is kept unless --force. The dtype is kept.

    Examples:

        bncli normalize batch.npy                      # train mode -> batch.bn.npy

        bncli normalize batch.npy --mode eval --state resnet.pt --prefix layer1.0.bn1

        bncli normalize images_nhwc.npy --layout nhwc -o out.pt --json

        bncli normalize huge.npy --out-of-core --chunk-size 64M   # larger than memory
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
            chunk_bytes=chunk_size, progress=progress)
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


def _render(r: Any) -> None:
    from bncli.render import console, kv_line, normalize_table

    out = console()
    out.print(kv_line([("input", str(r.input) + (f" [{r.key}]" if r.key else "")),
                       ("shape", str(r.shape)), ("dtype", r.dtype), ("layout", r.layout)]))
    out.print(kv_line([("mode", r.mode), ("device", r.device), ("state", r.source.description)]))
    if r.execution.get("path") == "out-of-core":
        from bncli.commands.stats import _size

        out.print(kv_line([("out-of-core", f"{r.execution['passes']} pass(es), "
                                           f"{_size(r.execution['chunk_bytes'])} chunks; 'after' "
                                           "columns derived from the exact input statistics")]))
    cols = [("mean before", r.mean_before), ("std before", r.std_before),
            ("mean after", r.mean_after), ("std after", r.std_after)]
    title = "Per-channel statistics (biased std, as BatchNorm uses)"
    out.print(normalize_table(len(r.mean_before), cols, title))
    if "num_batches_tracked" in r.state:
        out.print(kv_line([("num_batches_tracked", str(int(r.state["num_batches_tracked"])))]))
    out.print(kv_line([("wrote", str(r.output))] +
                      ([("state", str(r.state_path))] if r.state_path else [])))
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
