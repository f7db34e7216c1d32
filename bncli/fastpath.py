"""CPU fast paths of the BatchNorm2d engine, for inputs where PyTorch's own CPU kernels are slow.

PyTorch's CPU ``batch_norm`` (torch 2.13) has two weak spots, measured with ``bncli bench``
and ``benchmarks/fastpath.py`` (2-core AVX-512 VM, 2 threads, fastest calls):

* **NCHW, train mode.** For float32/float64 the contiguous kernel computes the batch
  statistics in two scalar passes with one double accumulator per channel (one dependent
  add per value), parallel over channels only: (8, 3, 224, 224) float32 takes 1.13 ms where
  a copy of the same bytes takes 0.17 ms (with C=3 on 2 threads one thread does two
  channels). Its 16-bit kernel is vectorized and keeps up (0.28 ms in bfloat16).
* **channels-last memory, few channels.** Those kernels vectorize across C: with fewer
  channels than a SIMD vector most lanes idle, so C=3 runs 3.6-11x slower than NCHW. Their
  statistics also accumulate in float32, one running sum per thread over N*H*W/threads
  pixels: the output drifts from 1.1e-6 of its RMS at 256 pixels to 1.7e-4 at (1, 719, 727, 3)
  and 4.3e-4 at (16, 224, 224, 8) (mean 3; NCHW stays below 6e-7). So do the running stats.

What the engine does instead (every route ends in the module's own eval kernel, fed a
per-channel scale and shift, and writes one output tensor like the module):

``nhwc-eval``  channels-last input, running statistics: ``F.batch_norm`` on a view of rows of
    k whole pixels (k*C values), every per-channel tensor tiled k times; the pixels that
    fill no whole row go through the same kernel on their own. The kernel does the same
    arithmetic per element, so the output is bitwise the module's.
``nhwc-stats`` channels-last input, batch statistics: column statistics of a view of at most
    :data:`STATS_ROWS` rows (``torch.batch_norm_update_stats``, vectorized along the rows), so
    each float32 column sum has a few hundred terms; the k column groups of a channel, and
    the remainder pixels (exactly, in float64) when N*H*W has no divisor near the row count,
    merge in float64 (Chan, Golub and LeVeque). Then the ``nhwc-eval`` view with the scale/shift.
``nchw-stats`` contiguous NCHW input, batch statistics: ``torch.native_group_norm`` with one
    group per row of a (part of a) channel plane returns each row's mean and 1/std
    (vectorized Welford, parallel over all N*C rows, not just C channels); the rows merge
    per channel in float64; then the module's NCHW eval kernel. Group norm's normalized
    output is thrown away: that costs a write, but no PyTorch CPU op returns a centered
    second moment without one (``var_mean`` is a scalar Welford loop, 3.5 ms here; layer
    norm is the same idea, 10-50% slower). (8, 3, 224, 224) float32: 0.53 ms, 0.47x the module.

Train-mode routes then apply the module's running-stat rule (``num_batches_tracked``,
momentum or the cumulative average, unbiased variance) in float64, as its CPU kernel does.
Outputs equal ``nn.BatchNorm2d`` within rounding, not bitwise: the sums run in another order.
Against a float64 reference, float32 outputs stay within 8.1e-7 of the output RMS at means
0..3, like the module's NCHW kernel (README, Numerics; tests/test_engine_fastpath.py).

The thresholds below say where each route was measured to pay; elsewhere the engine calls
the module unchanged. No files, no printing; imported by :mod:`bncli.engine` only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

# Rows of the channels-last statistics view: few rows keep the kernel's float32 column sums
# short (at most STATS_ROWS / threads terms), wide rows keep it vectorized. 512 rows measured
# fastest (0.81 ms at (8, 224, 224, 3) float32; 128 rows 0.97, the old <=256-value rows 1.01)
# and within the module's NCHW error (5.7e-7 at mean 3; the old rows 3.5e-6 at (16, 224, 224, 8)).
STATS_ROWS = 512
EVAL_ROW_VALUES = 256  # nhwc-eval: values per row of the wide view
# (route, element size) -> most channels where the route measured faster than the module.
# nchw-stats: float32 any C; float64 up to 16 (0.58-0.94x; 0.9-1.2x at C=64); never 16-bit.
MAX_CHANNELS = {("nhwc-stats", 2): 15, ("nhwc-stats", 4): 15, ("nhwc-stats", 8): 15,
                ("nhwc-eval", 2): 15, ("nhwc-eval", 4): 4, ("nhwc-eval", 8): 3,
                ("nchw-stats", 4): 1 << 30, ("nchw-stats", 8): 16}
# Smallest inputs a route takes. nhwc-stats: from the pixel count where the module's float32
# sums miss the 1e-6 bar (C=3, mean 3: 6.9e-7 at 64 pixels, 1.1e-6 at 256, 1.5e-5 at 65536),
# although below ~2**14 pixels it is up to 0.09 ms slower than the module (fixed costs, 1 thread:
# 0.11 ms against 0.02 ms at 256 pixels; 0.17 against 0.27 at 16384). The others: where they pay.
MIN_PIXELS = {"nhwc-stats": 256, "nhwc-eval": 0, "nchw-stats": 0}
MIN_NUMEL = {"nhwc-stats": 0, "nhwc-eval": 1 << 18, "nchw-stats": 1 << 17}
# nchw-stats: planes (H*W) of at least MIN_PLANE values (7x7 planes measured 1.06x the module,
# 14x14 0.67x); planes split into rows of at least MIN_ROW_VALUES values when the N*C rows are
# too few to keep every thread busy.
MIN_PLANE = 128
MIN_ROW_VALUES = 1024
ROUTE_NAMES = {"nhwc-eval": "channels-last fast path", "nhwc-stats": "channels-last fast path",
               "nchw-stats": "NCHW statistics fast path"}


@dataclass(frozen=True)
class Route:
    """Which fast path ``forward`` takes, and the width of its view.

    Attributes:
        name: ``"nhwc-eval"``, ``"nhwc-stats"`` or ``"nchw-stats"`` (see the module docstring).
        width: Pixels per row of the channels-last view, or values per group-norm row (NCHW).
    """

    name: str
    width: int


def choose(x: torch.Tensor, batch_stats: bool, *, thresholds: bool = True) -> Route | None:
    """The fast path ``forward`` takes for the NCHW-indexed ``x``, or None for the module.

    Args:
        x: The tensor the module would see (an NHWC array already permuted to NCHW indexing).
        batch_stats: Whether the call normalizes with batch statistics (train mode, or eval
            without running statistics).
        thresholds: False ignores where a route was measured to pay (MIN_NUMEL, MIN_PIXELS,
            MIN_PLANE, MAX_CHANNELS) and takes any route that applies: for benchmarks and
            tests, not for the engine.
    """
    if not x.is_cpu or x.dim() != 4:  # is_cpu: 0.06 us, device.type: 0.34 us (every apply)
        return None
    n, c, h, w = x.shape
    if x.is_contiguous():  # the common case: this runs on every apply()
        name = "nchw-stats" if batch_stats else None
    elif x.is_contiguous(memory_format=torch.channels_last):
        name = "nhwc-stats" if batch_stats else "nhwc-eval"
    else:
        return None
    if name is None or (thresholds and (x.numel() < MIN_NUMEL[name] or n * h * w < MIN_PIXELS[name]
                                        or c > MAX_CHANNELS.get((name, x.element_size()), 0)
                                        or (name == "nchw-stats" and h * w < MIN_PLANE))):
        return None
    if name == "nchw-stats":
        return Route(name, _plane_split(h * w, n * c, torch.get_num_threads()))
    if name == "nhwc-eval":
        return Route(name, max(1, EVAL_ROW_VALUES // c))
    # Fewer rows than sqrt(pixels): each channel's mean averages more columns than a column
    # sums rows, so the float32 rounding of the column sums averages out.
    pixels = n * h * w
    return Route(name, _row_pixels(pixels, max(1, min(STATS_ROWS, math.isqrt(pixels)))))


@functools.lru_cache(maxsize=256)
def _row_pixels(pixels: int, rows: int) -> int:
    """Pixels per row for about ``rows`` rows: a divisor of ``pixels`` near that if one exists
    (no remainder block), else the plain quotient (a remainder block of fewer pixels)."""
    k = max(1, -(-pixels // rows))
    for cand in range(k, min(k + 64, 2 * k, pixels) + 1):
        if pixels % cand == 0:
            return cand
    return k


@functools.lru_cache(maxsize=256)
def _plane_split(plane: int, planes: int, threads: int) -> int:
    """Values per group-norm row: the whole plane, or the largest part of it (a divisor) that
    gives 8 rows per thread, but never parts under MIN_ROW_VALUES values."""
    want = 8 * threads
    best = plane
    parts = 2
    while planes * (plane // best) < want and plane // parts >= MIN_ROW_VALUES and parts <= 4 * want:
        if plane % parts == 0:
            best = plane // parts
        parts += 1
    return best


def describe(route: Route | None) -> str:
    """A route's name in ``bncli bench`` output: ``module`` when there is none."""
    return "module" if route is None else ROUTE_NAMES[route.name]


