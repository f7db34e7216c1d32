"""``bncli recalibrate``: re-estimate every BN layer's running statistics of an exported model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bncli.commands.common import finite_or_none, handle_errors, print_json
from bncli.commands.model_options import (
    BatchSizeOpt,
    DataArgs,
    DropLastOpt,
    ModelArg,
    VarMode,
    default_model_output,
)
from bncli.commands.options import ForceOpt, JsonOpt, KeyOpt


@handle_errors(writes=True)
def recalibrate(
    model: ModelArg,
    data: DataArgs,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", readable=False,
        help="The recalibrated model (.pt2). Default: MODEL.recalibrated.pt2 beside it.")] = None,
    key: KeyOpt = None,
    batch_size: BatchSizeOpt = None,
    var: Annotated[VarMode, typer.Option(
        "--var", help="batchmean: mean of per-batch unbiased variances, as "
                      "torch.optim.swa_utils.update_bn and fvcore precise_bn; population: the exact "
                      "variance of each layer's inputs over all the data.")] = VarMode.batchmean,
    save_state: Annotated[Path | None, typer.Option(
        "--save-state", metavar="DIR|FILE", readable=False,
        help="Also write every BN layer's new state_dict (.pt/.safetensors; a folder gets "
             "OUTPUT-stem.bn_state.pt).")] = None,
    drop_last: DropLastOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Set every BatchNorm layer's running statistics of MODEL from DATA, exactly.

    The fix for stale running stats (after SWA, small-batch fine-tuning,
    domain shift): runs the model over DATA in batches with every BN layer
    in train mode (batch statistics), as update_bn does, observes each
    layer's inputs in float64, and writes a copy of MODEL whose
    running_mean/running_var hold the result (num_batches_tracked = the
    number of batches). MODEL is read without running any of its code; the
    outputs are written all or nothing, never over an input, and kept
    unless --force.

    Examples:

        bncli recalibrate model.pt2 batch.npy -o model.recal.pt2

        bncli recalibrate model.pt2 train_*.npy -b 64 --var population

        bncli recalibrate model.pt2 a.npy b.npy --save-state bn.pt --json

        bncli compare model.recal.pt2 --data val.npy   # check: all ok
    """
    from bncli import model_ops
    from bncli.progress import progress_callback

    dest = output or default_model_output(model, "recalibrated")
    with progress_callback(enabled=not as_json, min_bytes=0) as progress:
        result = model_ops.recalibrate_model(
            model, data, dest, key=key, batch_size=batch_size, var_mode=var.value, save_state=save_state,
            force=force, drop_last=drop_last, progress=progress)
    if as_json:
        print_json(_to_json(result))
    else:
        _render(result)


def _moved(u: Any) -> tuple[float, float]:
    """How far the running stats moved: max |old - new| / sqrt(new var), worst new/old var."""
    import numpy as np

    from bncli.model_ops import farthest_from_one

    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.abs(u.old_mean - u.new_mean) / np.sqrt(u.new_var + u.layer.eps)
        ratio = u.new_var / u.old_var
    return float(shift.max()), farthest_from_one(ratio)


def _to_json(r: Any) -> dict[str, Any]:
    from bncli.commands.compare_model import _vec, plan_json

    layers = []
    for u in r.updates:
        shift, ratio = _moved(u)
        layers.append({"index": u.layer.index, "name": u.layer.name, "num_features": u.layer.num_features,
                       "old_running_mean": _vec(u.old_mean), "old_running_var": _vec(u.old_var),
                       "running_mean": _vec(u.new_mean), "running_var": _vec(u.new_var),
                       "mean_moved": finite_or_none(shift), "var_ratio_new_old": finite_or_none(ratio)})
    return {"model": str(r.model), "output": str(r.output), "var": r.var_mode, **plan_json(r.plan),
            "num_batches_tracked": r.plan.batches, "layers": layers,
            "without_running_stats": [layer.name for layer in r.without_stats],
            "save_state": str(r.state_path) if r.state_path else None}


def _render(r: Any) -> None:
    from rich.table import Table

    from bncli.commands.compare_model import plan_line
    from bncli.render import console, fmt, kv_line

    out = console()
    out.print(kv_line([("model", str(r.model)), ("var", r.var_mode)], out.width))
    out.print(plan_line(r.plan, out.width))
    table = Table(title="New running statistics (float64 over all batches)", title_justify="left",
                  show_edge=False, pad_edge=False)
    for header in ("#", "layer", "C", "mean moved", "var new/old", "mean (ch 0)", "var (ch 0)"):
        table.add_column(header, justify="left" if header == "layer" else "right", overflow="fold")
    for u in r.updates:
        shift, ratio = _moved(u)
        table.add_row(str(u.layer.index), u.layer.name, str(u.layer.num_features), fmt(shift), fmt(ratio),
                      fmt(float(u.new_mean[0])), fmt(float(u.new_var[0])))
    out.print(table)
    out.print("[dim]mean moved: max over channels of |old - new running_mean| / sqrt(new running_var); "
              "var new/old: the channel whose running_var changed most.[/]")
    if r.without_stats:
        out.print(f"Left as they are (no running statistics): {', '.join(lay.name for lay in r.without_stats)}")
    out.print(kv_line([("wrote", str(r.output))] + ([("state", str(r.state_path))] if r.state_path else [])
                      + [("num_batches_tracked", str(r.plan.batches))], out.width))
