"""``bncli inspect`` output: a status line, one table row per layer, grouped findings.

Takes :class:`bncli.checkpoint.CheckpointAudit` data; computes nothing the audit should.
"""

from __future__ import annotations

import math
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bncli.diagnose import Finding
from bncli.render import finding_text

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


def _table(report: Any, width: int) -> Table:
    rows = []
    for a in report.layers:
        worst = "error" if a.count("error") else "warning" if a.findings else ""
        rows.append([escape(report.display_name(a) or "(top level)"), str(a.channels or "-"),
                     "-" if a.num_batches_tracked is None else str(a.num_batches_tracked),
                     *[_span(a.buffers.get(key), "…") for key, _ in BUFFERS], worst])
    headers = ["layer", "C", "batches", *[h for _, h in BUFFERS], "error"]
    widths = [max(len(r[i].split("\n")[0]) for r in [headers, *rows]) for i in range(len(headers))]
    # One line per layer when it fits; else each range as min over max (two lines, narrow).
    stacked = sum(widths) + 3 * (len(widths) - 1) > width
    what = "min above max" if stacked else "min … max"
    table = Table(show_edge=False, pad_edge=False, title_justify="left",
                  title=f"Per layer, {what}: running_mean, running_var, weight, bias")
    for i, header in enumerate(headers[:-1]):
        left = i == 0 or (i >= 3 and not stacked)
        table.add_column(header, no_wrap=True, justify="left" if left else "right")
    table.add_column("", no_wrap=True)
    for a, row in zip(report.layers, rows, strict=True):
        if stacked:
            row[3:7] = [_span(a.buffers.get(key), "\n") for key, _ in BUFFERS]
        word, style = STATUS[row[-1]]
        table.add_row(*row[:-1], Text(word, style=style))
    return table


def audit_text(report: Any, width: int = 80) -> list[Any]:
    """One checkpoint's audit as printable parts: a status line, the eps/momentum it assumed,
    the layer table (fitted to ``width``), each finding with its fix, and a summary line."""
    failed = report.fails("error")
    layers = report.layers
    head = Text("FAIL " if failed else "OK   ", style="bold red" if failed else "bold green")
    under = f" under {report.container}." if report.container else ""
    head.append(f"{report.path}  {len(layers)} BatchNorm layer{'s' if len(layers) != 1 else ''}{under}")
    parts: list[Any] = [head]
    if not layers:
        return parts
    hyper = {(a.eps, a.momentum, a.assumed) for a in layers}
    if len(hyper) == 1:
        eps, momentum, assumed = hyper.pop()
        m = "none (cumulative average)" if momentum is None else f"{momentum:g}"
        note = (" (assumed: PyTorch's defaults, not in a state_dict)" if len(assumed) == 2 else
                f" ({assumed[0]} assumed: PyTorch's default, not in a state_dict)" if assumed else "")
        parts.append(Text(f"eps {eps:g}, momentum {m}{note}", style="dim"))
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
    parts.append(f"{len(layers)} layers: {errors} with errors, {warned} with warnings only, "
                 f"{len(layers) - errors - warned} clean.")
    return parts
