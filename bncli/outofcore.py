"""Streamed work on tensor files bigger than memory: exact dataset statistics and the
two-pass out-of-core ``normalize``.

The data flows file -> :mod:`bncli.io` (chunked reads) -> :mod:`bncli.moments` /
:class:`~bncli.engine.BatchNormEngine` (one chunk at a time) -> :class:`bncli.io.NpyWriter`
-> file, so peak memory is a few chunks whatever the file size. Chunks are processed
by a small thread pool (NumPy and torch release the GIL) and their results are consumed
in file order, so the output does not depend on the number of threads.

No typer, no rich, no printing: progress goes to a callback, notes come back as data.
torch is imported only by the normalize path and ``--save-state``.
"""

from __future__ import annotations

import itertools
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from bncli import io
from bncli.errors import DTypeError, InputError, OutputError, ShapeError, StateError
from bncli.moments import Moments, block_moments, estimate_shift

if TYPE_CHECKING:
    import torch

    from bncli.core import EngineOptions, NormalizeResult

#: Default chunk size: 16 MiB keeps a handful of chunks in flight well inside the memory
#: budget, and large enough that per-chunk overhead is negligible.
DEFAULT_CHUNK_BYTES = 16 << 20
#: ``--out-of-core`` is chosen automatically for .npy inputs at least this big ...
AUTO_MIN_BYTES = 256 << 20
#: ... or when the in-memory path (input, float64 copies for the report, output: about
#: this many times the file) would not fit in the memory available.
IN_MEMORY_PEAK_FACTOR = 6
EXECUTIONS = ("auto", "in-memory", "out-of-core")

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


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in input order, a bounded number in flight.

    At most ``workers + 1`` items are submitted ahead of the one being consumed, so the
    memory held is a few chunks, not the file.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bncli-chunk")
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


def _shifted(items: Iterator[T], block_of: Callable[[T], np.ndarray], layout: str
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


def _axis_name(layout: str) -> str:
    return "last axis (NHWC)" if layout == "nhwc" else "axis 1 (NCHW)"


# -- bncli stats ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One input of ``stats``."""

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    fortran_order: bool = False


@dataclass
class StatsResult:
    """Exact per-channel statistics of one or more files, as data.

    Attributes:
        inputs: The shards, in order.
        layout: ``nchw`` or ``nhwc``.
        scale: The values were divided by this (``--scale``); 1 when not.
        moments: The statistics (already divided by ``scale``).
        chunk_bytes: The chunk size used.
        notes: Warnings for the user (non-finite values, raw integer data ...).
    """

    inputs: list[Shard]
    layout: str
    scale: float
    moments: Moments
    chunk_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.inputs)

    def normalize_line(self, digits: int = 6) -> str | None:
        """``transforms.Normalize(mean=[...], std=[...])`` with the biased std; None if not finite."""
        mean, std = self.moments.mean, self.moments.std
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            return None
        fmt = ", ".join
        return (f"transforms.Normalize(mean=[{fmt(f'{v:.{digits}g}' for v in mean)}], "
                f"std=[{fmt(f'{v:.{digits}g}' for v in std)}])")


_STATS_KINDS = "fiu"  # float, signed and unsigned integers (bool and complex are refused)


def _stats_shard(path: Path, key: str | None, layout: str) -> Shard:
    if path.suffix.lower() == ".npy":
        key = None  # --key names the tensor inside containers; a .npy shard has just one
    info = io.peek(path, key)
    shape = tuple(info.shape)
    if len(shape) != 4:
        raise ShapeError(
            f"{path}: per-channel statistics need a 4D (N, C, H, W) input "
            f"(or (N, H, W, C) with --layout nhwc), got {len(shape)}D shape {shape}.",
            hint="Run `bncli check-shape FILE` for what this shape is; "
                 "save a single (C, H, W) image as x[None].")
    if info.dtype == "bfloat16":
        itemsize = 2
    else:
        try:
            dt = np.dtype(info.dtype)
        except TypeError:
            dt = np.dtype(object)
        if dt.kind not in _STATS_KINDS:
            raise DTypeError(f"{path}: cannot compute statistics of dtype {info.dtype}.",
                             hint="Use real numbers: floating point or integer data.")
        itemsize = dt.itemsize
    raw = io.raw_tensor(path, key)
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    return Shard(path, info.key, shape, info.dtype, nbytes, bool(raw and raw.fortran_order))


