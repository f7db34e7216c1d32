"""``bncli compare``: what model.eval() changes compared with train mode, channel by channel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from bncli.commands.common import finite_or_none, handle_errors, print_error, print_json, state_findings
from bncli.commands.model_options import BatchSizeOpt, DataOpt, DropLastOpt
from bncli.commands.options import (
    AffineOpt,
    BiasOpt,
    Device,
    DeviceOpt,
    EpsOpt,
    GlobOpt,
    JsonOpt,
    KeyOpt,
    Layout,
    LayoutOpt,
    MomentumOpt,
    NormalizeInputsArg,
    NumFeaturesOpt,
    PrefixOpt,
    StateOpt,
    TrackOpt,
    WeightOpt,
    parse_momentum,
)


@handle_errors
def compare(
    inputs: NormalizeInputsArg,
    key: KeyOpt = None,
    glob: GlobOpt = None,
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
    device: DeviceOpt = Device.cpu,
    data: DataOpt = None,
    batch_size: BatchSizeOpt = None,
    drop_last: DropLastOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run each INPUT through the same layer in train mode and in eval mode, and show the gap.

    Eval uses the running statistics as given (--state/--prefix, or a fresh module's
    mean 0 / var 1), not the ones the train pass updates; those are shown separately.
    Nothing is written. Several inputs (files, folders: see --glob; - for
    standard input) get one report each, every one against the same layer; a
    bad input does not stop the others (exit 1 at the end). With an exported
    model (MODEL.pt2) and --data, runs the whole model in both modes and names
    the BN layer whose running statistics break eval.

    Examples:

        bncli compare batch.npy

        bncli compare batch.npy --state model.pt --prefix layer1.0.bn1 --json

        bncli compare shards/ --state model.pt --prefix input_bn

        bncli compare model.pt2 --data batch.npy   # whole model, per BN layer
    """
    from bncli import io

    if any(Path(p).suffix.lower() == ".pt2" for p in inputs):
        if len(inputs) > 1:
            raise typer.BadParameter("a whole model (MODEL.pt2) is compared on its own; its data go in --data.",
                                     param_hint="'INPUT'")
        from bncli.commands.compare_model import compare_model

        return compare_model(inputs[0], data, key=key, batch_size=batch_size, drop_last=drop_last,
                             as_json=as_json)
    from bncli import compare, core
    from bncli.commands.compare_model import refuse_model_options

    refuse_model_options(inputs[0], data)
    if any(io.is_stdio(p) for p in inputs) and len(inputs) > 1:
        raise typer.BadParameter("- (standard input) must be the only input.", param_hint="'INPUT'")
    files = io.expand_inputs(inputs, glob=glob, allow_stdin=True)
    opts = core.EngineOptions(
        eps=eps, momentum=parse_momentum(momentum), affine=affine,
        track_running_stats=track_running_stats, num_features=num_features, state=state,
        prefix=prefix, weight=weight, bias=bias, device=device.value)
    sources: list[io.Source] = [io.read_stdin() if io.is_stdio(f) else f for f in files]
    if len(inputs) == 1 and files == [Path(inputs[0])]:  # one file named as itself: its report, as ever
        result = compare.compare_file(sources[0], key=key, layout=layout.value, opts=opts)
        print_json(_to_json(result)) if as_json else _render(result)
        return
    reports = compare.compare_files(sources, key=key, layout=layout.value, opts=opts)
    failed = [e for _, _, e in reports if e is not None]
    if as_json:
        print_json({"files": [{"ok": True, **_to_json(r)} if e is None else
                              {"ok": False, "input": str(src), "error": {"type": type(e).__name__,
                                                                         "message": e.message, "hint": e.hint}}
                              for src, r, e in reports],
                    "summary": {"files": len(reports), "compared": len(reports) - len(failed),
                                "failed": len(failed)}})
    else:
        _render_many(reports)
    for e in failed:
        print_error(e.message, e.hint)
    if failed:
        raise typer.Exit(1)


def state_notes(r: Any) -> list[str]:
    """The checkpoint layer's audit findings (bncli inspect's), errors first, as sentences.

    A finding about some channels says whether the largest |train - eval| falls on one.
    """
    import numpy as np

    audit = r.source.audit
    if audit is None:
        return []
    diff = r.max_abs_diff
    worst = int(np.nanargmax(diff)) if diff.size and np.isfinite(diff).any() else None
    lines = []
    for f in audit.findings:
        line = f"{f.severity}[{f.code}] {f.message}"
        channels = getattr(f, "channels", ())
        if worst is not None and worst in channels and len(channels) < len(diff):
            line += f" Channel {worst} has the largest |train - eval| above."
        lines.append(f"{line} Fix: {f.hint}")
    return lines


