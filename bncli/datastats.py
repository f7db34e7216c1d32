"""Exact per-channel statistics of a dataset on disk (``bncli stats``), in bounded memory.

Files are read a chunk at a time (:func:`bncli.io.iter_chunks`), statistics come from
:mod:`bncli.moments`, chunks run on the pool of :mod:`bncli.outofcore`. The result
can become a ``BatchNorm2d`` state_dict for ``normalize --mode eval --state``.

No typer, no rich, no printing; torch only for :func:`stats_state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bncli import io
from bncli.diagnose import Finding, check_shape
from bncli.distributed import LOCAL, World, split_contiguous
from bncli.errors import DTypeError, InputError, ShapeError, StateError
from bncli.moments import Moments, block_moments, estimate_shift, merge_pairwise
from bncli.outofcore import DEFAULT_CHUNK_BYTES, ProgressFn, default_workers, ordered_map
from bncli.wording import plural, verb

if TYPE_CHECKING:
    import torch

PathsArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def _axis_name(layout: str) -> str:
    return "last axis (NHWC)" if layout == "nhwc" else "axis 1 (NCHW)"


def _kind(dtype: str) -> str:
    """NumPy kind letter of a dtype name (bfloat16 is a float NumPy cannot name)."""
    if dtype == "bfloat16":
        return "f"
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "O"


@dataclass(frozen=True)
class Shard:
    """One input of ``stats``.

    Attributes:
        path: The file.
        key: The tensor's key inside a container (None for a .npy).
        shape: Its shape as stored.
        dtype: Its dtype name.
        nbytes: Bytes of its values.
        fortran_order: A column-major .npy (read through a memory map).
        scale: Its values were divided by this (``--scale``: integer inputs only).
        findings: ``check-shape`` warnings about it (e.g. ``channels_last``).
    """

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    fortran_order: bool = False
    scale: float = 1.0
    findings: tuple[Finding, ...] = ()

    @property
    def is_integer(self) -> bool:
        return _kind(self.dtype) in "iu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``stats --json`` ``inputs[]``; also how ranks exchange headers)."""
        return {"path": str(self.path), "key": self.key, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes, "scale": self.scale, "fortran_order": self.fortran_order,
                "findings": [asdict(f) for f in self.findings]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shard:
        return cls(Path(d["path"]), d["key"], tuple(d["shape"]), d["dtype"], int(d["bytes"]),
                   bool(d["fortran_order"]), float(d["scale"]), tuple(Finding(**f) for f in d["findings"]))


def finite_floats(values: np.ndarray) -> list[float | None]:
    """Values as floats for JSON, NaN/Inf as None."""
    return [float(v) if np.isfinite(v) else None for v in values]


@dataclass
class StatsResult:
    """Exact per-channel statistics of one or more files, as data.

    ``mean``, ``var``, ``std`` (biased, what BatchNorm2d normalizes with), ``var_unbiased``
    (what it stores in ``running_var``), ``count`` and ``channels`` read through to
    :attr:`moments`.

    Attributes:
        inputs: The shards, in order.
        layout: ``nchw`` or ``nhwc``.
        scale: The ``--scale`` divisor asked for (applied to integer inputs only; each
            shard says what it got).
        moments: The statistics (already scaled).
        chunk_bytes: The chunk size used.
        notes: Warnings for the user (channels-last shapes, raw integer data, NaN ...).
        ranks: Processes that shared the pass (torch.distributed world size; 1 when alone).
    """

    inputs: list[Shard]
    layout: str
    scale: float
    moments: Moments
    chunk_bytes: int
    notes: list[str] = field(default_factory=list)
    ranks: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.inputs)

    @property
    def count(self) -> int:
        """Values per channel."""
        return self.moments.count

    @property
    def channels(self) -> int:
        return self.moments.channels

    @property
    def mean(self) -> np.ndarray:
        return self.moments.mean

    @property
    def var(self) -> np.ndarray:
        return self.moments.var

    @property
    def std(self) -> np.ndarray:
        return self.moments.std

    @property
    def var_unbiased(self) -> np.ndarray:
        return self.moments.var_unbiased

    @property
    def minimum(self) -> np.ndarray:
        """Per-channel minimum ignoring NaN; NaN for a channel that holds nothing but NaN."""
        return self._extreme(self.moments.minimum)

    @property
    def maximum(self) -> np.ndarray:
        """Per-channel maximum ignoring NaN; NaN for a channel that holds nothing but NaN."""
        return self._extreme(self.moments.maximum)

    def _extreme(self, values: np.ndarray) -> np.ndarray:
        # Moments start at min +inf / max -inf and NaN never replaces them, so a channel
        # without one non-NaN value would report min inf > max -inf.
        m = self.moments
        return np.where(m.minimum > m.maximum, np.nan, values)

    def normalize_line(self, digits: int = 6) -> str | None:
        """``transforms.Normalize(mean=[...], std=[...])`` with the biased std; None if not finite."""
        mean, std = self.moments.mean, self.moments.std
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            return None
        fmt = ", ".join
        return (f"transforms.Normalize(mean=[{fmt(f'{v:.{digits}g}' for v in mean)}], "
                f"std=[{fmt(f'{v:.{digits}g}' for v in std)}])")

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data (NaN/Inf as None); the body of ``stats --json``."""
        m = self.moments
        return {
            "inputs": [s.to_dict() for s in self.inputs], "layout": self.layout,
            "channels": m.channels, "count": m.count, "scale": self.scale,
            "mean": finite_floats(m.mean), "var": finite_floats(m.var), "var_unbiased": finite_floats(m.var_unbiased),
            "std": finite_floats(m.std), "std_unbiased": finite_floats(m.std_unbiased),
            "min": finite_floats(self.minimum), "max": finite_floats(self.maximum),
            "non_finite": [int(v) for v in m.non_finite], "normalize": self.normalize_line(),
            "chunk_bytes": self.chunk_bytes, "ranks": self.ranks, "notes": list(self.notes),
        }


_STATS_KINDS = "fiu"  # float, signed and unsigned integers (bool and complex are refused)


def read_shard(path: Path, key: str | None, layout: str, *, layout_given: bool = True) -> Shard:
    """One input's header, checked as ``check-shape`` would, for statistics.

    ``check-shape``'s header findings apply where they mean something for statistics:
    ``not_4d`` is an error; ``not_float`` only for booleans, complex numbers and strings
    (integers are fine to count); ``channels_last`` is kept as a warning when the layout
    was not given; ``empty`` and ``one_value_per_channel`` do not apply to one shard of many.

    Raises:
        ShapeError: Not 4D. DTypeError: Not real numbers.
        InputError, UnsafeFileError, KeyChoiceError: Not readable safely.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        key = None  # --key names the tensor inside containers; a .npy shard has just one
    info = io.peek(path, key)
    shape = tuple(info.shape)
    findings = check_shape(shape, info.dtype, mode="eval", layout=layout)
    for f in findings:
        if f.code == "not_4d":
            # The same diagnosis as check-shape and normalize: the rule, then what the shape looks like.
            raise ShapeError(f"{path}: {f.message}", hint=f.hint)
    if _kind(info.dtype) not in _STATS_KINDS:
        raise DTypeError(f"{path}: cannot compute statistics of dtype {info.dtype}.",
                         hint="Use real numbers: floating point or integer data.")
    itemsize = 2 if info.dtype == "bfloat16" else np.dtype(info.dtype).itemsize
    raw = io.raw_tensor(path, key)
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    warnings = tuple(f for f in findings if f.code == "channels_last" and not layout_given)
    return Shard(path, info.key, shape, info.dtype, nbytes, bool(raw and raw.fortran_order), findings=warnings)