def dataset_stats(paths: Sequence[Path], *, key: str | None = None, layout: str = "nchw",
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, scale: float = 1.0,
                  progress: ProgressFn | None = None, workers: int | None = None) -> StatsResult:
    """Exact per-channel statistics over every value of one or more files.

    Each file is read a chunk at a time (see :func:`bncli.io.iter_chunks`); the result
    equals a float64 two-pass computation over the concatenation of all files to about
    1e-12 relative, whatever ``chunk_bytes`` and ``workers``.

    Args:
        paths: Files with the same channel count (any mix of supported formats); shapes
            may otherwise differ.
        key: Tensor name inside containers that hold several (ignored for ``.npy`` shards).
        layout: ``nchw`` or ``nhwc``.
        chunk_bytes: Bytes read per chunk (as stored).
        scale: Divide every value by this, e.g. 255 for uint8 images.
        progress: Called as ``progress("statistics", done_bytes, total_bytes)``.
        workers: Threads (default :func:`default_workers`).

    Returns:
        The statistics, the inputs and notes for the user.

    Raises:
        ShapeError: A file is not 4D, the channel counts differ, or there are no values.
        DTypeError: A file holds booleans, complex numbers or strings.
        InputError, UnsafeFileError, KeyChoiceError: A file cannot be read safely.
    """
    if not paths:
        raise InputError("No input files.", hint="Pass one or more tensor files.")
    if not (scale > 0 and np.isfinite(scale)):
        raise StateError(f"scale must be a positive number, got {scale}.", hint="E.g. --scale 255.")
    axis = 3 if layout == "nhwc" else 1
    # Read every header before any data: a bad shard at the end fails in a second.
    shards = [_stats_shard(Path(p), key, layout) for p in paths]
    channels = shards[0].shape[axis]
    for s in shards[1:]:
        if s.shape[axis] != channels:
            raise ShapeError(
                f"{s.path}: has {s.shape[axis]} channels on its {_axis_name(layout)} (shape {s.shape}), "
                f"but {shards[0].path} has {channels} (shape {shards[0].shape}).",
                hint="All inputs must have the same channel count; check the file list and --layout.")
    total = sum(s.nbytes for s in shards)

    def chunks() -> Iterator[tuple[np.ndarray, int]]:
        for s in shards:
            for block in io.iter_chunks(s.path, s.key, max_bytes=chunk_bytes):
                yield block, block.size * s.nbytes // max(int(np.prod(s.shape, dtype=np.int64)), 1)

    shift, items = _shifted(chunks(), lambda item: item[0], layout)

    def work(item: tuple[np.ndarray, int]) -> tuple[Moments, int]:
        return block_moments(item[0], layout, shift=shift), item[1]

    acc = Moments.empty(channels)
    done = 0
    if progress:
        progress("statistics", 0, total)
    for part, nbytes in _ordered_map(work, items, workers or default_workers()):
        acc.merge(part)
        done += nbytes
        if progress:
            progress("statistics", done, total)
    if acc.count == 0:
        raise ShapeError("The inputs hold no values (every file has a zero-size axis).",
                         hint="Check how the files were written.")
    result = StatsResult(shards, layout, float(scale), acc.scaled(scale), chunk_bytes)
    result.notes = _stats_notes(result)
    return result


def _stats_notes(r: StatsResult) -> list[str]:
    notes = []
    bad = r.moments.non_finite
    if bad.any():
        chans = ", ".join(str(i) for i in np.flatnonzero(bad)[:10])
        notes.append(f"{int(bad.sum())} values are NaN or Inf (channels {chans}); the mean and "
                     "variance of those channels are not finite, as BatchNorm2d's would be. "
                     "min and max ignore NaN.")
    ints = [s for s in r.inputs if np.dtype(s.dtype if s.dtype != "bfloat16" else "f4").kind in "iu"]
    if ints and r.scale == 1.0:
        notes.append(f"{ints[0].path} holds {ints[0].dtype} values, reported as they are; for images "
                     "fed through transforms.ToTensor() (which divides by 255), pass --scale 255.")
    for s in r.inputs:
        if s.fortran_order:
            notes.append(f"{s.path} is stored in Fortran (column-major) order and was read through "
                         "a memory map: resident memory may grow with the file (the pages stay "
                         "reclaimable). Re-save it in C order for bounded memory.")
    return notes


