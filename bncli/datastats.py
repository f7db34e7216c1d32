"""Exact per-channel statistics of a dataset on disk (``bncli stats``), in bounded memory.

Files are read a chunk at a time (:func:`bncli.io.iter_chunks`), statistics come from
:mod:`bncli.moments`, chunks run on the pool of :mod:`bncli.outofcore`. The result
can become a ``BatchNorm2d`` state_dict for ``normalize --mode eval --state``.

No typer, no rich, no printing; torch only for :func:`stats_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bncli import io
from bncli.diagnose import not_4d
from bncli.errors import DTypeError, InputError, ShapeError, StateError
from bncli.moments import Moments, block_moments
from bncli.outofcore import DEFAULT_CHUNK_BYTES, ProgressFn, default_workers, ordered_map, shifted
from bncli.wording import plural, verb

if TYPE_CHECKING:
    import torch


def _axis_name(layout: str) -> str:
    return "last axis (NHWC)" if layout == "nhwc" else "axis 1 (NCHW)"


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
        # The same diagnosis as check-shape and normalize: the rule, then what the shape looks like.
        finding = not_4d(shape)
        raise ShapeError(f"{path}: {finding.message}", hint=finding.hint)
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
                f"{s.path}: has {plural(s.shape[axis], 'channel')} on its {_axis_name(layout)} (shape {s.shape}), "
                f"but {shards[0].path} has {channels} (shape {shards[0].shape}).",
                hint="All inputs must have the same channel count; check the file list and --layout.")
    total = sum(s.nbytes for s in shards)

    def chunks() -> Iterator[tuple[np.ndarray, int]]:
        for s in shards:
            for block in io.iter_chunks(s.path, s.key, max_bytes=chunk_bytes):
                yield block, block.size * s.nbytes // max(int(np.prod(s.shape, dtype=np.int64)), 1)

    shift, items = shifted(chunks(), lambda item: item[0], layout)

    def work(item: tuple[np.ndarray, int]) -> tuple[Moments, int]:
        return block_moments(item[0], layout, shift=shift), item[1]

    acc = Moments.empty(channels)
    done = 0
    if progress:
        progress("statistics", 0, total)
    for part, nbytes in ordered_map(work, items, workers or default_workers()):
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
        notes.append(f"{plural(int(bad.sum()), 'value')} {verb(int(bad.sum()), 'is', 'are')} NaN or Inf "
                     f"({plural(int((bad > 0).sum()), 'channel')}: {chans}); the mean and "
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
