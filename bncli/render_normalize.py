"""What ``normalize`` prints: one tensor's report, or a run over many inputs (tables and JSON).

Takes plain data (:class:`bncli.core.NormalizeResult`, :class:`bncli.batch.BatchResult`);
computes nothing the engine should.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bncli.audit import findings_json
from bncli.render import console, finding_text, fmt, kv_line, normalize_table, rows_to_show, size_text
from bncli.wording import plural


def _output_name(output: Any) -> str:
    return "standard output" if str(output) == "-" else str(output)


def _state_json(state: Any) -> dict[str, Any] | None:
    if state is None:
        return None
    return {k: (v.tolist() if v.ndim else v.item()) for k, v in state.items()}


def _layer_json(source: Any) -> dict[str, Any]:
    return {"state_source": source.description if source else None,
            "ignored_state_keys": source.ignored_keys if source else [],
            "state_findings": findings_json(source.audit if source else None)}


# -- one tensor ------------------------------------------------------------------------------
def header(plan: Any, stderr: bool = False) -> None:
    """What will happen, printed before the passes (and their progress bars) start."""
    out = console(stderr=stderr)
    out.print(kv_line([("input", str(plan.input) + (f" [{plan.key}]" if plan.key else "")),
                       ("shape", str(plan.shape)), ("dtype", plan.dtype), ("layout", plan.layout)], out.width))
    out.print(kv_line([("mode", plan.mode), ("device", plan.device), ("state", plan.source.description)], out.width))
    if plan.execution.get("path") == "out-of-core":
        passes = plan.execution["passes"]
        out.print(kv_line([("out-of-core", f"{passes} {'pass' if passes == 1 else 'passes'}, "
                                           f"{size_text(plan.execution['chunk_bytes'])} chunks; 'after' "
                                           "columns derived from input stats")], out.width))


def to_json(r: Any) -> dict[str, Any]:
    """One tensor's report: the ``normalize --json`` document for one input."""
    from bncli.batch import tensor_report

    report = tensor_report(r)
    return {
        "input": str(r.input), "output": str(r.output), "key": r.key, "shape": list(r.shape),
        "dtype": r.dtype, "mode": r.mode, "layout": r.layout, "device": r.device, **_layer_json(r.source),
        "save_state": str(r.state_path) if r.state_path else None,
        "execution": r.execution, "passed_through": r.passed_through, "dropped": r.dropped,
        "channels": report["channels"], "state": _state_json(r.state),
    }


def render(r: Any, stderr: bool = False) -> None:
    """One tensor's table and what was written (on stderr when stdout holds the data)."""
    out = console(stderr=stderr)
    cols = [("mean before", r.mean_before), ("std before", r.std_before),
            ("mean after", r.mean_after), ("std after", r.std_after)]
    title = "Per-channel statistics (biased std, as BatchNorm uses)"
    out.print(normalize_table(len(r.mean_before), cols, title))
    if "num_batches_tracked" in r.state:
        out.print(kv_line([("num_batches_tracked", str(int(r.state["num_batches_tracked"])))], out.width))
    kept = [("kept", plural(len(r.passed_through), "other tensor"))] if r.passed_through else []
    out.print(kv_line([("wrote", _output_name(r.output)), *kept]
                      + ([("state", str(r.state_path))] if r.state_path else []), out.width))
    layer_notes(r.source, r.mode)
    dropped_note(str(r.input), r.dropped, r.dropped_reason)


def layer_notes(source: Any, mode: str) -> None:
    """Notes on stderr about the layer's state: its audit findings in eval mode, ignored keys."""
    err = console(stderr=True)
    if source is None:
        return
    audit = source.audit
    if mode == "eval" and audit is not None and audit.findings:
        # Eval output is only as good as the running stats: say what bncli inspect would.
        notes = Text(f"Note: the state ({source.description}) has findings "
                     "(as bncli inspect reports them):\n", style="yellow")
        for f in audit.findings:
            finding_text(f, notes)
        notes.rstrip()
        err.print(notes)
    if source.ignored_keys:
        err.print(f"[yellow]Note:[/] ignored state keys {source.ignored_keys} (not used with these options).")


def dropped_note(where: str, dropped: Sequence[str], reason: str) -> None:
    if dropped:
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        console(stderr=True).print(f"[yellow]Note:[/] {escape(where)}: not written: {escape(shown)} "
                                   f"({escape(reason)}); write a .pt, .npz or .safetensors to keep them.")


