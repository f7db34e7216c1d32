"""``bncli stats``: exact per-channel statistics of a dataset on disk, in bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import handle_errors, primary_rank_reports, print_json
from bncli.commands.options import (
    ChunkSizeOpt,
    ForceOpt,
    GlobOpt,
    InputsArg,
    JsonOpt,
    KeyOpt,
    Layout,
    parse_scale,
)


@handle_errors(writes=True)
def stats(
    inputs: InputsArg,
    key: KeyOpt = None,
    layout: Annotated[Layout | None, typer.Option(
        "--layout", show_default=False, case_sensitive=False,
        help="nchw: (N, C, H, W); nhwc: channels-last (N, H, W, C) arrays. Default nchw, with a "
             "note for inputs that look channels-last.")] = None,
    chunk_size: ChunkSizeOpt = None,
    scale: Annotated[float, typer.Option(
        "--scale", callback=parse_scale,
        help="Divide the values of integer inputs by this first, e.g. 255 for uint8 images fed "
             "through ToTensor(). Floating-point inputs are kept as they are.")] = 1.0,
    allow_mixed_dtypes: Annotated[bool, typer.Option(
        "--allow-mixed-dtypes",
        help="Pool inputs of different dtypes (refused by default: [0, 255] integers and [0, 1] "
             "floats give statistics of neither).")] = False,
    glob: GlobOpt = None,
    save_state: Annotated[Path | None, typer.Option(
        "--save-state", metavar="FILE", readable=False,
        help="Write a BatchNorm2d state_dict (.pt/.safetensors) whose running_mean/running_var are "
             "these statistics, for `normalize --mode eval --state FILE`.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Exact per-channel count, mean, variance, std, min and max of a dataset.

    Every value of every input counts once (shards of any size, any mix of
    formats), with float64 accumulation and a numerically stable merge: the
    result equals the exact statistics of all the data to ~1e-15, whatever the
    chunking, with peak memory bounded by --chunk-size. A folder means its
    files (see --glob), in natural order.

    Each input's header is checked first, as check-shape does: inputs that look
    channels-last get a note unless --layout is given; mixed dtypes are refused.
    std is the biased one BatchNorm2d normalizes with; var (n-1) is what it
    stores in running_var. Prints a ready-to-paste transforms.Normalize line.

    Under torchrun the ranks share the files and rank 0 prints the result, the
    same as one process's: torchrun --nproc-per-node 4 -m bncli stats shards/

    Examples:

        bncli stats train_*.npy

        bncli stats shards/ --layout nhwc --scale 255

        bncli stats shards/ --glob '*.safetensors' --key images --json

        bncli stats shards/ --layout nhwc --scale 255 --save-state bn.pt
    """
    from bncli import datastats, distributed, io
    from bncli.outofcore import DEFAULT_CHUNK_BYTES
    from bncli.progress import progress_callback

    def check_destination() -> None:  # rank 0 writes, so rank 0 checks; before a long pass
        if save_state is not None and world.is_primary:
            io.check_output(save_state, force=force, protect=inputs, allowed=io.STATE_OUTPUT_SUFFIXES,
                            option="--save-state")

    with primary_rank_reports(), distributed.session() as world:
        world.gather(check_destination)
        with progress_callback(enabled=world.is_primary and not as_json) as progress:
            result = datastats.dataset_stats(
                inputs, key=key, layout=layout.value if layout else None, scale=scale, glob=glob,
                allow_mixed_dtypes=allow_mixed_dtypes, chunk_bytes=chunk_size or DEFAULT_CHUNK_BYTES,
                progress=progress, world=world)
        if not world.is_primary:
            return
        if save_state is not None:
            datastats.save_stats_state(result, save_state, force=force)
        if as_json:
            print_json({**result.to_dict(), "save_state": str(save_state) if save_state else None})
        else:
            _render(result, save_state)


def fit_normalize_line(line: str, width: int) -> str:
    """``transforms.Normalize(mean=[...], std=[...])`` broken to ``width`` columns, still valid Python.

    Breaks go between ``mean=`` and ``std=``, then between list items, each continuation
    aligned under the first item, never inside a number. A word longer than the room left
    (a very narrow terminal) stays whole.
    """
    if len(line) <= width:
        return line
    import textwrap

    head = "transforms.Normalize("
    body = line[len(head):-1]  # mean=[...], std=[...]
    mean, std = body.split(", std=", 1)
    out = []
    for i, (name, items) in enumerate((("mean", mean.removeprefix("mean=")), ("std", std))):
        start = (head if i == 0 else " " * len(head)) + f"{name}=["
        end = "]," if i == 0 else "])"
        room = max(width - len(start) - len(end), 1)
        parts = textwrap.wrap(items.strip("[]"), room, break_long_words=False, break_on_hyphens=False)
        out.append(start + f"\n{' ' * len(start)}".join(parts) + end)
    return "\n".join(out)


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
                           ("shape", str(s.shape)), ("dtype", s.dtype), ("size", size_text(s.nbytes))],
                          out.width))
    scaled = [s for s in r.inputs if s.scale != 1.0]
    divided = "divided by" if len(scaled) == len(r.inputs) else "integer inputs divided by"
    out.print(kv_line([("files", str(len(r.inputs))), ("total", size_text(r.total_bytes)),
                       ("layout", r.layout), ("values per channel", f"{m.count:,}")]
                      + ([("scale", f"{divided} {r.scale:g}")] if scaled else [])
                      + ([("ranks", str(r.ranks))] if r.ranks > 1 else []), out.width))
    cols = [("mean", m.mean), ("std", m.std), ("var", m.var), ("var (n-1)", m.var_unbiased),
            ("min", r.minimum), ("max", r.maximum)]
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
        out.print(fit_normalize_line(line, out.width), markup=False, highlight=False, soft_wrap=True)
    if save_state is not None:
        out.print(kv_line([("wrote", str(save_state))], out.width))
        out.print(f"use it: bncli normalize DATA --mode eval --state {save_state}",
                  markup=False, highlight=False, soft_wrap=True)
    for note in r.notes:
        err.print(f"[yellow]Note:[/] {escape(note)}")
