"""Rich tables, small terminal pictures and JSON documents for the commands' results.

Takes plain data (results from :mod:`bncli.core`, reports from :mod:`bncli.diagnose`);
never computes anything the engine should.
"""

from __future__ import annotations

import errno
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

BAR = "█"
PARTIAL = " ▏▎▍▌▋▊▉"


class _Console(Console):
    """A rich Console that lets a closed pipe reach the command's error mapping.

    rich turns a BrokenPipeError into ``SystemExit(1)``, the exit code of an expected
    failure; ``bncli ... | head -1`` should instead exit as quietly as other Unix tools
    (see :func:`bncli.commands.common.os_failure`).
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))


def console(stderr: bool = False) -> Console:
    """A console on stdout (results) or stderr (messages); width from $COLUMNS if set."""
    return _Console(stderr=stderr, highlight=False, soft_wrap=False)


def fmt(value: float, digits: int = 4) -> str:
    """Compact number: fixed for ordinary magnitudes, scientific for tiny/huge, nan/inf kept."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}f}"
    return f"{value:.{max(digits - 2, 1)}e}"


def size_text(nbytes: int) -> str:
    """1.50 GiB, 16.00 MiB, 300 B."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= factor:
            return f"{nbytes / factor:.2f} {unit}"
    return f"{nbytes} B"


def bar(value: float, top: float, width: int = 16) -> str:
    """A horizontal bar of ``value / top`` of ``width`` cells (eighth-cell resolution)."""
    if not (top > 0) or not math.isfinite(value) or value <= 0:
        return ""
    eighths = int(round(min(value / top, 1.0) * width * 8))
    return BAR * (eighths // 8) + (PARTIAL[eighths % 8] if eighths % 8 else "")


def rows_to_show(n: int, limit: int = 24, edge: int = 10) -> list[int | None]:
    """Channel indices to print: all if few, else the first and last ``edge`` with a gap."""
    if n <= limit:
        return list(range(n))
    return [*range(edge), None, *range(n - edge, n)]


def normalize_table(channels: int, cols: Sequence[tuple[str, Sequence[float]]], title: str,
                    picture: Callable[[int], str] | None = None) -> Table:
    """Per-channel table: one column per (header, values), plus an optional picture column."""
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("ch", justify="right", style="bold")
    for header, _ in cols:
        table.add_column(header, justify="right")
    if picture is not None:
        table.add_column("", justify="left", style="magenta", no_wrap=True)
    extra = [picture] if picture is not None else []
    for i in rows_to_show(channels):
        if i is None:
            table.add_row("…", *["…" for _ in cols], *["" for _ in extra], style="dim")
            continue
        table.add_row(str(i), *[fmt(float(values[i])) for _, values in cols], *[p(i) for p in extra])
    return table


def findings_text(report: Any) -> Text:
    """One input's check-shape verdict: a status line, then each finding and its fix."""
    text = Text()
    shape = "?" if report.shape is None else str(tuple(report.shape))  # (5,) for 1D, as messages say
    where = report.path + (f" [{report.key}]" if report.key else "")
    if report.valid:
        text.append("OK   ", style="bold green")
    else:
        text.append("FAIL ", style="bold red")
    text.append(f"{where}  shape {shape}  dtype {report.dtype or '?'}\n")
    for f in report.findings:
        finding_text(f, text)
    return text


def finding_text(f: Any, text: Text, where: str = "") -> Text:
    """Append ``  severity[code] (where: )message`` and ``    fix: hint`` to ``text``."""
    style = "red" if f.severity == "error" else "yellow"
    text.append(f"  {f.severity}[{f.code}] ", style=f"bold {style}")
    if where:
        text.append(f"{where}: ", style="bold")
    text.append(f"{f.message}\n")
    text.append("    fix: ", style="cyan")
    text.append(f"{f.hint}\n")
    return text


def kv_line(pairs: Sequence[tuple[str, str]], width: int | None = None) -> str:
    """``key value  key value`` with bold keys, escaped.

    With ``width``, a line that would be wider breaks between pairs, never inside one
    (``size 192.00`` / ``KiB``); continuation lines are indented by two spaces.
    """
    cells = [(f"{k} {v}", f"[bold]{escape(k)}[/] {escape(v)}") for k, v in pairs]
    if width is None:
        return "  ".join(markup for _, markup in cells)
    lines: list[list[str]] = [[]]
    used = 0
    for plain, markup in cells:
        need = len(plain) + (2 if lines[-1] else 0)
        if lines[-1] and used + need > width:
            lines.append([])
            used, need = 2, len(plain)
        lines[-1].append(markup)
        used += need
    return "\n  ".join("  ".join(line) for line in lines)