def stats_state_dict(result: StatsResult) -> dict[str, torch.Tensor]:
    """A ``BatchNorm2d`` state_dict holding the exact dataset statistics.

    It is exactly the state of a fresh ``nn.BatchNorm2d(C, momentum=None)`` after one
    train step over the whole dataset as one batch: ``running_mean`` = mean,
    ``running_var`` = the unbiased variance (as PyTorch stores it), ``num_batches_tracked``
    = 1, weight 1 and bias 0; float32, PyTorch's default.
    """
    import torch

    from bncli.engine import BatchNormConfig, BatchNormEngine

    m = result.moments
    engine = BatchNormEngine(BatchNormConfig(m.channels, momentum=None))
    engine.update_running_stats(torch.from_numpy(m.mean), torch.from_numpy(m.var), m.count)
    return engine.state_dict()


def save_stats_state(result: StatsResult, dest: Path, *, force: bool = False) -> None:
    """Write :func:`stats_state_dict` as ``.pt`` or ``.safetensors``, atomically."""
    io.save_state_dict(stats_state_dict(result), Path(dest), force=force,
                       protect=[s.path for s in result.inputs])


# -- out-of-core normalize -----------------------------------------------------------------
def streamable(path: Path, output: Path, key: str | None = None) -> tuple[io.RawTensor | None, str]:
    """Whether ``normalize`` can stream ``path`` to ``output``, and if not, why.

    Returns:
        ``(raw, "")`` when it can; ``(None, reason)`` when it cannot.
    """
    path, output = Path(path), Path(output)
    if path.suffix.lower() != ".npy":
        return None, (f"{path} is not a .npy file; out-of-core normalize streams .npy inputs "
                      "(.npz and .pt have no random access)")
    if output.suffix.lower() != ".npy":
        return None, f"the output {output} is not a .npy file; out-of-core normalize writes .npy"
    if key:
        return None, "--key does not apply to a .npy file"
    raw = io.raw_tensor(path)
    if raw is None:  # pragma: no cover - .npy always has a raw layout
        return None, f"{path} has no random access"
    if raw.fortran_order:
        return None, (f"{path} is stored in Fortran (column-major) order, so its samples are "
                      "not contiguous rows")
    return raw, ""


def _refuse_invalid(raw: io.RawTensor, *, mode: str, layout: str, num_features: int | None) -> None:
    """The check-shape diagnosis of an input the engine cannot take, from its header alone."""
    from bncli.diagnose import check_shape

    errors = [f for f in check_shape(raw.shape, raw.dtype.name, num_features=num_features, mode=mode,
                                     layout=layout) if f.severity == "error"]
    if errors:
        cls = DTypeError if errors[0].code == "not_float" else ShapeError
        raise cls(f"{raw.path}: {errors[0].message}", hint=errors[0].hint)


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
    raw, why = streamable(path, output, key)
    if execution == "out-of-core":
        if raw is None:
            cls = OutputError if "output" in why else InputError
            raise cls(f"Cannot normalize out of core: {why}.",
                      hint="Use --in-memory, or convert: np.save('x.npy', np.ascontiguousarray(x)) "
                           "and write the output with -o out.npy.")
        return True
    if raw is None:
        return False
    available = io.available_memory()
    return raw.nbytes >= AUTO_MIN_BYTES or (available is not None
                                            and raw.nbytes * IN_MEMORY_PEAK_FACTOR > available)