def check_shards(shards: Sequence[Shard], layout: str, *, allow_mixed_dtypes: bool = False) -> None:
    """Refuse inputs that cannot be pooled: different channel counts, or (unless allowed) dtypes.

    Raises:
        ShapeError: The channel counts differ.
        DTypeError: The dtypes differ and ``allow_mixed_dtypes`` is False.
    """
    axis = 3 if layout == "nhwc" else 1
    first = shards[0]
    for s in shards[1:]:
        if s.shape[axis] != first.shape[axis]:
            looks = next((x for x in (first, s) if x.findings), None)
            hint = "All inputs must have the same channel count; check the file list and --layout."
            if looks is not None:
                hint += f" {looks.path} looks channels-last: pass --layout nhwc if it is."
            raise ShapeError(
                f"{s.path}: has {plural(s.shape[axis], 'channel')} on its {_axis_name(layout)} (shape {s.shape}), "
                f"but {first.path} has {first.shape[axis]} (shape {first.shape}).", hint=hint)
    by_dtype: dict[str, list[Shard]] = {}
    for s in shards:
        by_dtype.setdefault(s.dtype, []).append(s)
    if len(by_dtype) > 1 and not allow_mixed_dtypes:
        def files(group: list[Shard]) -> str:
            names = ", ".join(str(g.path) for g in group[:3])
            return names + (f" and {len(group) - 3} more" if len(group) > 3 else "")
        listing = "; ".join(f"{d}: {files(g)}" for d, g in by_dtype.items())
        ints = any(_kind(d) in "iu" for d in by_dtype)
        floats = any(_kind(d) == "f" for d in by_dtype)
        why = (" Integer and floating-point inputs usually hold different value ranges (e.g. [0, 255] "
               "pixels and [0, 1] floats), and pooling them gives statistics of neither."
               if ints and floats else "")
        raise DTypeError(f"The inputs have {len(by_dtype)} different dtypes ({listing}).{why}",
                         hint="Pass inputs of one dtype; if the values share one scale, pass "
                              "--allow-mixed-dtypes (with --scale 255, integer inputs are divided by "
                              "255 and floating-point ones kept as they are).")


