"""A small timing harness: per-call times with untimed setup, on CPU, CUDA and MPS.

Why not ``torch.utils.benchmark.Timer``: it times blocks of calls, so it cannot run untimed
work between two calls (resetting BatchNorm's running stats, flushing the GPU's L2), and it
times CUDA by synchronizing the host rather than with device events. :func:`time_cases`
does both, and interleaves the cases in a shuffled order so that a busy machine slows
them alike and no case always inherits the same predecessor's cache. (``bncli
bench`` still uses ``Timer`` for the environment's copy bandwidth, where neither matters.)

No typer, no rich, no printing.
"""

from __future__ import annotations

import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

TIMING_KEYS = ("median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "reps", "method")


@dataclass(frozen=True)
class Timing:
    """Per-call times (seconds) of one variant and their summary statistics."""

    times: tuple[float, ...]
    method: str

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.times), q))

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def iqr(self) -> float:
        return self.quantile(0.75) - self.quantile(0.25)

    def to_json(self) -> dict[str, Any]:
        ms = 1e3
        return {"median_ms": self.median * ms, "q1_ms": self.quantile(0.25) * ms,
                "q3_ms": self.quantile(0.75) * ms, "iqr_ms": self.iqr * ms, "min_ms": min(self.times) * ms,
                "reps": len(self.times), "method": self.method}


@dataclass
class Case:
    """A callable to time, and untimed work to run before each call (e.g. a state reset)."""

    fn: Callable[[], object]
    before: Callable[[], object] | None = None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def l2_flusher(device: torch.device) -> Callable[[], object] | None:
    """A callable that evicts the GPU's L2 by writing twice its size; None on other devices."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (128 << 20)
    buffer = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)
    return buffer.zero_


def _capture(case: Case, device: torch.device) -> Callable[[], object]:
    """Record ``case.fn`` in a CUDA graph (warmed up on a side stream, as the docs require)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            if case.before:
                case.before()
            case.fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if case.before:
        case.before()
    with torch.cuda.graph(graph):
        case.fn()
    return graph.replay


def time_cases(cases: Mapping[str, Case], *, device: torch.device | str = "cpu", reps: int | None = None,
               warmup: int = 3, target_s: float = 0.3, min_reps: int = 15, max_reps: int = 500,
               flush_l2: bool = True, cuda_graphs: bool = False) -> dict[str, Timing]:
    """Time several callables call by call, interleaved, after a warm-up.

    Each repetition runs every case once, in a freshly shuffled (seeded) order: first its
    ``before`` hook (untimed), then on CUDA an L2 flush (untimed), then the timed call. CPU
    calls are timed with ``time.perf_counter``; CUDA calls with a pair of CUDA events around
    the call (or around a CUDA-graph replay with ``cuda_graphs``); MPS by synchronizing around
    the call. The cyclic garbage collector is paused while timing, as ``timeit`` does.

    Args:
        cases: Name -> what to time.
        device: Where the work runs (decides the clock).
        reps: Repetitions; None picks enough for about ``target_s`` seconds of timed calls,
            clamped to [min_reps, max_reps].
        warmup: Untimed calls of each case first (after one-time work such as compilation).
        flush_l2: On CUDA, overwrite the L2 before each timed call so no call is served
            from what the previous one left in cache.
        cuda_graphs: On CUDA, capture each case in a graph and time its replay (no launch
            overhead). A case that cannot be captured raises.

    Returns:
        Name -> Timing, in the order of ``cases``.
    """
    device = torch.device(device)
    estimate = {}
    for name, case in cases.items():
        synchronize(device)
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            if case.before:
                case.before()
            case.fn()
        synchronize(device)
        estimate[name] = (time.perf_counter() - start) / max(warmup, 1)
    if reps is None:
        reps = int(min(max(target_s / max(sum(estimate.values()), 1e-9), min_reps), max_reps))
    cuda = device.type == "cuda"
    calls = {name: (_capture(case, device) if cuda and cuda_graphs else case.fn) for name, case in cases.items()}
    method = ("cuda-graph+events" if cuda_graphs else "cuda-events") if cuda else (
        "perf_counter+sync" if device.type == "mps" else "perf_counter")
    flush = l2_flusher(device) if flush_l2 else None
    times: dict[str, list[float]] = {name: [] for name in cases}
    events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in cases}
    order, shuffle = list(cases), random.Random(0).shuffle
    with _gc_paused():
        for _ in range(reps):
            # A fresh order every repetition: what ran just before a call (and so what its
            # cache holds) differs by variant otherwise. A fixed rotation of three made two
            # identical modules differ by 25% here, the one after a big NCHW kernel losing.
            shuffle(order)
            for name in order:
                case = cases[name]
                if case.before:
                    case.before()
                if cuda:
                    if flush:
                        flush()
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    calls[name]()
                    end.record()
                    events[name].append((begin, end))
                else:
                    synchronize(device)
                    start = time.perf_counter()
                    calls[name]()
                    synchronize(device)
                    times[name].append(time.perf_counter() - start)
    if cuda:
        torch.cuda.synchronize(device)
        times = {name: [b.elapsed_time(e) / 1e3 for b, e in pairs] for name, pairs in events.items()}
    return {name: Timing(tuple(t), method) for name, t in times.items()}


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while timing, as timeit does: a collection landing in one
    variant's call would charge it for garbage every variant made."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def measure(fn: Callable[[], object], **kwargs: Any) -> Timing:
    """Time one callable with :func:`time_cases` (same keyword arguments)."""
    return time_cases({"fn": Case(fn)}, **kwargs)["fn"]


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run with ``torch.set_num_threads(threads)`` (None: torch's default), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
