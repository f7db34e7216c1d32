"""Streaming machinery and the two-pass out-of-core ``normalize``, for files bigger than memory.

The data flows file -> :mod:`bncli.io` (chunked reads) -> :mod:`bncli.moments` /
:class:`~bncli.engine.BatchNormEngine` (one chunk at a time) -> :class:`bncli.io.NpyWriter`
-> file, so peak memory is a few chunks whatever the file size. Chunk work runs on a small
thread pool (NumPy and torch release the GIL) and results are consumed in file order, so
the output does not depend on the number of threads. :mod:`bncli.datastats` (``bncli
stats``) uses the same machinery.

No typer, no rich, no printing: progress goes to a callback. torch is imported only
inside :func:`normalize_streamed`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from bncli import io
from bncli.errors import InputError, OutputError
from bncli.moments import Moments, block_moments, estimate_shift

if TYPE_CHECKING:
    import torch

    from bncli.core import EngineOptions, GivenStats, LayerEngine, NormalizePlan, NormalizeResult

#: Default chunk size: 8 MiB keeps the handful of chunks in flight far inside a 512 MB
#: budget (next to ~220 MB for torch itself) and makes per-chunk overhead negligible.
DEFAULT_CHUNK_BYTES = 8 << 20
#: ``--out-of-core`` is chosen automatically for .npy inputs at least this big ...
AUTO_MIN_BYTES = 256 << 20
#: ... or when the in-memory path (input, float64 copies for the report, output: about
#: this many times the file) would not fit in the memory available.
IN_MEMORY_PEAK_FACTOR = 6

#: ``progress(task, done_bytes, total_bytes)``; ``task`` names the pass.
ProgressFn = Callable[[str, int, int], None]

T = TypeVar("T")
R = TypeVar("R")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"16M"``, ``"16MiB"``, ``"1.5G"``, ``"65536"`` -> bytes (K/M/G/T are powers of 1024).

    Raises:
        ValueError: Not a size, or smaller than one byte.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size; use e.g. 16M, 256MiB, 1G or a number of bytes.")
    value = float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " ")
    if not np.isfinite(value):  # "9" * 400 parses as a float, then as infinity
        raise ValueError(f"{text[:40]!r}{'...' if len(text) > 40 else ''} is too large a size.")
    if value < 1:
        raise ValueError(f"{text!r} is less than one byte.")
    return int(value)


def default_workers() -> int:
    """Threads for chunk work: the usable cores, at most 4 (each holds a chunk in memory)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                 initializer: Callable[[], object] | None = None) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in input order, a bounded number in flight.

    At most ``workers + 1`` items are submitted ahead of the one being consumed, so the
    memory held is a few chunks, not the file. ``initializer`` runs once in each thread.
    """
    if workers <= 1:
        if initializer:
            initializer()
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bncli-chunk", initializer=initializer)
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # On an error or Ctrl-C: drop queued chunks, let running ones finish (short).
        pool.shutdown(wait=True, cancel_futures=True)


def shifted(items: Iterator[T], block_of: Callable[[T], np.ndarray], layout: str
             ) -> tuple[np.ndarray | None, Iterator[T]]:
    """Peek at the stream for the first non-empty block; return its shift and the whole stream.

    Every chunk is then centred on this one shift (see :mod:`bncli.moments`), decided
    before any work is handed to the pool, so the result does not depend on threads.
    """
    seen: list[T] = []
    shift = None
    for item in items:
        seen.append(item)
        if block_of(item).size:
            shift = estimate_shift(block_of(item), layout)
            break
    return shift, itertools.chain(seen, items)


# -- out-of-core normalize -----------------------------------------------------------------
def streamable(path: Path, output: Path, key: str | None = None) -> tuple[io.RawTensor | None, str, str]:
    """Whether ``normalize`` can stream ``path`` to ``output``; if not, why and the fix.

    Returns:
        ``(raw, "", "")`` when it can; ``(None, reason, hint)`` when it cannot.
    """
    path, output = Path(path), Path(output)
    if path.suffix.lower() != ".npy":
        return None, (f"{path} is not a .npy file; out-of-core normalize streams .npy inputs "
                      "(.npz and .pt have no random access)"), \
            "Use --in-memory, or save the tensor as .npy first (np.save('x.npy', x))."
    if output.suffix.lower() != ".npy":
        return None, f"the output {output} is not a .npy file; out-of-core normalize writes .npy", \
            "Write a .npy (-o OUT.npy), or use --in-memory for other formats."
    if key:
        return None, "--key does not apply to a .npy file", "Drop --key."
    raw = io.raw_tensor(path)
    if raw is None:  # pragma: no cover - .npy always has a raw layout
        return None, f"{path} has no random access", "Use --in-memory."
    if raw.fortran_order:
        return None, (f"{path} is stored in Fortran (column-major) order, so its samples are "
                      "not contiguous rows"), \
            ("Use --in-memory, or re-save it in C order: "
             "np.save('c.npy', np.ascontiguousarray(np.load('x.npy', mmap_mode='r'))).")
    return raw, "", ""


def use_out_of_core(path: Path, output: Path, *, key: str | None = None, execution: str = "auto") -> bool:
    """Pick the execution path of ``normalize``.

    ``auto`` streams a C-order ``.npy`` (to a ``.npy``) when it is at least
    :data:`AUTO_MIN_BYTES`, or when the in-memory path would not fit the available memory;
    anything else goes in memory (where invalid inputs get their full diagnosis).

    Raises:
        InputError: ``execution="out-of-core"`` but the input/output cannot be streamed.
    """
    if execution == "in-memory":
        return False
    raw, why, hint = streamable(path, output, key)
    if execution == "out-of-core":
        if raw is None:
            cls = OutputError if why.startswith("the output") else InputError
            raise cls(f"Cannot normalize out of core: {why}.", hint=hint)
        return True
    if raw is None:
        return False
    available = io.available_memory()
    return raw.nbytes >= AUTO_MIN_BYTES or (available is not None
                                            and raw.nbytes * IN_MEMORY_PEAK_FACTOR > available)


def normalize_streamed(path: Path, output: Path, *, key: str | None = None, mode: str = "train",
                       layout: str = "nchw", opts: EngineOptions | None = None, force: bool = False,
                       save_state: Path | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       progress: ProgressFn | None = None, workers: int | None = None,
                       on_start: Callable[[NormalizePlan], None] | None = None,
                       engines: LayerEngine | None = None, stats: GivenStats | None = None,
                       protect: Sequence[Path] = ()) -> NormalizeResult:
    """Normalize a ``.npy`` too big for memory, as ``nn.BatchNorm2d`` would, in two passes.

    Pass 1 computes the exact per-channel batch mean and biased variance of the whole
    file (:mod:`bncli.moments`); pass 2 normalizes each chunk with them through
    :meth:`BatchNormEngine.apply_with_stats` and writes it into a pre-sized ``.npy``; in
    train mode :meth:`BatchNormEngine.update_running_stats` then makes the one running-stat
    update of a single train step. Eval mode with running statistics needs one pass.
    The output equals the in-memory path to float32 rounding and appears atomically.

    The report's "after" statistics are derived from the exact input statistics and the
    affine map the chunks went through (``y = a * x + b`` per channel), not re-measured.
    The output and ``save_state`` are committed together, or neither; ``on_start`` gets
    the plan before the first pass. ``engines``, ``stats`` and ``protect`` are those of
    :func:`bncli.core.normalize_tensors` (given ``stats``: one pass, no running-stat update).

    Raises:
        InputError, OutputError: The input/output cannot be streamed (see :func:`streamable`),
            or the output exists (without ``force``) or does not fit on the disk.
        ShapeError, DTypeError, StateError: As for the in-memory ``normalize``.
    """
    import torch

    from bncli import core
    from bncli.engine import validate_input

    path, output = Path(path), Path(output)
    opts = opts or core.EngineOptions()
    raw, why, hint = streamable(path, output, key)
    if raw is None:
        raise InputError(f"Cannot normalize out of core: {why}.", hint=hint)
    core.check_destinations([*protect, path], output, save_state, force=force)
    # A huge file with the wrong shape or dtype is refused from its header, before any work.
    core.refuse_invalid(raw.shape, raw.dtype.name, mode="eval" if stats is not None else mode, layout=layout,
                        num_features=opts.num_features, where=raw.path)
    dtype = getattr(torch, raw.dtype.name)
    axis = 3 if layout == "nhwc" else 1
    engine, source = (engines or core.LayerEngine(opts)).get(data_channels=raw.shape[axis], data_dtype=dtype)
    channels = engine.config.num_features
    batch_stats = stats is None and (mode == "train" or not engine.config.track_running_stats)
    # Batch statistics need more than one value per channel, as in train mode.
    validate_input(raw.shape, dtype, channels, "train" if batch_stats else "eval", layout)
    count = int(np.prod(raw.shape, dtype=np.int64)) // channels
    workers = workers or default_workers()
    passes = 2 if batch_stats else 1

    def blocks() -> Iterator[np.ndarray]:
        return io.iter_chunks(path, max_bytes=chunk_bytes)

    def tick(task: str, done: int) -> None:
        if progress:
            progress(task, done, raw.nbytes)

    execution = {"path": "out-of-core", "passes": passes, "chunk_bytes": chunk_bytes,
                 "workers": workers, "after_statistics": "derived"}
    plan = core.NormalizePlan(input=path, output=output, key=None, shape=raw.shape, dtype=raw.dtype.name,
                              mode=mode, layout=layout, device=str(engine.device), source=source,
                              state_path=save_state, execution=execution,
                              statistics=core.statistics_kind(mode, opts, stats))
    if on_start is not None:
        on_start(plan)
    threads = torch.get_num_threads()

    def one_thread() -> None:
        # Chunks already run in parallel on our pool. torch's intra-op (OpenMP) threads on
        # top would oversubscribe the cores, and OpenMP's spin-waiting turns that into a
        # 5-10x slowdown. The setting is per thread, hence in each worker too.
        torch.set_num_threads(1)

    before = Moments.empty(channels)
    # The statistics the chunks are normalized with, set by the pass that computes them.
    mean_t = var_t = torch.empty(0)

    def write_output(group: io.AtomicGroup) -> None:
        nonlocal mean_t, var_t
        tmp = group.path(output)
        if batch_stats:
            task = "pass 1/2 statistics"
            tick(task, 0)
            done = 0
            shift, items = shifted(blocks(), lambda b: b, layout)
            for part in ordered_map(lambda b: block_moments(b, layout, extrema=False, shift=shift),
                                     items, workers, one_thread):
                before.merge(part)
                done += part.count * channels * raw.dtype.itemsize
                tick(task, done)
            mean64, var64 = before.mean, before.var
        elif stats is not None:
            mean64, var64 = stats[0].double().numpy(), stats[1].double().numpy()
        else:
            assert engine.module.running_mean is not None and engine.module.running_var is not None
            mean64 = engine.module.running_mean.detach().cpu().double().numpy()
            var64 = engine.module.running_var.detach().cpu().double().numpy()
        mean_t, var_t = torch.from_numpy(mean64), torch.from_numpy(var64)
        task = f"pass {passes}/{passes} normalize"
        tick(task, 0)
        # The blocks come in native byte order (read_rows), so the output is written so.
        with io.NpyWriter(tmp, raw.shape, raw.dtype.newbyteorder("=")) as writer:
            _apply_pass(engine, blocks(), writer, mean_t, var_t, layout,
                        None if batch_stats else before, workers, lambda done: tick(task, done))
        if mode == "train" and stats is None:
            engine.update_running_stats(mean_t, var_t, count)

    one_thread()
    try:
        core.commit_outputs([*protect, path], write_output, engine.state_dict, save_state, force=force)
    finally:
        torch.set_num_threads(threads)
    state = engine.state_dict()
    mean64, var64 = mean_t.numpy(), var_t.numpy()
    mean_a, std_a = _after_moments(engine, before, mean64, var64)
    return core.NormalizeResult(**vars(plan), mean_before=before.mean, std_before=before.std,
                                mean_after=mean_a, std_after=std_a, state=state)


def _apply_pass(engine: Any, blocks: Iterator[np.ndarray], writer: io.NpyWriter, mean: torch.Tensor,
                var: torch.Tensor, layout: str, stats: Moments | None, workers: int,
                tick: Callable[[int], None]) -> None:
    """Normalize and write each chunk in order; fold its statistics into ``stats`` if given.

    Three things overlap: this thread reads and applies (a few GB/s), one writer thread
    writes the previous chunk, and when ``stats`` is wanted a pool computes the NumPy
    statistics, the slow part. The apply stays on this thread so that its output
    buffers are all allocated from one glibc arena: with the apply on a pool, chunk-sized
    blocks spread over one arena per thread (measured: +20 chunks of peak RSS).
    """
    import torch

    shift = None
    stat_jobs: deque[Future[Moments]] = deque()
    write_jobs: deque[tuple[Future[None], int]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bncli-stats") if stats and workers > 1 else None
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="bncli-write")
    done = 0
    try:
        for block in blocks:
            if stats is not None:
                if shift is None and block.size:
                    shift = estimate_shift(block, layout)
                if pool is not None:
                    stat_jobs.append(pool.submit(block_moments, block, layout, extrema=False, shift=shift))
                else:
                    stats.merge(block_moments(block, layout, extrema=False, shift=shift))
            y = engine.apply_with_stats(torch.from_numpy(block), mean, var, layout=layout)
            out = np.ascontiguousarray(y.detach().cpu().numpy())
            write_jobs.append((write_pool.submit(writer.write, out), out.nbytes))
            del y, out
            while len(stat_jobs) > workers:
                stats.merge(stat_jobs.popleft().result())  # type: ignore[union-attr]
            while len(write_jobs) > 1:  # one chunk being written while the next is computed
                job, nbytes = write_jobs.popleft()
                job.result()
                done += nbytes
                tick(done)
        while write_jobs:
            job, nbytes = write_jobs.popleft()
            job.result()
            done += nbytes
            tick(done)
        while stat_jobs:
            stats.merge(stat_jobs.popleft().result())  # type: ignore[union-attr]
    finally:
        for p in (pool, write_pool):
            if p is not None:
                p.shutdown(wait=True, cancel_futures=True)


def _after_moments(engine: Any, before: Moments, mean: np.ndarray, var: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``y = (x - mean) / sqrt(var + eps) * weight + bias`` from those of x."""
    m = engine.module
    weight = m.weight.detach().cpu().double().numpy() if m.weight is not None else 1.0
    bias = m.bias.detach().cpu().double().numpy() if m.bias is not None else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        a = weight / np.sqrt(var + engine.config.eps)
        return a * (before.mean - mean) + bias, np.abs(a) * before.std