def explain(r: Any) -> list[str]:
    """Plain-language reasons for the gap, from the numbers of this input.

    The state's own findings come first (a running_var below eps decides the gap more
    than any convergence or n/(n-1) detail), then how train and eval mode differ.
    """
    cfg = r.config
    n = r.count
    lines = state_notes(r)
    lines.append(f"Train mode normalizes each channel with this batch's own statistics: the mean and "
                 f"the biased variance over N*H*W = {n} values per channel.")
    if not cfg.track_running_stats:
        lines.append("track_running_stats is off, so eval mode ALSO uses batch statistics: "
                     "train and eval agree (up to rounding), and there is nothing to update.")
        return lines
    lines.append(f"Eval mode (model.eval()) uses running_mean/running_var from {r.source.description} "
                 "instead, so outputs differ wherever the running stats differ from this batch's.")
    if r.source.audit is None and r.running_mean is not None and (
            abs(r.running_mean).max() == 0 and (r.running_var == 1).all()):
        lines.append("These are a fresh module's mean 0 / var 1, so eval mode barely changes the input "
                     "(y = x / sqrt(1 + eps) * weight + bias): a classic symptom of a model whose "
                     "BatchNorm layers were never trained or whose checkpoint was not loaded.")
    if n > 1:
        lines.append(f"The running variance stores the UNBIASED batch variance (times n/(n-1) = "
                     f"{n}/{n - 1} = {n / (n - 1):.6g}), while normalization uses the biased one.")
    if cfg.momentum is None:
        lines.append("momentum=None: running = running + (batch - running) / num_batches_tracked "
                     f"(a cumulative average; after this step num_batches_tracked = "
                     f"{r.num_batches_tracked_after}).")
    else:
        lines.append(f"momentum={cfg.momentum}: running = (1 - {cfg.momentum}) * running + {cfg.momentum} * batch "
                     "after each train step (the opposite convention from Keras/TF momentum, "
                     "which weights the OLD value).")
    return lines


def _to_json(r: Any) -> dict[str, Any]:
    def val(a: Any, i: int) -> float | None:
        return None if a is None else finite_or_none(float(a[i]))

    channels = [{
        "channel": i, "batch_mean": val(r.batch_mean, i), "batch_var": val(r.batch_var, i),
        "running_mean": val(r.running_mean, i), "running_var": val(r.running_var, i),
        "running_mean_after_train_step": val(r.running_mean_after, i),
        "running_var_after_train_step": val(r.running_var_after, i),
        "train_mean": val(r.train_mean, i), "train_std": val(r.train_std, i),
        "eval_mean": val(r.eval_mean, i), "eval_std": val(r.eval_std, i),
        "max_abs_diff": val(r.max_abs_diff, i),
    } for i in range(len(r.max_abs_diff))]
    cfg = r.config
    return {
        "input": str(r.input), "key": r.key, "shape": list(r.shape), "dtype": r.dtype,
        "layout": r.layout, "state_source": r.source.description,
        "config": {"num_features": cfg.num_features, "eps": cfg.eps, "momentum": cfg.momentum,
                   "affine": cfg.affine, "track_running_stats": cfg.track_running_stats},
        "values_per_channel": r.count,
        "num_batches_tracked_after_train_step": r.num_batches_tracked_after,
        "max_abs_diff": finite_or_none(r.overall_max_abs_diff),
        "state_findings": state_findings(r.source),
        "channels": channels,
        "explanation": explain(r),
    }


def _render(r: Any) -> None:
    import numpy as np
    from rich.markup import escape

    from bncli.render import bar, console, fmt, kv_line, normalize_table

    out = console()
    out.print(kv_line([("input", str(r.input) + (f" [{r.key}]" if r.key else "")),
                       ("shape", str(r.shape)), ("dtype", r.dtype), ("layout", r.layout)], out.width))
    top = r.overall_max_abs_diff
    n = len(r.max_abs_diff)
    cols: list[tuple[str, Any]] = [("train mean", r.train_mean), ("train std", r.train_std),
                                   ("eval mean", r.eval_mean), ("eval std", r.eval_std),
                                   ("max |train-eval|", r.max_abs_diff)]
    out.print(normalize_table(n, cols, "Output per channel: train mode vs eval mode",
                              picture=lambda ch: bar(float(r.max_abs_diff[ch]), top, 12)))
    where = str(int(np.nanargmax(r.max_abs_diff))) if n and np.isfinite(r.max_abs_diff).any() else "-"
    out.print(kv_line([("largest |train - eval|", fmt(top)), ("at channel", where)], out.width))
    used: list[tuple[str, Any]] = [("batch mean", r.batch_mean), ("batch var", r.batch_var)]
    if r.running_mean is not None:
        used += [("run mean", r.running_mean), ("run var", r.running_var),
                 ("run mean'", r.running_mean_after), ("run var'", r.running_var_after)]
        title = ("Statistics used (train: batch; eval: run); ' = after one train step, "
                 f"num_batches_tracked -> {r.num_batches_tracked_after}")
    else:
        title = "Statistics used (batch statistics in both modes)"
    out.print(normalize_table(n, used, title))
    out.print("[bold]Why they differ[/]")
    for line in explain(r):
        out.print(f"  • {escape(line)}")


def _render_many(reports: list[tuple[Any, Any, Any]]) -> None:
    """One report per input under a rule, then one summary row per input."""
    import numpy as np
    from rich.markup import escape
    from rich.rule import Rule
    from rich.table import Table

    from bncli.render import console, fmt

    out = console()
    summary = Table(title="Summary: largest |train - eval| per input", title_justify="left", show_edge=False,
                    pad_edge=False)
    for name in ("#", "input", "shape", "largest", "at channel"):
        summary.add_column(name, justify="left" if name in ("input", "shape") else "right")
    for i, (src, r, exc) in enumerate(reports, 1):
        out.print(Rule(escape(f"{i}/{len(reports)} {src}"), align="left"))
        if exc is not None:
            out.print("failed: the error is printed below")
            summary.add_row(str(i), escape(str(src)), "", "[red]failed[/]", "")
            continue
        _render(r)
        finite = r.max_abs_diff.size and np.isfinite(r.max_abs_diff).any()
        summary.add_row(str(i), escape(str(src) + (f" [{r.key}]" if r.key else "")), str(r.shape),
                        fmt(r.overall_max_abs_diff), str(int(np.nanargmax(r.max_abs_diff))) if finite else "-")
    out.print(Rule())
    out.print(summary)
    done = sum(exc is None for _, _, exc in reports)
    out.print(f"compared {done} of {len(reports)} inputs")