# -- many inputs -----------------------------------------------------------------------------
def _rule(statistics: str, files: int, keys: int) -> str:
    n = files * keys
    inputs = plural(files, "file") + (f" x {keys} keys" if keys > 1 else "")
    if statistics == "dataset":
        return f"one batch of all {inputs}: pooled exact statistics, 1 update"
    if statistics == "per-input":
        return f"each of {inputs} its own, in order: {plural(n, 'train step')}"
    return f"{inputs}, each with the running statistics"


def batch_header(plan: Any, *, files: int, keys: Sequence[str | None], dataset: bool, stderr: bool = False) -> None:
    """The run's header (from its first tensor's plan), before the files' progress."""
    out = console(stderr=stderr)
    statistics = "dataset" if dataset else "per-input" if plan.statistics == "batch" else "running"
    out.print(kv_line([("mode", plan.mode), ("device", plan.device), ("layout", plan.layout),
                       ("state", plan.source.description)], out.width))
    out.print(kv_line([("batches", _rule(statistics, files, len(keys)))], out.width))


def render_batch(result: Any) -> None:
    """One row per normalized tensor, the pooled statistics, the summary; notes on stderr
    (the failed inputs' errors are the command's to print)."""
    out = console()
    table = Table(title="Normalized inputs", title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("input", overflow="fold")  # long paths wrap whole, not cut with an ellipsis
    table.add_column("shape", no_wrap=True)
    table.add_column("output", overflow="fold")
    for f in result.files:
        if not f.ok:
            table.add_row(escape(f.input), "", "[red]failed (error below)[/]")
        for t in f.tensors:
            where = f.input + (f" [{t['key']}]" if t["key"] else "")
            table.add_row(escape(where), str(tuple(t["shape"])), escape(_output_name(f.output)))
    out.print(table)
    if result.dataset is not None:
        m = result.dataset.moments
        out.print(kv_line([("pooled", f"{plural(len(result.dataset.inputs), 'tensor')}, "
                                      f"{m.count:,} values per channel")], out.width))
        pooled = Table(title="Pooled statistics (exact)", title_justify="left", show_edge=False, pad_edge=False)
        for name in ("ch", "mean", "std (biased)", "var (n-1)"):
            pooled.add_column(name, justify="right")
        for c in rows_to_show(m.channels):
            if c is None:
                pooled.add_row("…", "…", "…", "…", style="dim")
                continue
            pooled.add_row(str(c), fmt(float(m.mean[c]), 6), fmt(float(m.std[c]), 6),
                           fmt(float(m.var_unbiased[c]), 6))
        out.print(pooled)
    state = result.state or {}
    if "num_batches_tracked" in state:
        out.print(kv_line([("num_batches_tracked", str(int(state["num_batches_tracked"])))], out.width))
    done = len(result.files) - len(result.failed)
    pairs = [("wrote", f"{done} of {len(result.files)} files")] + ([("ranks", str(result.ranks))]
                                                                   if result.ranks > 1 else [])
    if result.save_state is not None:
        pairs.append(("state", str(result.save_state) if result.state_written
                      else "not written (an input failed)"))
    out.print(kv_line(pairs, out.width))
    layer_notes(result.source, result.mode)
    for f in result.files:
        dropped_note(f.input, f.dropped, f.dropped_reason)


def batch_json(result: Any) -> dict[str, Any]:
    """The ``normalize --json`` document of a run over several inputs."""
    pooled = None
    if result.dataset is not None:
        d = result.dataset.to_dict()
        pooled = {k: d[k] for k in ("count", "channels", "mean", "var", "var_unbiased", "std", "inputs")}
    failed = len(result.failed)
    return {
        "mode": result.mode, "layout": result.layout, "statistics": result.statistics,
        "device": result.device or None, **_layer_json(result.source),
        "files": [f.to_dict() for f in result.files], "dataset": pooled,
        "summary": {"files": len(result.files), "written": len(result.files) - failed, "failed": failed,
                    "tensors": sum(len(f.tensors) for f in result.files), "ranks": result.ranks},
        "save_state": str(result.save_state) if result.save_state else None,
        "state_written": result.state_written, "state": _state_json(result.state),
    }
