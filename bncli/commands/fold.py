"""``bncli fold``: fold eval BatchNorm layers of an exported model into the convs before them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import finite_or_none, handle_errors, print_json
from bncli.commands.model_options import BatchSizeOpt, DataOpt, ModelArg, default_model_output
from bncli.commands.options import ForceOpt, JsonOpt, KeyOpt


def _tolerance(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"the tolerance must be > 0, got {value}.")
    return value


@handle_errors(writes=True)
def fold(
    model: ModelArg,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", readable=False,
        help="The folded model (.pt2). Default: MODEL.folded.pt2 beside it.")] = None,
    data: DataOpt = None,
    key: KeyOpt = None,
    batch_size: BatchSizeOpt = None,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", callback=_tolerance,
        help="Largest accepted max |folded - original| / max(1, max |original|); above it "
             "nothing is written.")] = 1e-4,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold each eval-mode BatchNorm of MODEL into the conv2d feeding it.

    conv -> BN becomes one conv with scaled weights and a shifted bias
    (torch.nn.utils.fusion.fuse_conv_bn_weights), the standard deployment
    step. A BN is folded only where that is exact: eval mode, running
    statistics, and a conv whose output and weights nothing else uses; the
    others are kept and the reason shown. The folded model is compared with
    the original on a random batch (or on --data) and written only if they
    agree within --tolerance. MODEL is read without running its code.

    Examples:

        bncli fold model.pt2 -o model.folded.pt2

        bncli fold model.pt2 -o deploy.pt2 --data val.npy --tolerance 1e-5
    """
    from bncli import fold as folding

    result = folding.fold_model(model, output or default_model_output(model, "folded"), data=data or (),
                                key=key, batch_size=batch_size, tolerance=tolerance, force=force)
    if as_json:
        print_json(_to_json(result))
    else:
        _render(result)


def _to_json(r: Any) -> dict[str, Any]:
    return {
        "model": str(r.model), "output": str(r.output) if r.output else None,
        "layers": [{"index": d.layer.index, "name": d.layer.name, "conv": d.layer.conv, "folded": d.folded,
                    "reason": None if d.folded else d.reason} for d in r.decisions],
        "folded": len(r.folded), "kept": len(r.decisions) - len(r.folded),
        "check": r.check, "max_abs_error": finite_or_none(r.max_abs_error),
        "max_abs_output": finite_or_none(r.max_abs_output),
        "relative_error": finite_or_none(r.relative_error), "tolerance": r.tolerance,
    }


def _render(r: Any) -> None:
    from rich.table import Table

    from bncli.render import console, fmt, kv_line

    out = console()
    out.print(kv_line([("model", str(r.model))], out.width))
    table = Table(title="BN layers", title_justify="left", show_edge=False, pad_edge=False)
    for header in ("#", "layer", "conv", "result"):
        table.add_column(header, justify="right" if header == "#" else "left", overflow="fold")
    for d in r.decisions:
        result = "[green]folded[/]" if d.folded else f"[yellow]kept[/]: {d.reason}"
        table.add_row(str(d.layer.index), d.layer.name, d.layer.conv or "-", result)
    out.print(table)
    out.print(kv_line([("check", r.check)], out.width))
    out.print(kv_line([("max |folded - original|", fmt(r.max_abs_error)),
                       ("relative", fmt(r.relative_error)), ("tolerance", f"{r.tolerance:g}")], out.width))
    out.print(kv_line([("wrote", str(r.output)),
                       ("folded", f"{len(r.folded)} of {len(r.decisions)} BN layers")], out.width))