def disk_bytes(path: Path) -> int:
    """A file's size, 0 when it cannot be read (the rank that owns it reports why)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _file_moments(shards: Sequence[Shard], channels: int, layout: str, chunk_bytes: int,
                  workers: int, progress: ProgressFn | None) -> list[Moments]:
    """Exact moments of each shard (scaled by its ``scale``), one per shard, in order."""
    def items() -> Iterator[tuple[int, np.ndarray, np.ndarray | None, int]]:
        for index, s in enumerate(shards):
            shift = None  # per file, from its first values: the same however files are split
            values = max(int(np.prod(s.shape, dtype=np.int64)), 1)
            for block in io.iter_chunks(s.path, s.key, max_bytes=chunk_bytes):
                if shift is None and block.size:
                    shift = estimate_shift(block, layout)
                yield index, block, shift, block.size * s.nbytes // values

    def work(item: tuple[int, np.ndarray, np.ndarray | None, int]) -> tuple[int, Moments, int]:
        index, block, shift, nbytes = item
        return index, block_moments(block, layout, shift=shift), nbytes

    parts = [Moments.empty(channels) for _ in shards]
    total = sum(s.nbytes for s in shards)
    done = 0
    if progress:
        progress("statistics", 0, total)
    for index, part, nbytes in ordered_map(work, items(), workers):
        parts[index].merge(part)
        done += nbytes
        if progress:
            progress("statistics", done, total)
    return [p.scaled(s.scale) for p, s in zip(parts, shards, strict=True)]


def _as_paths(paths: PathsArg) -> list[str | os.PathLike[str]]:
    return [paths] if isinstance(paths, str | os.PathLike) else list(paths)


def _shard_keys(path: Path, keys: Sequence[str | None]) -> Sequence[str | None]:
    """The tensors of one file that count: each key of a container, a .npy's one array once."""
    return [None] if path.suffix.lower() == ".npy" else keys


