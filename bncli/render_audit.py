"""``bncli inspect`` output: a status line, one table row per layer, grouped findings.

Takes :class:`bncli.checkpoint.CheckpointAudit` data (a checkpoint or an exported
program, whose layers also name the conv feeding them); computes nothing the audit should.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from rich.table import Table
from rich.text import Text

from bncli.diagnose import Finding
from bncli.render import finding_text
from bncli.wording import plural

BUFFERS = (("running_mean", "run mean"), ("running_var", "run var"), ("weight", "weight"), ("bias", "bias"))
STATUS = {"error": ("error", "bold red"), "warning": ("warn", "bold yellow"), "": ("ok", "bold green")}


def _num(value: float) -> str:
    """Three significant digits in at most 8 characters: ``0.426``, ``-4.23e-4``, ``1e-12``."""
    text = f"{value:.3g}"
    if "e" not in text and len(text.lstrip("-")) <= 6:
        return text
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _span(summary: Any, sep: str) -> str:
    """``lo{sep}hi`` of a buffer; ``!`` marks one that also holds NaN/Inf."""
    if summary is None:
        return "-"
    if summary.length == 0:
        return "(empty)"
    if math.isnan(summary.min):
        return "not finite"
    lo, hi = _num(summary.min), _num(summary.max)
    return (lo if lo == hi else f"{lo}{sep}{hi}") + (" !" if summary.non_finite else "")


def _width(cell: str) -> int:
    return max(len(line) for line in cell.split("\n"))


def _conv_line(conv: str, layer: str, room: int) -> str:
    """``← stem.conv`` under its layer; ``← ….conv1`` (the shared parent elided) if too wide."""
    full = f"← {conv}"
    parent = layer.rpartition(".")[0]
    if len(full) <= room or not parent or not conv.startswith(parent + "."):
        return full
    return f"← …{conv[len(parent):]}"


def _table(report: Any, width: int) -> Table:
    graph = bool(report.nodes)
    names = [report.display_name(a) or "(top level)" for a in report.layers]
    convs = [report.node_of(a).conv for a in report.layers] if graph else []
    rows = []
    for i, a in enumerate(report.layers):
        worst = "error" if a.count("error") else "warning" if a.findings else ""
        rows.append([names[i], *[convs[i] or "-" for _ in range(graph)], str(a.channels or "-"),
                     "-" if a.num_batches_tracked is None else str(a.num_batches_tracked),
                     *[_span(a.buffers.get(key), "…") for key, _ in BUFFERS], worst])
    headers = ["layer", *["conv" for _ in range(graph)], "C", "batches", *[h for _, h in BUFFERS], "error"]
    widths = [max(_width(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    # One line per layer when it fits; else each range as min over max (two lines, narrow),
    # and the conv under its layer's name.
    stacked = sum(widths) + 3 * (len(widths) - 1) > width
    what = "min above max" if stacked else "min … max"
    title = f"Per layer, {what}: running_mean, running_var, weight, bias"
    if graph and not stacked:
        title += "; the conv feeding it"
    first = 3 if not graph or stacked else 4  # index of the first buffer column
    if stacked:
        if graph:
            headers[0:2] = ["layer ← conv"]
            for row in rows:
                del row[1]
        for a, row in zip(report.layers, rows, strict=True):
            row[first:first + 4] = [_span(a.buffers.get(key), "\n") for key, _ in BUFFERS]
        shown = [[*r[:-1], STATUS[r[-1]][0]] for r in rows]  # the status column shows the short word
        others = sum(max(_width(r[i]) for r in [headers, *shown]) for i in range(1, len(headers)))
        room = max(width - others - 3 * (len(headers) - 1), *map(len, [headers[0], *names]))
        for row, name, conv in zip(rows, names, convs, strict=False):
            if conv:
                row[0] += "\n" + _conv_line(conv, name, room)
    table = Table(show_edge=False, pad_edge=False, title_justify="left", title=title)
    for i, header in enumerate(headers[:-1]):
        left = i < first - 2 or (i >= first and not stacked)
        table.add_column(header, no_wrap=True, justify="left" if left else "right")
    table.add_column("", no_wrap=True)
    for row in rows:
        word, style = STATUS[row[-1]]
        table.add_row(*(Text(cell) for cell in row[:-1]), Text(word, style=style))
    return table


def _momentum(value: float | None) -> str:
    return "none (cumulative average)" if value is None else f"{value:g}"


def _graph_momentum(report: Any, layer: Any) -> str:
    if layer.momentum is None and report.node_of(layer).momentum_arg == 0:
        return "none (stored as 0: an eval export cannot tell None from 0)"
    return _momentum(layer.momentum)


def _hyper(report: Any) -> list[Text]:
    """The eps/momentum the findings use (and whether they were assumed); train-mode exports."""
    layers = report.layers
    if not report.nodes:
        hyper = {(a.eps, a.momentum, a.assumed) for a in layers}
        if len(hyper) != 1:
            return []
        eps, momentum, assumed = hyper.pop()
        note = (" (assumed: PyTorch's defaults, not in a state_dict)" if len(assumed) == 2 else
                f" ({assumed[0]} assumed: PyTorch's default, not in a state_dict)" if assumed else "")
        return [Text(f"eps {eps:g}, momentum {_momentum(momentum)}{note}", style="dim")]
    # The values most layers share, then each layer that differs (only in what differs).
    eps, momentum = Counter((a.eps, _graph_momentum(report, a)) for a in layers).most_common(1)[0][0]
    line = f"eps {eps:g}, momentum {momentum}, from the graph's BN nodes"
    others = []
    for a in layers:
        m = _graph_momentum(report, a)
        diff = [*([f"eps {a.eps:g}"] if a.eps != eps else []), *([f"momentum {m}"] if m != momentum else [])]
        if diff:
            others.append(f"{report.display_name(a)}: {', '.join(diff)}")
    if others:
        line += "; except " + "; ".join(others[:4]) + (f"; and {len(others) - 4} more" if len(others) > 4 else "")
    parts = [Text(line, style="dim")]
    train = [report.display_name(a) for a in layers if report.node_of(a).batch_stats]
    if train:
        names = ", ".join(train) if len(train) <= 4 else f"{', '.join(train[:3])} and {len(train) - 3} more"
        parts.append(Text(
            f"Exported in train mode: {names} normalize{'s' if len(train) == 1 else ''} with "
            "batch statistics (and update the running stats) whenever the program runs, and "
            "an exported module cannot be switched with .eval(). For inference, export after "
            "model.eval().", style="yellow"))
    return parts


def audit_text(report: Any, width: int = 80) -> list[Any]:
    """One checkpoint's audit as printable parts: a status line, the eps/momentum it assumed,
    the layer table (fitted to ``width``), each finding with its fix, and a summary line."""
    failed = report.fails("error")
    layers = report.layers
    head = Text("FAIL " if failed else "OK   ", style="bold red" if failed else "bold green")
    under = f" under {report.container}." if report.container else ""
    where = " in the exported graph" if report.nodes else ""
    head.append(f"{report.path}  {len(layers)} BatchNorm layer{'s' if len(layers) != 1 else ''}"
                f"{where}{under}")
    parts: list[Any] = [head]
    if not layers:
        return parts
    parts.extend(_hyper(report))
    parts.append(_table(report, width))
    # The same finding in several layers (e.g. unconverged after N steps) is printed once.
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for a in layers:
        for f in a.findings:
            key = (f.severity, f.code, f.message, f.hint)
            groups.setdefault(key, []).append(report.display_name(a) or "(top level)")
    text = Text()
    for (severity, code, message, hint), names in sorted(groups.items(), key=lambda g: g[0][0] != "error"):
        where = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} and {len(names) - 3} more"
        finding_text(Finding(code, severity, message, hint), text, where)
    if text:
        text.rstrip()
        parts.append(text)
    errors = sum(bool(a.count("error")) for a in layers)
    warned = sum(bool(a.findings) and not a.count("error") for a in layers)
    parts.append(f"{plural(len(layers), 'layer')}: {errors} with errors, {warned} with warnings only, "
                 f"{len(layers) - errors - warned} clean.")
    if report.nodes and any(_stale(a) for a in layers):
        parts.append(Text("To re-estimate the running stats from data (no model code needed): "
                          f"bncli recalibrate {report.path} DATA... -o OUT.pt2", style="dim"))
    return parts


# Findings that re-estimating the running statistics from data fixes.
_STALE = ("negative_var", "var_below_eps", "never_updated", "unconverged")


def _stale(layer: Any) -> bool:
    running = [layer.buffers.get(k) for k in ("running_mean", "running_var")]
    return (any(f.code in _STALE for f in layer.findings)
            or any(b is not None and b.non_finite for b in running))
