"""``bncli compare MODEL.pt2 --data X``: which BN layer of a whole model breaks eval mode.

Dispatched to from :mod:`bncli.commands.compare` when INPUT is a ``.pt2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bncli.commands.common import finite_or_none, print_json


def compare_model(model: Path, data: list[Path] | None, *, key: str | None, batch_size: int | None,
                  drop_last: bool, as_json: bool) -> None:
    """Run MODEL over DATA in eval and in train-BN mode and report every BN layer."""
    from bncli import model_ops
    from bncli.errors import InputError
    from bncli.progress import progress_callback

    if not data:
        raise InputError(f"{model}: comparing a whole model needs data to run it on.",
                         hint=f"Pass model inputs with --data, e.g. bncli compare {model} --data batch.npy")
    with progress_callback(enabled=not as_json, min_bytes=0) as progress:
        result = model_ops.compare_model(model, data, key=key, batch_size=batch_size,
                                         drop_last=drop_last, progress=progress)
    if as_json:
        print_json(to_json(result))
    else:
        render(result)


def refuse_model_options(input: Path, data: list[Path] | None) -> None:
    """--data belongs to a .pt2 INPUT; on a tensor file it would be silently ignored."""
    if data:
        from bncli.errors import InputError

        raise InputError(f"--data runs a whole model, but {input} is a tensor file, not a .pt2.",
                         hint="Drop --data, or pass the exported model: bncli compare MODEL.pt2 --data FILE.")


def _vec(a: Any) -> list[float | None]:
    return [finite_or_none(float(v)) for v in a]


def plan_json(plan: Any) -> dict[str, Any]:
    """The data side of a model command's JSON."""
    return {"data": [str(p) for p in plan.paths], "key": plan.key, "samples": plan.samples,
            "sample_shape": list(plan.sample_shape), "dtype": plan.dtype, "batch_size": plan.batch_size,
            "batches": plan.batches, "dropped": plan.dropped}


def to_json(r: Any) -> dict[str, Any]:
    from bncli.model_ops import MEAN_SHIFT_LIMIT, VAR_RATIO_LIMIT

    layers = [{
        "index": rep.layer.index, "name": rep.layer.name, "node": rep.layer.node, "op": rep.layer.op,
        "num_features": rep.layer.num_features, "conv": rep.layer.conv, "values_per_channel": rep.count,
        "input_mean": _vec(rep.mean), "input_var": _vec(rep.var),
        "running_mean": _vec(rep.running_mean), "running_var": _vec(rep.running_var),
        "mean_shift": _vec(rep.mean_shift), "var_ratio": _vec(rep.var_ratio),
        "worst_mean_shift": finite_or_none(rep.worst_shift), "worst_var_ratio": finite_or_none(rep.worst_ratio),
        "max_abs_diff": finite_or_none(rep.max_abs_diff), "off": rep.off, "reasons": rep.reasons,
    } for rep in r.reports]
    return {
        "model": str(r.model), "input": {"name": r.input.name, "shape": r.input.describe()},
        **plan_json(r.plan),
        "thresholds": {"mean_shift": MEAN_SHIFT_LIMIT, "var_ratio": [1 / VAR_RATIO_LIMIT, VAR_RATIO_LIMIT]},
        "layers": layers,
        "without_running_stats": [layer.name for layer in r.without_stats],
        "output_max_abs_diff": finite_or_none(r.output_max_abs_diff),
        "output_max_abs": finite_or_none(r.output_max_abs),
        "breaks_at": r.breaks_at.layer.name if r.breaks_at else None,
        "off": [rep.layer.name for rep in r.off],
    }


def plan_line(plan: Any, width: int | None = None) -> str:
    """``data a.npy, b.npy  48 samples  3 batches of 16`` (markup)."""
    from bncli.render import kv_line

    files = ", ".join(str(p) for p in plan.paths)
    pairs = [("data", files + (f" [{plan.key}]" if plan.key else "")), ("samples", str(plan.samples)),
             ("batches", f"{plan.batches} of {plan.batch_size}")]
    if plan.dropped:
        pairs.append(("dropped", f"last {plan.dropped}"))
    return kv_line(pairs, width)


def render(r: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    from bncli.model_ops import MEAN_SHIFT_LIMIT, VAR_RATIO_LIMIT
    from bncli.render import console, fmt, kv_line

    out = console()
    out.print(kv_line([("model", str(r.model)), ("input", f"{r.input.name} {r.input.describe()}")], out.width))
    out.print(plan_line(r.plan, out.width))
    table = Table(title="BN layers: running stats vs. their inputs (train-BN pass)", title_justify="left",
                  show_edge=False, pad_edge=False)
    for header, justify in (("#", "right"), ("layer", "left"), ("C", "right"), ("mean shift", "right"),
                            ("var ratio", "right"), ("max Δout", "right"), ("", "left")):
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for rep in r.reports:
        flag = "[bold red]off[/]" if rep.off else "[green]ok[/]"
        table.add_row(str(rep.layer.index), rep.layer.name, str(rep.layer.num_features), fmt(rep.worst_shift),
                      fmt(rep.worst_ratio), fmt(rep.max_abs_diff), flag)
    out.print(table)
    out.print(f"[dim]mean shift: max over channels of |input mean - running_mean| / sqrt(running_var); "
              f"var ratio: input var / running_var, the channel farthest from 1; off: shift > "
              f"{MEAN_SHIFT_LIMIT} or ratio outside {1 / VAR_RATIO_LIMIT}..{VAR_RATIO_LIMIT}; "
              "Δout: max |eval - train| at the layer's output.[/]")
    if r.without_stats:
        out.print(f"No running statistics (batch statistics in both modes): "
                  f"{', '.join(layer.name for layer in r.without_stats)}")
    out.print(kv_line([("model output max |eval - train|", fmt(r.output_max_abs_diff)),
                       ("max |eval|", fmt(r.output_max_abs))], out.width))
    first = r.breaks_at
    if first is None:
        out.print("[green]Every BN layer's running statistics describe its inputs on this data:[/] "
                  "eval mode and train mode normalize alike.")
        return
    others = [rep.layer.name for rep in r.off if rep is not first]
    out.print(f"[bold]Eval breaks at {first.layer.name}[/] (the first layer whose running statistics "
              f"do not describe its inputs): {' and '.join(first.reasons)}."
              + (f" Also off: {', '.join(others)}." if others else ""))
    data = " ".join(str(p) for p in r.plan.paths)
    out.print("[yellow]Fix:[/] re-estimate them on data like this: " + escape(
        f"bncli recalibrate {r.model} {data} -o {Path(r.model).with_suffix('')}.recalibrated.pt2"))