def dataset_stats(paths: PathsArg, *, key: str | Sequence[str] | None = None, layout: str | None = None,
                  scale: float = 1.0, glob: str | Sequence[str] | None = None,
                  allow_mixed_dtypes: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  progress: ProgressFn | None = None, workers: int | None = None,
                  world: World | None = None, check: Callable[[Shard], None] | None = None) -> StatsResult:
    """Exact per-channel statistics over every value of one or more files (``bncli stats``).

    Each file is read a chunk at a time (see :func:`bncli.io.iter_chunks`); the result
    equals the exact statistics of the concatenation of all files to about 1e-15
    relative, whatever ``chunk_bytes``, ``workers`` and the number of ranks (per-file
    moments are merged in file order as a balanced tree, so a distributed run gives the
    single-process result bit for bit).

    Args:
        paths: Files, folders (expanded with ``glob``, see :func:`bncli.io.expand_inputs`)
            or one path; any mix of formats with the same channel count.
        key: Tensor name inside containers that hold several (ignored for ``.npy`` shards);
            several names make each of those tensors of every container a shard.
        layout: ``nchw`` or ``nhwc``; ``None`` means nchw, and inputs that look
            channels-last then get a note.
        scale: Divide the values of *integer* inputs by this, e.g. 255 for uint8 images
            (as ``transforms.ToTensor()`` does); floating-point inputs are kept, with a note.
        glob: Patterns for folders (comma-separated or a sequence; None: every format).
        allow_mixed_dtypes: Pool inputs of different dtypes instead of refusing them.
        chunk_bytes: Bytes read per chunk (as stored).
        progress: Called as ``progress("statistics", done_bytes, total_bytes)`` with this
            rank's bytes.
        workers: Threads (default :func:`bncli.outofcore.default_workers`).
        world: Processes sharing the pass (:func:`bncli.distributed.session`); default
            this process only. Every rank must call with the same arguments; each gets the
            full result.
        check: Called with every shard's header before any data is read (e.g. to refuse
            what a later step cannot take); it may raise.

    Returns:
        The statistics, the inputs and notes for the user.

    Raises:
        ValueError: ``layout`` is not one of the above.
        ShapeError: A file is not 4D, the channel counts differ, or there are no values.
        DTypeError: A file holds booleans, complex numbers or strings, or the dtypes
            differ (without ``allow_mixed_dtypes``).
        InputError, UnsafeFileError, KeyChoiceError: A file cannot be read safely, or a
            folder holds no matching file.

    Example:
        >>> r = dataset_stats("shards/", layout="nhwc", scale=255)   # doctest: +SKIP
        >>> r.mean, r.std, r.count, r.normalize_line()              # doctest: +SKIP
    """
    world = world or LOCAL
    if not (scale > 0 and np.isfinite(scale)):
        raise StateError(f"scale must be a positive number, got {scale}.", hint="E.g. --scale 255.")
    if layout not in (None, "nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc' (or None), got {layout!r}")
    lay = layout or "nchw"
    # Rank 0's view of the file list and sizes decides the split, so every rank cuts the
    # same list the same way (and a folder error is reported once, collectively).
    listing = world.gather(lambda: [(str(p), disk_bytes(p)) for p in io.expand_inputs(_as_paths(paths), glob=glob)])
    files, weights = [Path(p) for p, _ in listing[0]], [w for _, w in listing[0]]
    if not files:
        raise InputError("No input files.", hint="Pass one or more tensor files or folders.")
    blocks = split_contiguous(weights, world.size)
    mine = blocks[world.rank]
    # Every header before any data: a bad shard at the end fails in a second.
    keys = [key] if key is None or isinstance(key, str) else list(key)

    def own_headers() -> list[dict[str, Any]]:
        out = []
        for i in mine:
            for k in _shard_keys(files[i], keys):
                shard = read_shard(files[i], k, lay, layout_given=layout is not None)
                if check is not None:
                    check(shard)
                out.append(shard.to_dict())
        return out

    headers = world.gather(own_headers)
    counts = [len(part) for part in headers]  # shards per rank (a file may hold several)
    first = sum(counts[:world.rank])
    shards = [Shard.from_dict(d) for part in headers for d in part]
    check_shards(shards, lay, allow_mixed_dtypes=allow_mixed_dtypes)
    shards = [replace(s, scale=float(scale) if s.is_integer else 1.0) for s in shards]
    channels = shards[0].shape[3 if lay == "nhwc" else 1]
    own: list[Moments] = []
    world.gather(lambda: own.extend(_file_moments(shards[first:first + counts[world.rank]], channels, lay,
                                                  chunk_bytes, workers or default_workers(), progress)))
    acc = merge_pairwise(world.gather_moments(own, counts, channels), channels)
    if acc.count == 0:
        raise ShapeError("The inputs hold no values (every file has a zero-size axis).",
                         hint="Check how the files were written.")
    result = StatsResult(shards, lay, float(scale), acc, chunk_bytes, ranks=world.size)
    result.notes = stats_notes(result)
    return result


