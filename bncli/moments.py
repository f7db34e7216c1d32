"""Exact per-channel statistics of a stream of blocks: count, mean, variance, min, max.

What BatchNorm2d computes over one batch, computed over data that arrives in pieces
(chunks of a file, several files) with float64 accumulation, so that the result equals
a float64 two-pass computation over the whole data to about 1e-12 relative, whatever
the chunking.

How, in three steps that each avoid a classic loss of precision:

1. **Shift.** Every value is taken relative to a per-channel shift ``K`` close to the
   mean (the first block's mean), so the sums below are of numbers of the size of the
   spread, not of the mean. Without it the merges lose about ``|mean| / std`` ulps
   (1e6-Kelvin temperatures with a 0.1 spread would keep only 1e-10).
2. **Two passes per piece.** Each block is cut into cache-sized pieces; a piece gets an
   exact float64 two-pass treatment: its mean, then the sum of squared deviations from it.
3. **Stable merge.** Pieces, blocks and files combine with the update of Chan, Golub and
   LeVeque (1979), ``n = na + nb; d = mean_b - mean_a; mean = mean_a + d * nb / n;
   M2 = M2_a + M2_b + d**2 * na * nb / n``, which has no catastrophic cancellation
   (unlike ``E[x**2] - E[x]**2``, the source of many wrong "dataset std" values).

NumPy only: no torch, no files, no printing.

Example:
    >>> m = Moments.empty(3)
    >>> for block in blocks:          # (n, C, H, W) arrays
    ...     m.update(block)
    >>> m.mean, m.var, m.var_unbiased
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

# Elements per piece: 2 MiB of float64, so the temporaries stay in a core's L2 cache.
SUB_BLOCK_ELEMENTS = 1 << 18


@dataclass
class Moments:
    """Per-channel moments of everything seen so far.

    Attributes:
        count: Values per channel (the same for every channel: N*H*W summed over blocks).
        shift: The per-channel value every value was taken relative to (float64, (C,)).
        centered_mean: Per-channel mean of ``x - shift``.
        m2: Per-channel sum of squared deviations from the mean (``var * count``).
        minimum: Per-channel minimum, ignoring NaN (``+inf`` before any value).
        maximum: Per-channel maximum, ignoring NaN (``-inf`` before any value).
        non_finite: Per-channel count of NaN and +-Inf values (int64).

    Mean and variance include every value, as BatchNorm2d does, so one NaN or Inf makes
    its channel's mean/variance non-finite; ``non_finite`` says how many there were.
    """

    count: int
    shift: np.ndarray
    centered_mean: np.ndarray
    m2: np.ndarray
    minimum: np.ndarray
    maximum: np.ndarray
    non_finite: np.ndarray = field(repr=False)

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """Moments of no data, for ``channels`` channels."""
        return cls(0, np.zeros(channels), np.zeros(channels), np.zeros(channels),
                   np.full(channels, np.inf), np.full(channels, -np.inf),
                   np.zeros(channels, dtype=np.int64))

    @property
    def channels(self) -> int:
        return int(self.m2.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """Per-channel mean (float64). NaN when empty."""
        if not self.count:
            return np.full(self.channels, np.nan)
        with np.errstate(invalid="ignore"):
            return self.shift + self.centered_mean

    @property
    def var(self) -> np.ndarray:
        """Biased (population) variance, what BatchNorm2d normalizes with. NaN when empty."""
        if not self.count:
            return np.full(self.channels, np.nan)
        return self.m2 / self.count

    @property
    def var_unbiased(self) -> np.ndarray:
        """Unbiased (sample) variance, what BatchNorm2d stores in ``running_var``."""
        if self.count < 2:
            return np.full(self.channels, np.nan)
        return self.m2 / (self.count - 1)

    @property
    def std(self) -> np.ndarray:
        """Biased standard deviation (``sqrt(var)``), the one ``transforms.Normalize`` wants."""
        with np.errstate(invalid="ignore"):
            return np.sqrt(self.var)

    @property
    def std_unbiased(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.sqrt(self.var_unbiased)

    # -- accumulation ----------------------------------------------------------------------
    def merge(self, other: Moments) -> None:
        """Fold ``other`` (moments of further data, same channels) into ``self``, in place.

        Cheapest and most exact when both share a shift (pass ``shift=`` to
        :func:`block_moments`); otherwise ``other`` is re-centred first.
        """
        if other.channels != self.channels:
            raise ValueError(f"cannot merge moments of {other.channels} channels into {self.channels}")
        if other.count == 0:
            return
        self.minimum = np.fmin(self.minimum, other.minimum)
        self.maximum = np.fmax(self.maximum, other.maximum)
        self.non_finite = self.non_finite + other.non_finite
        if self.count == 0:
            self.count, self.shift = other.count, other.shift.copy()
            self.centered_mean, self.m2 = other.centered_mean.copy(), other.m2.copy()
            return
        with np.errstate(invalid="ignore", over="ignore"):
            other_mean = other.centered_mean
            if not np.array_equal(other.shift, self.shift):
                # Nearby shifts subtract exactly (Sterbenz), so this costs ~one rounding.
                other_mean = (other.shift - self.shift) + other.centered_mean
            na, nb = float(self.count), float(other.count)
            n = na + nb
            delta = other_mean - self.centered_mean
            self.centered_mean = self.centered_mean + delta * (nb / n)
            self.m2 = self.m2 + other.m2 + delta * delta * (na * nb / n)
        self.count += other.count

    def update(self, block: np.ndarray, layout: str = "nchw", *, extrema: bool = True) -> None:
        """Fold one block of data into the moments (see :func:`block_moments`)."""
        self.merge(block_moments(block, layout, extrema=extrema,
                                 shift=self.shift if self.count else None))

    # -- exchange (between processes: float64 rows, no pickle) ------------------------------
    @staticmethod
    def packed_size(channels: int) -> int:
        """Length of :meth:`pack`'s row for ``channels`` channels."""
        return 1 + 6 * channels

    def pack(self) -> np.ndarray:
        """One float64 row: count, shift, centered_mean, m2, minimum, maximum, non_finite.

        Exact: counts are integers below 2**53, and :meth:`unpack` restores every value bit
        for bit (NaN and +-Inf included).
        """
        return np.concatenate([[float(self.count)], self.shift, self.centered_mean, self.m2,
                               self.minimum, self.maximum, self.non_finite.astype(np.float64)])

    @classmethod
    def unpack(cls, row: np.ndarray) -> Moments:
        """The inverse of :meth:`pack`."""
        row = np.asarray(row, dtype=np.float64)
        c = (row.shape[0] - 1) // 6
        shift, mean, m2, lo, hi, bad = (row[1 + i * c:1 + (i + 1) * c].copy() for i in range(6))
        return cls(int(row[0]), shift, mean, m2, lo, hi, bad.astype(np.int64))

    # -- presentation ----------------------------------------------------------------------
    def scaled(self, factor: float) -> Moments:
        """The moments of ``x / factor`` (e.g. 255 for uint8 images fed through ToTensor)."""
        if factor == 1.0:
            return self
        return Moments(self.count, self.shift / factor, self.centered_mean / factor,
                       self.m2 / (factor * factor), self.minimum / factor, self.maximum / factor,
                       self.non_finite.copy())