def normalize_streamed(path: Path, output: Path, *, key: str | None = None, mode: str = "train",
                       layout: str = "nchw", opts: EngineOptions | None = None, force: bool = False,
                       save_state: Path | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       progress: ProgressFn | None = None, workers: int | None = None) -> NormalizeResult:
    """Normalize a ``.npy`` too big for memory, as ``nn.BatchNorm2d`` would, in two passes.

    Pass 1 computes the exact per-channel batch mean and biased variance of the whole
    file (:mod:`bncli.moments`); pass 2 normalizes each chunk with them through
    :meth:`BatchNormEngine.apply_with_stats` and writes it into a pre-sized ``.npy``; in
    train mode :meth:`BatchNormEngine.update_running_stats` then makes the one running-stat
    update of a single train step. Eval mode with running statistics needs one pass.
    The output equals the in-memory path to float32 rounding and appears atomically.

    The report's "after" statistics are derived from the exact input statistics and the
    affine map the chunks went through (``y = a * x + b`` per channel), not re-measured.

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
    raw, why = streamable(path, output, key)
    if raw is None:
        raise InputError(f"Cannot normalize out of core: {why}.", hint="Use --in-memory.")
    io.check_output(output, force=force, protect=[path])
    if save_state is not None:
        io.check_output(save_state, force=force, protect=[path, output], allowed=io.STATE_SUFFIXES)
        if Path(save_state).resolve() == output.resolve():
            raise StateError("--save-state and the output are the same file.", hint="Give them different names.")
    # A huge file with the wrong shape or dtype is refused from its header, before any work.
    _refuse_invalid(raw, mode=mode, layout=layout, num_features=opts.num_features)
    dtype = getattr(torch, raw.dtype.name)
    axis = 3 if layout == "nhwc" else 1
    engine, source = core.build_engine(opts, data_channels=raw.shape[axis], data_dtype=dtype)
    channels = engine.config.num_features
    batch_stats = mode == "train" or not engine.config.track_running_stats
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

    threads = torch.get_num_threads()
    # Chunks run in parallel on our pool; torch's own intra-op threads on top of it would
    # only fight over the same cores (measured: slower than one thread per chunk).
    torch.set_num_threads(1)
    try:
        with io.atomic_output(output, force=force, protect=[path]) as tmp:
            before = Moments.empty(channels)
            if batch_stats:
                task = "pass 1/2 statistics"
                tick(task, 0)
                done = 0
                shift, items = _shifted(blocks(), lambda b: b, layout)
                for part in _ordered_map(lambda b: block_moments(b, layout, extrema=False, shift=shift),
                                         items, workers):
                    before.merge(part)
                    done += part.count * channels * raw.dtype.itemsize
                    tick(task, done)
                mean64, var64 = before.mean, before.var
            else:
                assert engine.module.running_mean is not None and engine.module.running_var is not None
                mean64 = engine.module.running_mean.detach().cpu().double().numpy()
                var64 = engine.module.running_var.detach().cpu().double().numpy()
            mean_t, var_t = torch.from_numpy(mean64), torch.from_numpy(var64)

            shift, items = _shifted(blocks(), lambda b: b, layout)

            # The engine's parameters already have the data's dtype (build_engine), so the
            # concurrent apply_with_stats calls below only read shared state.
            def apply(block: np.ndarray) -> tuple[np.ndarray, Moments | None]:
                y = engine.apply_with_stats(torch.from_numpy(block), mean_t, var_t, layout=layout)
                part = None if batch_stats else block_moments(block, layout, extrema=False, shift=shift)
                return np.ascontiguousarray(y.detach().cpu().numpy()), part

            task = f"pass {passes}/{passes} normalize"
            tick(task, 0)
            done = 0
            with io.NpyWriter(tmp, raw.shape, raw.dtype) as writer:
                for y, part in _ordered_map(apply, items, workers):
                    writer.write(y)
                    if part is not None:
                        before.merge(part)
                    done += y.nbytes
                    tick(task, done)
    finally:
        torch.set_num_threads(threads)
    if mode == "train":
        engine.update_running_stats(mean_t, var_t, count)
    state = engine.state_dict()
    if save_state is not None:
        io.save_state_dict(state, save_state, force=force, protect=[path, output])
    mean_a, std_a = _after_moments(engine, before, mean64, var64)
    result = core.NormalizeResult(
        path, output, None, raw.shape, raw.dtype.name, mode, layout, str(engine.device), source,
        before.mean, before.std, mean_a, std_a, state, save_state)
    result.execution = {"path": "out-of-core", "passes": passes, "chunk_bytes": chunk_bytes,
                        "workers": workers, "after_statistics": "derived"}
    return result


def _after_moments(engine: Any, before: Moments, mean: np.ndarray, var: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of ``y = (x - mean) / sqrt(var + eps) * weight + bias`` from those of x."""
    m = engine.module
    weight = m.weight.detach().cpu().double().numpy() if m.weight is not None else 1.0
    bias = m.bias.detach().cpu().double().numpy() if m.bias is not None else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        a = weight / np.sqrt(var + engine.config.eps)
        return a * (before.mean - mean) + bias, np.abs(a) * before.std
