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


def _fit_pairs(pairs: list[tuple[str, str]], width: int | None) -> list[str]:
    """``key value`` pairs as kv_line()s, as many to a line as fit in ``width`` columns."""
    lines: list[list[tuple[str, str]]] = [[]]
    used = 0
    for key, value in pairs:
        size = len(key) + 1 + len(value)
        if lines[-1] and width is not None and used + 2 + size > width:
            lines.append([])
            used = 0
        used += size + (2 if lines[-1] else 0)
        lines[-1].append((key, value))
    return [kv_line(line) for line in lines]


def environment_lines(doc: dict[str, Any], width: int | None = None) -> list[str]:
    """``key value`` lines: versions, device, threads, copy bandwidth, method (within ``width``)."""
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
    return [line for group in (versions, device, method) for line in _fit_pairs(group, width)]


# The table's columns, richest first: render() prints the first set whose table fits the
# terminal (at 80 columns: "narrow"). "case" merges shape, dtype, layout, mode (and pass).
COLUMN_SETS: dict[str, tuple[str, ...]] = {
    "full": ("shape", "dtype", "layout", "mode", "pass", "engine", "±IQR", "nn", "compile", "eng/nn", "copy",
             "GB/s", "%copy", "nn %copy"),
    "merged": ("case", "engine", "±IQR", "nn", "compile", "eng/nn", "copy", "GB/s", "%copy", "nn %copy"),
    "narrow": ("case", "engine", "±IQR", "nn", "compile", "eng/nn", "%copy"),
    "minimal": ("case", "engine", "nn", "compile", "eng/nn"),
}
TITLES = {"full": "Median ms per call; GB/s under the bytes model; % of a copy of the same bytes",
          "merged": "Median ms per call; GB/s under the bytes model; % of a copy of the same bytes",
          "narrow": "Median ms per call; %copy: the engine's GB/s as % of a copy of the same bytes",
          "minimal": "Median ms per call (eng/nn below 1: the engine is faster)"}
SHORT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
RIGHT = {"engine", "±IQR", "nn", "compile", "eng/nn", "copy", "GB/s", "%copy", "nn %copy"}


def _cells(r: dict[str, Any]) -> dict[str, str]:
    """Every column's text for one result row."""
    v = r["variants"]
    main = v.get("engine") or v.get("nn") or {}
    fast = "*" if r.get("engine_path") not in (None, "module") else ""
    shape = "x".join(map(str, r["shape"]))
    bwd = r["pass"] != "forward"
    return {
        "shape": shape, "dtype": r["dtype"], "layout": r["layout"], "mode": r["mode"],
        "pass": "fwd+bwd" if bwd else "fwd",
        "case": f"{shape} {SHORT_DTYPES[r['dtype']]} {r['layout']} {r['mode']}{'+bwd' if bwd else ''}",
        "engine": _ms(v.get("engine")) + fast,
        "±IQR": f"{100 * main['iqr_ms'] / main['median_ms']:.0f}%" if main.get("median_ms") else "—",
        "nn": _ms(v.get("nn")), "compile": _ms(v.get("compile")),
        "eng/nn": _num(r["ratio_engine_nn"], ".2f"), "copy": _ms(v.get("copy")),
        "GB/s": _num(main.get("gbs"), ".1f"), "%copy": _num(main.get("pct_of_copy"), ".0f"),
        "nn %copy": _num((v.get("nn") or {}).get("pct_of_copy"), ".0f"),
    }


def results_table(doc: dict[str, Any], columns: str = "full") -> Table:
    """One row per (shape, dtype, layout, mode[, pass]) with the columns of ``COLUMN_SETS[columns]``."""
    results = doc["results"]
    skip = set()
    if not any("compile" in r["variants"] for r in results):
        skip.add("compile")
    if not any(r["pass"] != "forward" for r in results):
        skip.add("pass")
    names = [c for c in COLUMN_SETS[columns] if c not in skip]
    table = Table(show_edge=False, pad_edge=False)  # the title is TITLES[columns], printed above
    for name in names:
        table.add_column(name, justify="right" if name in RIGHT else "left", no_wrap=True,
                         style="dim" if name == "±IQR" else "bold" if name == "eng/nn" else None)
    for r in results:
        cells = _cells(r)
        table.add_row(*[cells[name] for name in names])
    return table


def fitting_table(doc: dict[str, Any], console: Console) -> tuple[str, Table, int]:
    """The richest results table that fits ``console``'s width: its column set, the table and
    the width it needs."""
    measure = console.options.update_width(1000)
    for columns in COLUMN_SETS:
        table = results_table(doc, columns)
        needed = Measurement.get(console, measure, table).maximum
        if needed <= console.width:
            break
    return columns, table, needed


def legend(doc: dict[str, Any]) -> list[str]:
    """Footnotes for the table: short names, the bytes models in use, fast paths, fwd+bwd rows."""
    results = doc["results"]
    lines = []
    models = dict.fromkeys(f"{r['mode']} {r['pass']}: {r['bytes_model']}" for r in results)
    lines += [f"bytes, {m}" for m in models]
    paths = sorted({r["engine_path"] for r in results if r.get("engine_path") not in (None, "module")})
    if paths:
        lines.append(f"* the engine took a CPU fast path ({', '.join(paths)}; see README, Numerics).")
    if any(r["pass"] != "forward" for r in results):
        lines.append("fwd+bwd rows time nn.BatchNorm2d with autograd; the engine is a no-grad path, "
                     "so their GB/s and %copy are nn's.")
    return lines


def render(doc: dict[str, Any]) -> None:
    """Environment, table and legend on stdout (within the terminal's width); notes on stderr."""
    out = Console(highlight=False, soft_wrap=False)
    columns, table, needed = fitting_table(doc, out)
    if needed > out.width:
        # Even the fewest columns do not fit: widen rather than squeeze numbers into ellipses.
        out = Console(highlight=False, soft_wrap=False, width=needed)
    for line in environment_lines(doc, out.width):
        out.print(line)
    out.print(TITLES[columns])
    out.print(table)
    for line in legend(doc):
        out.print(f"[dim]{escape(line)}[/]")
    err = Console(stderr=True, highlight=False, soft_wrap=False)
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
