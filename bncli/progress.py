"""Progress bars on stderr for passes over large files.

The core never prints; it calls ``progress(task, done_bytes, total_bytes)``
(:data:`bncli.outofcore.ProgressFn`). This module turns those calls into a rich bar
per pass (bytes, rate, ETA) on stderr, or into nothing when stderr is not a terminal
or the output is ``--json``, so pipes and logs stay clean.
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
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn(), console=console)
    tasks: dict[str, Any] = {}

    def update(task: str, done: int, total: int) -> None:
        if total < min_bytes:
            return
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total)
        bar.update(tasks[task], completed=done)

    with bar:
        yield update
