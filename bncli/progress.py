"""Progress bars on stderr for passes over large files.

The core never prints; it calls ``progress(task, done_bytes, total_bytes)``
(:data:`bncli.outofcore.ProgressFn`). This module turns those calls into a rich bar
per pass (bytes, rate, ETA) on stderr, or into nothing when stderr is not a terminal
or the output is ``--json``, so pipes and logs stay clean. A task named
``files: CURRENT`` counts files, not bytes (``normalize`` over many inputs): one bar
whose text names the file at work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: Passes smaller than this finish before a bar is worth drawing.
MIN_BYTES = 64 << 20

ProgressFn = Callable[[str, int, int], None]


@contextlib.contextmanager
def progress_callback(*, enabled: bool = True, console: Any = None,
                      min_bytes: int = MIN_BYTES) -> Iterator[ProgressFn | None]:
    """Yield a callback that draws progress bars, or None when there is nothing to draw.

    Args:
        enabled: False for ``--json`` (and anything else that wants silence).
        console: A ``rich.console.Console`` to draw on (default: stderr).
        min_bytes: Passes over fewer bytes get no bar.

    Example:
        >>> with progress_callback(enabled=not as_json) as progress:
        ...     result = datastats.dataset_stats(paths, progress=progress)
    """
    if not enabled:
        yield None
        return
    from rich.console import Console

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    class Amount(ProgressColumn):
        """Bytes for a pass, ``n/m`` for the files task."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes, self.count, self.speed = DownloadColumn(binary_units=True), MofNCompleteColumn(), \
                TransferSpeedColumn()

        def render(self, task: Any) -> Any:
            if task.fields.get("files"):
                return self.count.render(task)
            from rich.table import Table

            both = Table.grid(padding=(0, 1))
            both.add_row(self.bytes.render(task), self.speed.render(task))
            return both

    bar = Progress(TextColumn("{task.description}"), BarColumn(), Amount(), TimeRemainingColumn(), console=console)
    tasks: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        kind, _, current = task.partition(": ")
        if kind == "files":
            if "files" not in tasks:
                tasks["files"] = bar.add_task(task, total=total, files=True)
            bar.update(tasks["files"], completed=done, total=total, description=f"files {current}")
            return
        if total < min_bytes:
            return
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total)
        bar.update(tasks[task], completed=done, total=total)

    with bar:
        yield update
