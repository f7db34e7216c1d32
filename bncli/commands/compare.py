"""``bncli compare``: what model.eval() changes compared with train mode, channel by channel."""

from __future__ import annotations

from typing import Any

from bncli.commands.common import finite_or_none, handle_errors, print_json, state_findings
from bncli.commands.model_options import BatchSizeOpt, DataOpt, DropLastOpt
from bncli.commands.options import (
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
    MomentumOpt,
    NumFeaturesOpt,
    PrefixOpt,
    StateOpt,
    TrackOpt,
    WeightOpt,
    parse_momentum,
)


@handle_errors
def compare(
    input: InputArg,
    key: KeyOpt = None,
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
    """Run INPUT through the same layer in train mode and in eval mode, and show the gap.

    Eval uses the running statistics as given (--state/--prefix, or a fresh module's
    mean 0 / var 1), not the ones the train pass updates; those are shown separately.
    Nothing is written. With an exported model (MODEL.pt2) and --data, runs
    the whole model in both modes and names the BN layer whose running
    statistics break eval.

    Examples:

        bncli compare batch.npy

        bncli compare batch.npy --state model.pt --prefix layer1.0.bn1 --json

        bncli compare model.pt2 --data batch.npy   # whole model, per BN layer
    """
    if input.suffix.lower() == ".pt2":
        from bncli.commands.compare_model import compare_model

        return compare_model(input, data, key=key, batch_size=batch_size, drop_last=drop_last, as_json=as_json)
    from bncli import core
    from bncli.commands.compare_model import refuse_model_options

    refuse_model_options(input, data)

    opts = core.EngineOptions(
        eps=eps, momentum=parse_momentum(momentum), affine=affine,
        track_running_stats=track_running_stats, num_features=num_features, state=state,
        prefix=prefix, weight=weight, bias=bias, device=device.value)
    result = core.compare_file(input, key=key, layout=layout.value, opts=opts)
    if as_json:
        print_json(_to_json(result))
    else:
        _render(result)


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