def forward(module: nn.BatchNorm2d, x: torch.Tensor, route: Route) -> torch.Tensor:
    """``module(x)`` through ``route``: same output (within rounding) and same state update.

    ``module`` keeps its state in float64 for float64 ``x`` and in float32 otherwise, as the
    engine keeps it (and nn.BatchNorm2d requires).
    """
    if route.name == "nhwc-eval":
        assert module.running_mean is not None and module.running_var is not None
        return _apply_channels_last(x, route.width, module.running_mean, module.running_var,
                                    module.weight, module.bias, module.eps)
    double = x.dtype == torch.float64
    if route.name == "nhwc-stats":
        mean, var = _stats_channels_last(x, route.width, torch.float64 if double else torch.float32)
    else:
        mean, var = _stats_planes(x, route.width)
    # C numbers each, in NumPy: an operation costs ~1 us (2-3 us right after a large kernel has
    # evicted the interpreter's caches) where torch's cost 3-10 us; these ~35 are 10% of a
    # 0.5 ms call. Parameter-dtype arithmetic as the kernel's: the batch mean rounded first.
    dtype = np.float64 if double else np.float32
    mean_p: npt.NDArray[np.floating] = mean.astype(dtype)
    running_mean, running_var = module.running_mean, module.running_var
    if module.training and running_mean is not None and running_var is not None:
        _update_running_stats(module, running_mean.numpy(), running_var.numpy(), mean_p, var,
                              x.numel() // x.shape[1])
    alpha: npt.NDArray[np.floating] = (1.0 / np.sqrt(var + module.eps)).astype(dtype)
    weight, bias = module.weight, module.bias
    if weight is not None:
        alpha *= weight.detach().numpy()
    beta = -mean_p * alpha if bias is None else bias.detach().numpy() - mean_p * alpha
    scale, shift = torch.from_numpy(alpha), torch.from_numpy(beta)
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    if route.name == "nhwc-stats":
        # mean 0, var 1, eps 0: the kernel's own scale/shift become exactly ours.
        return _apply_channels_last(x, max(1, EVAL_ROW_VALUES // x.shape[1]), zeros, ones, scale, shift, 0.0)
    return torch.batch_norm(x, scale, shift, zeros, ones, False, 0.0, 0.0, False)


def _update_running_stats(module: nn.BatchNorm2d, running_mean: np.ndarray, running_var: np.ndarray,
                          mean_p: np.ndarray, var: np.ndarray, count: int) -> None:
    """The module's train-step rule on NumPy views of its CPU buffers, in float64 as its CPU
    kernel computes it, from the batch mean rounded to the parameter dtype (what the kernel
    stores) and the exact variance (made unbiased)."""
    assert module.num_batches_tracked is not None
    tracked = module.num_batches_tracked.numpy()
    tracked += 1
    factor = 1.0 / float(tracked) if module.momentum is None else module.momentum
    keep = 1.0 - factor
    running_mean[...] = factor * mean_p.astype(np.float64) + keep * running_mean.astype(np.float64)
    running_var[...] = (factor * count / (count - 1)) * var + keep * running_var.astype(np.float64)


def _pixels_by_channels(x: torch.Tensor) -> torch.Tensor:
    """A channels-last NCHW tensor as the (N*H*W, C) matrix it is in memory (a view)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n * h * w, c)


def _apply_channels_last(x: torch.Tensor, k: int, mean: torch.Tensor, var: torch.Tensor,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``F.batch_norm(x, mean, var, weight, bias, eps=eps)`` (eval) for channels-last ``x``, through
    rows of ``k`` pixels (per-channel tensors tiled), and the last pixels that fill no row."""
    y = torch.empty_like(x)  # channels_last, like x
    src, dst = _pixels_by_channels(x), _pixels_by_channels(y)
    pixels, c = src.shape
    rows = pixels // k
    none = torch.empty(0, dtype=mean.dtype)

    def tile(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.expand(k, c).reshape(k * c)  # 2x faster than repeat()

    if rows:
        main = rows * k
        torch.native_batch_norm(src[:main].view(rows, k * c), tile(weight), tile(bias), tile(mean), tile(var),
                                False, 0.0, eps, out=(dst[:main].view(rows, k * c), none, none))
    if rows * k < pixels:
        torch.native_batch_norm(src[rows * k:], weight, bias, mean, var, False, 0.0, eps,
                                out=(dst[rows * k:], none, none))
    return y


def _stats_channels_last(x: torch.Tensor, k: int, param: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (float64) of a channels-last ``x``, rows of ``k`` pixels."""
    src = _pixels_by_channels(x)
    pixels, c = src.shape
    rows = pixels // k
    main = rows * k
    # (1, k*C, rows, 1) with unit channel stride: channels_last, so the kernel reduces over
    # the rows, vectorized along them. float32 buffers make float16/bfloat16 statistics come
    # back in float32; momentum 0 leaves them untouched.
    columns = src[:main].view(rows, k * c).t().unsqueeze(0).unsqueeze(-1)
    group_mean, group_var = torch.batch_norm_update_stats(
        columns, torch.zeros(k * c, dtype=param), torch.ones(k * c, dtype=param), 0.0)
    gm = group_mean.numpy().astype(np.float64).reshape(k, c)
    gv = group_var.numpy().astype(np.float64).reshape(k, c)
    mean = gm.mean(0)
    m2 = rows * (gv.sum(0) + np.square(gm - mean).sum(0))  # equal-size groups
    if main < pixels:
        rest = src[main:].to(torch.float64).numpy()
        r_mean = rest.mean(0)
        r_m2 = np.square(rest - r_mean).sum(0)
        na, nb = main, pixels - main
        delta = r_mean - mean
        mean = mean + delta * (nb / pixels)
        m2 = m2 + r_m2 + np.square(delta) * (na * nb / pixels)
    return mean, m2 / pixels


def _stats_planes(x: torch.Tensor, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance (float64) of a contiguous NCHW ``x``, from the
    moments of rows of ``row`` values (each within one channel plane)."""
    n, c, h, w = x.shape
    rows = x.numel() // row
    # Group norm with one group per row returns each row's mean and 1/sqrt(var + eps); its
    # normalized output is not used. A float32 weight makes 16-bit inputs a mixed-type call,
    # whose moments come back float32.
    weight = None if x.dtype in (torch.float32, torch.float64) else torch.ones(rows)
    _, mean_r, rstd_r = torch.native_group_norm(x.view(1, rows, row), weight, None, 1, rows, row, rows, 0.0)
    m = mean_r.numpy().reshape(n, c, -1).astype(np.float64)
    r = rstd_r.numpy().reshape(n, c, -1).astype(np.float64)
    groups = m.shape[0] * m.shape[2]  # rows per channel, all of the same size
    mean = m.sum((0, 2)) / groups
    with np.errstate(divide="ignore"):
        # eps 0: rstd = 1 / sqrt(var), inf for a constant row, whose variance 1 / inf**2 is 0.
        var = (1.0 / (r * r) + np.square(m - mean[:, None])).sum((0, 2)) / groups
    return mean, var