def merge_pairwise(parts: Sequence[Moments], channels: int) -> Moments:
    """Merge moments of consecutive pieces of data (e.g. files, in order) as a balanced tree.

    The pairing depends only on ``len(parts)``, so the result is the same bit for bit
    however the parts were computed (one process or many), and the rounding error grows
    with log2 of the number of parts rather than with the number.
    """
    level = [copy.deepcopy(p) for p in parts]
    if not level:
        return Moments.empty(channels)
    while len(level) > 1:
        merged = []
        for i in range(0, len(level) - 1, 2):
            level[i].merge(level[i + 1])
            merged.append(level[i])
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    return level[0]


def estimate_shift(block: np.ndarray, layout: str = "nchw") -> np.ndarray:
    """A per-channel value near the mean of ``block`` (its first piece's mean; 0 if not finite).

    Any value works for correctness; one near the data's mean keeps every later sum small.
    """
    for piece in _sub_blocks(block, layout):
        with np.errstate(invalid="ignore", over="ignore"):
            shift = piece.mean(axis=1)
        return np.where(np.isfinite(shift), shift, 0.0)
    return np.zeros(block.shape[3] if layout == "nhwc" else block.shape[1])


def block_moments(block: np.ndarray, layout: str = "nchw", *, extrema: bool = True,
                  shift: np.ndarray | None = None) -> Moments:
    """Exact moments of one block of data.

    Args:
        block: A 4D array, (n, C, H, W) or (n, H, W, C) with ``layout="nhwc"``; any
            real dtype (integers are exact in float64 up to 2**53).
        layout: ``"nchw"`` or ``"nhwc"``.
        extrema: Also track min, max and the non-finite count (a little slower).
        shift: Per-channel value to centre on (see the module docs); blocks that will be
            merged should share one, e.g. :func:`estimate_shift` of the first block.
            Default: estimated from this block.

    Returns:
        The block's moments, ready to :meth:`Moments.merge`.
    """
    if block.ndim != 4:
        raise ValueError(f"expected a 4D block, got shape {block.shape}")
    c = int(block.shape[3] if layout == "nhwc" else block.shape[1])
    if shift is None:
        shift = estimate_shift(block, layout)
    shift = np.asarray(shift, dtype=np.float64)
    parts = [_part_moments(p, shift, extrema) for p in _sub_blocks(block, layout)]
    if not parts:
        return Moments.empty(c)
    if len(parts) == 1:
        return parts[0]
    # All parts at once: the mean first, then each part's spread around it. Same
    # stability as pairwise merges, with a handful of NumPy calls instead of one per part.
    # Parts lie along the last, contiguous axis so that each sum is pairwise (NumPy adds
    # along other axes one row at a time: 1.5e-13 of M2 lost over 16k small parts).
    counts = np.array([p.count for p in parts], dtype=np.float64)
    means = np.stack([p.centered_mean for p in parts], axis=1)  # (C, parts)
    total = int(counts.sum())
    with np.errstate(invalid="ignore", over="ignore"):
        mean = (counts * means).sum(axis=1) / total
        dev = means - mean[:, None]
        m2 = np.stack([p.m2 for p in parts], axis=1).sum(axis=1) + (counts * dev * dev).sum(axis=1)
    return Moments(total, shift, mean, m2,
                   np.fmin.reduce(np.stack([p.minimum for p in parts]), axis=0),
                   np.fmax.reduce(np.stack([p.maximum for p in parts]), axis=0),
                   np.stack([p.non_finite for p in parts]).sum(axis=0))


