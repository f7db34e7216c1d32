"""``bncli stats``: exact per-channel statistics of a dataset on disk, in bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import finite_or_none, handle_errors, print_json
from bncli.commands.options import ChunkSizeOpt, ForceOpt, InputsArg, JsonOpt, KeyOpt, Layout, parse_scale


@handle_errors
def stats(
    inputs: InputsArg,
    key: KeyOpt = None,
    layout: Annotated[Layout, typer.Option(
        "--layout", case_sensitive=False,
        help="nchw: (N, C, H, W); nhwc: channels-last (N, H, W, C) arrays.")] = Layout.nchw,
    chunk_size: ChunkSizeOpt = None,
    scale: Annotated[float, typer.Option(
        "--scale", callback=parse_scale,
        help="Divide every value by this first, e.g. 255 for uint8 images fed through ToTensor().")] = 1.0,
    save_state: Annotated[Path | None, typer.Option(
        "--save-state", metavar="FILE", readable=False,
        help="Write a BatchNorm2d state_dict (.pt/.safetensors) whose running_mean/running_var are "
             "these statistics, for `normalize --mode eval --state FILE`.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Exact per-channel count, mean, variance, std, min and max of one or many files.

    Every value of every input counts once (shards of any size, any mix of formats),
    with float64 accumulation and a numerically stable merge: the result equals a
    float64 two-pass computation over all the data, whatever the chunking, with peak
    memory bounded by --chunk-size. std is the biased one BatchNorm2d normalizes with;
    var (n-1) is what it stores in running_var. Prints a ready-to-paste
    transforms.Normalize line.

    Examples:

        bncli stats train_*.npy

        bncli stats images_uint8.npy --layout nhwc --scale 255

        bncli stats shards/*.safetensors --key images --save-state bn.pt --json
    """
    from bncli import datastats, io
    from bncli.outofcore import DEFAULT_CHUNK_BYTES
    from bncli.progress import progress_callback

    if save_state is not None:  # refuse a bad destination before a long pass, not after
        io.check_output(save_state, force=force, protect=inputs, allowed=io.STATE_SUFFIXES,
                        option="--save-state")
    with progress_callback(enabled=not as_json) as progress:
        result = datastats.dataset_stats(inputs, key=key, layout=layout.value,
                                         chunk_bytes=chunk_size or DEFAULT_CHUNK_BYTES, scale=scale,
                                         progress=progress)
    if save_state is not None:
        datastats.save_stats_state(result, save_state, force=force)
    if as_json:
        print_json(_to_json(result, save_state))
    else:
        _render(result, save_state)


def _to_json(r: Any, save_state: Path | None) -> dict[str, Any]:
    m = r.moments

    def lst(a: Any) -> list[float | None]:
        return [finite_or_none(float(v)) for v in a]

    return {
        "inputs": [{"path": str(s.path), "key": s.key, "shape": list(s.shape), "dtype": s.dtype,
                    "bytes": s.nbytes} for s in r.inputs],
        "layout": r.layout,
        "channels": m.channels,
        "count": m.count,
        "scale": r.scale,
        "mean": lst(m.mean),
        "var": lst(m.var),
        "var_unbiased": lst(m.var_unbiased),
        "std": lst(m.std),
        "std_unbiased": lst(m.std_unbiased),
        "min": lst(m.minimum),
        "max": lst(m.maximum),
        "non_finite": [int(v) for v in m.non_finite],
        "normalize": r.normalize_line(),
        "save_state": str(save_state) if save_state else None,
        "chunk_bytes": r.chunk_bytes,
        "notes": r.notes,
    }


def _render(r: Any, save_state: Path | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    from bncli.render import console, fmt, kv_line, rows_to_show, size_text

    out, err = console(), console(stderr=True)
    m = r.moments
    shown = r.inputs if len(r.inputs) <= 8 else [*r.inputs[:4], None, *r.inputs[-3:]]
    for s in shown:
        if s is None:
            out.print(f"  ... {len(r.inputs) - 7} more")
            continue
        out.print(kv_line([("input", str(s.path) + (f" [{s.key}]" if s.key else "")),
                           ("shape", str(s.shape)), ("dtype", s.dtype), ("size", size_text(s.nbytes))], out.width))
    out.print(kv_line([("files", str(len(r.inputs))), ("total", size_text(r.total_bytes)),
                       ("layout", r.layout), ("values per channel", f"{m.count:,}")]
                      + ([("scale", f"divided by {r.scale:g}")] if r.scale != 1.0 else []), out.width))
    cols = [("mean", m.mean), ("std", m.std), ("var", m.var), ("var (n-1)", m.var_unbiased),
            ("min", m.minimum), ("max", m.maximum)]
    if m.non_finite.any():
        cols.append(("non-finite", m.non_finite))
    # std is the biased one BatchNorm normalizes with; var (n-1) is what it keeps in running_var.
    table = Table(title="Exact per-channel statistics", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("ch", justify="right", style="bold")
    for header, _ in cols:
        table.add_column(header, justify="right")
    for i in rows_to_show(m.channels):
        if i is None:
            table.add_row("…", *["…" for _ in cols], style="dim")
            continue
        table.add_row(str(i), *[str(int(v[i])) if v.dtype.kind == "i" else fmt(float(v[i]), 6)
                                for _, v in cols])
    out.print(table)
    line = r.normalize_line()
    if line:
        if len(line) > out.width and ", std=" in line:
            # Still valid Python to paste, broken inside the parentheses instead of mid-number.
            head, tail = line.split(", std=", 1)
            line = f"{head},\n{' ' * len('transforms.Normalize(')}std={tail}"
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    if save_state is not None:
        out.print(kv_line([("wrote", str(save_state))], out.width))
        out.print(f"use it: bncli normalize DATA --mode eval --state {save_state}",
                  markup=False, highlight=False, soft_wrap=True)
    for note in r.notes:
        err.print(f"[yellow]Note:[/] {escape(note)}")
