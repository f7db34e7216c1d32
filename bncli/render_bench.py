"""Rendering for ``bncli bench``: the environment block, the results table, a live progress bar.

Works on the plain JSON document of :meth:`bncli.bench.Report.to_json`, so what the table
shows and what ``--json`` prints cannot drift apart. No torch here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from bncli.render import kv_line

ProgressFn = Callable[[int, int, str], None]


def _ms(variant: dict[str, Any] | None) -> str:
    if not variant or variant.get("median_ms") is None:
        return "fail" if variant and variant.get("error") else "—"
    return f"{variant['median_ms']:.3f}"


def _num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def environment_lines(doc: dict[str, Any]) -> list[str]:
    """Two or three ``key value`` lines: versions, device, threads, copy bandwidth, method."""
    env, settings = doc["environment"], doc["settings"]
    versions = [("torch", env["torch"])]
    if env.get("cuda"):
        versions += [("CUDA", str(env["cuda"])), ("cuDNN", str(env.get("cudnn")))]
    versions += [("python", env["python"])]
    device = [("device", f"{doc['device']} ({env['device_name']})"), ("threads", str(env["threads"])),
              ("copy bandwidth", f"{env['copy_gbs']:.1f} GB/s over {env['copy_bytes'] >> 20} MiB")]
    method = [("preset", str(settings["preset"])), ("cache", env["cache"])]
    if settings.get("cuda_graphs"):
        method.append(("timing", "CUDA-graph replay"))
    return [kv_line(versions), kv_line(device), kv_line(method)]


def results_table(doc: dict[str, Any]) -> Table:
    """One row per (shape, dtype, layout, mode[, pass]): times, ratio, GB/s, % of copy."""
    results = doc["results"]
    has_compile = any("compile" in r["variants"] for r in results)
    has_backward = any(r["pass"] != "forward" for r in results)
    table = Table(title="Median ms per call; GB/s under the bytes model; % of a copy of the same bytes",
                  title_justify="left", show_edge=False, pad_edge=False)
    for header in ("shape", "dtype", "layout", "mode"):
        table.add_column(header, no_wrap=True)
    if has_backward:
        table.add_column("pass", no_wrap=True)
    table.add_column("engine", justify="right")
    table.add_column("±IQR", justify="right", style="dim")
    table.add_column("nn", justify="right")
    if has_compile:
        table.add_column("compile", justify="right")
    table.add_column("eng/nn", justify="right", style="bold")
    table.add_column("copy", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("%copy", justify="right")
    table.add_column("nn %copy", justify="right")
    for r in results:
        v = r["variants"]
        main = v.get("engine") or v.get("nn") or {}
        iqr = (f"{100 * main['iqr_ms'] / main['median_ms']:.0f}%"
               if main.get("median_ms") else "—")
        fast = "*" if r.get("engine_path") == "channels-last fast path" else ""
        cells = ["x".join(map(str, r["shape"])), r["dtype"], r["layout"], r["mode"]]
        if has_backward:
            cells.append("fwd+bwd" if r["pass"] != "forward" else "fwd")
        cells += [_ms(v.get("engine")) + fast, iqr, _ms(v.get("nn"))]
        if has_compile:
            cells.append(_ms(v.get("compile")))
        cells += [_num(r["ratio_engine_nn"], ".2f"), _ms(v.get("copy")), _num(main.get("gbs"), ".1f"),
                  _num(main.get("pct_of_copy"), ".0f"), _num((v.get("nn") or {}).get("pct_of_copy"), ".0f")]
        table.add_row(*cells)
    return table


def legend(doc: dict[str, Any]) -> list[str]:
    """Footnotes for the table: the bytes models in use, the fast-path marker, fwd+bwd rows."""
    lines = []
    models = dict.fromkeys(f"{r['mode']} {r['pass']}: {r['bytes_model']}" for r in doc["results"])
    lines += [f"bytes, {m}" for m in models]
    if any(r.get("engine_path") == "channels-last fast path" for r in doc["results"]):
        lines.append("* the engine took its CPU channels-last fast path (few channels).")
    if any(r["pass"] != "forward" for r in doc["results"]):
        lines.append("fwd+bwd rows time nn.BatchNorm2d with autograd; the engine is a no-grad path, "
                     "so their GB/s and %copy are nn's.")
    return lines


def render(doc: dict[str, Any]) -> None:
    """Environment, table and legend on stdout; notes on stderr."""
    out = Console(highlight=False, soft_wrap=False)
    table = results_table(doc)
    # Never squeeze columns into ellipses: a pipe or a narrow terminal gets the table's width.
    width = max(out.width, Measurement.get(out, out.options.update_width(1000), table).maximum)
    if width > out.width:
        out = Console(highlight=False, soft_wrap=False, width=width)
    for line in environment_lines(doc):
        out.print(line)
    out.print(table)
    for line in legend(doc):
        out.print(f"[dim]{escape(line)}[/]")
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for note in dict.fromkeys(doc["notes"]):
        err.print(f"[yellow]Note:[/] {escape(note)}")


@contextlib.contextmanager
def live_progress(*, enabled: bool = True) -> Iterator[ProgressFn | None]:
    """A rich progress bar on stderr over the sweep's rows (None when stderr is no terminal)."""
    err = Console(stderr=True)
    if not enabled or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=err, transient=True)
    task = bar.add_task("starting", total=None)

    def update(done: int, total: int, description: str) -> None:
        bar.update(task, completed=done, total=total, description=description)

    with bar:
        yield update