def _sub_blocks(block: np.ndarray, layout: str) -> Iterator[np.ndarray]:
    """Yield ``block`` as float64 (C, M) pieces of about :data:`SUB_BLOCK_ELEMENTS` values.

    Each piece holds every channel's values of a few samples, channel-major, so every
    reduction below runs over one contiguous row: widening to float64 and transposing
    happen in the same copy (reducing over a stride-C axis of NHWC data directly is
    ~5x slower for small C). A sample too big for one piece is split along H*W.
    The pieces share one buffer: use each before asking for the next.
    """
    if block.size == 0:
        return
    if layout == "nhwc":
        c = block.shape[3]
        x = block.reshape(1, -1, c).transpose(0, 2, 1)  # (1, C, N*H*W), strided
    else:
        c = block.shape[1]
        x = block.reshape(block.shape[0], c, -1)  # (N, C, H*W)
    n, _, length = x.shape
    if c * length <= SUB_BLOCK_ELEMENTS:
        rows = SUB_BLOCK_ELEMENTS // (c * length)
        buf = np.empty((c, min(rows, n), length))
        for start in range(0, n, rows):
            piece = x[start:start + rows]
            out = buf[:, :piece.shape[0]]
            np.copyto(out, piece.transpose(1, 0, 2))
            yield out.reshape(c, -1)
        return
    cols = max(1, SUB_BLOCK_ELEMENTS // c)
    buf = np.empty((c, min(cols, length)))
    for i in range(n):
        for start in range(0, length, cols):
            piece = x[i, :, start:start + cols]
            out = buf[:, :piece.shape[1]]
            np.copyto(out, piece)
            yield out


def _part_moments(d: np.ndarray, shift: np.ndarray, extrema: bool) -> Moments:
    """Exact two-pass moments of one float64 (C, M) piece; ``d`` is overwritten."""
    c, count = d.shape
    non_finite = np.zeros(c, dtype=np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        if extrema:
            lo, hi = d.min(axis=1), d.max(axis=1)
            if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
                # NaN or Inf somewhere (min/max propagate NaN): count them, skip NaN.
                lo, hi = np.fmin.reduce(d, axis=1), np.fmax.reduce(d, axis=1)
                non_finite = (~np.isfinite(d)).sum(axis=1, dtype=np.int64)
        else:
            lo, hi = np.full(c, np.inf), np.full(c, -np.inf)
        d -= shift[:, None]
        mean = d.sum(axis=1) / count
        d -= mean[:, None]
        # Square in place, then sum each contiguous row: np.add.reduce sums a contiguous
        # axis pairwise (error ~log2(M) ulps, not the ~M ulps of a running sum). einsum and
        # np.dot accumulate sequentially and lost up to 2.4e-13 of M2 on 614k uint8 values
        # per channel; BLAS threads also stall when other processes hold the cores.
        np.multiply(d, d, out=d)
        m2 = d.sum(axis=1)
    return Moments(count, shift, mean, m2, lo, hi, non_finite)