def _examples(shards: Sequence[Shard], limit: int = 2) -> str:
    shown = ", ".join(f"{s.path} {s.shape}" for s in shards[:limit])
    return shown + (f" and {len(shards) - limit} more" if len(shards) > limit else "")


def _n(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def stats_notes(r: StatsResult) -> list[str]:
    """Warnings about a result, for stderr and the JSON ``notes`` (most important first)."""
    notes = []
    nhwc = [s for s in r.inputs if any(f.code == "channels_last" for f in s.findings)]
    if nhwc:
        notes.append(f"{len(nhwc)} of {plural(len(r.inputs), 'input')} {verb(len(nhwc), 'looks', 'look')} "
                     "channels-last (N, H, W, C): "
                     f"{_examples(nhwc, limit=1)}. Read as NCHW (the default), they have {r.moments.channels} "
                     "channels. If they are images, pass --layout nhwc; --layout nchw confirms the "
                     "layout and drops this note.")
    bad = r.moments.non_finite
    if bad.any():
        chans = ", ".join(str(i) for i in np.flatnonzero(bad)[:10])
        notes.append(f"{plural(int(bad.sum()), 'value')} {verb(int(bad.sum()), 'is', 'are')} NaN or Inf "
                     f"({plural(int((bad > 0).sum()), 'channel')}: {chans}); the mean and "
                     "variance of those channels are not finite, as BatchNorm2d's would be. "
                     "min and max ignore NaN.")
    ints = [s for s in r.inputs if s.is_integer]
    floats = [s for s in r.inputs if not s.is_integer]
    if ints and r.scale == 1.0:
        notes.append(f"{ints[0].path} holds {ints[0].dtype} values, reported as they are; for images "
                     "fed through transforms.ToTensor() (which divides by 255), pass --scale 255.")
    if r.scale != 1.0 and floats:
        if ints:
            notes.append(f"--scale {r.scale:g} applies to integer inputs only: {_n(len(ints), 'integer input')} "
                         f"divided by {r.scale:g}, {_n(len(floats), 'floating-point input')} kept unscaled "
                         f"({_examples(floats)}).")
        else:
            notes.append(f"--scale {r.scale:g} applies to integer inputs only, and every input is floating "
                         f"point: nothing was divided ({_examples(floats)}).")
    flat = np.flatnonzero(r.moments.std == 0) if r.moments.count else np.array([], dtype=np.int64)
    if flat.size:
        chans = ", ".join(str(i) for i in flat[:10]) + (" ..." if flat.size > 10 else "")
        notes.append(f"{plural(int(flat.size), 'channel')} ({chans}) {verb(int(flat.size), 'is', 'are')} "
                     "constant (std 0): transforms.Normalize divides by the std, so "
                     "those channels would become Inf or NaN. Drop them, or give them std 1.")
    empty = [s for s in r.inputs if 0 in s.shape]
    if empty:
        notes.append(f"{_n(len(empty), 'input')} with no values (they count for nothing): {_examples(empty)}.")
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
    if m.count < 2:
        raise StateError(f"Cannot write a BatchNorm state from {plural(m.count, 'value')} per channel: "
                         "running_var holds the unbiased variance, which needs at least 2.",
                         hint="Compute the statistics over more data, or drop --save-state.")
    bad = np.flatnonzero(~(np.isfinite(m.mean) & np.isfinite(m.var)))
    if bad.size:
        chans = ", ".join(str(i) for i in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise StateError(f"Cannot write a BatchNorm state: the statistics of {plural(int(bad.size), 'channel')} "
                         f"({chans}) are not finite (the data holds NaN or Inf), and such running stats "
                         "make every eval output of those channels NaN.",
                         hint="Find the NaN/Inf values (bncli check-shape DATA counts them) and clean them, "
                              "or drop --save-state.")
    engine = BatchNormEngine(BatchNormConfig(m.channels, momentum=None))
    engine.update_running_stats(torch.from_numpy(m.mean), torch.from_numpy(m.var), m.count)
    return engine.state_dict()


def save_stats_state(result: StatsResult, dest: Path, *, force: bool = False) -> None:
    """Write :func:`stats_state_dict` as ``.pt`` or ``.safetensors``, atomically."""
    io.save_state_dict(stats_state_dict(result), Path(dest), force=force,
                       protect=[s.path for s in result.inputs])
