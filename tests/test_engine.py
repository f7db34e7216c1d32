"""Numerics of the shared engine against ``torch.nn.BatchNorm2d`` and a float64 NumPy reference.

Two independent oracles (STYLE rule 8):

* ``nn.BatchNorm2d`` itself, fed the same tensor in the same memory format. The engine calls
  the module on inputs below its fast paths' sizes (bncli/fastpath.py: 2**17 values for NCHW
  batch statistics, 256 pixels for channels-last), so there outputs and state must be
  bit-identical, for every dtype. Larger batches take the fast paths and are compared with
  tight tolerances (here and in tests/test_engine_fastpath.py).
* :mod:`reference` (float64 NumPy, written from the formula). Against it, float32 outputs must
  agree to about 1e-6 relative and float64 to about 1e-12; cases where PyTorch's own kernels
  miss that are marked ``xfail`` with the measured error, not hidden behind a loose tolerance.

Tolerances are relative to each channel's output scale (its RMS), see ``assert_close_scaled``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import ReferenceBatchNorm2d, batch_moments
from torch import nn

from bncli import core, engine, fastpath, io
from bncli.engine import BatchNormConfig, BatchNormEngine, resolve_device, validate_input
from bncli.errors import DeviceError, DTypeError, ShapeError, StateError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "nhwc", "channels_last"]  # channels_last: an NCHW tensor in channels_last memory
SEEDS = [0, 1]
OPTIONS = {
    "default": dict(eps=1e-5, momentum=0.1, affine=True, track_running_stats=True),
    "m0.3-eps1e-3": dict(eps=1e-3, momentum=0.3, affine=True, track_running_stats=True),
    "cma": dict(eps=1e-5, momentum=None, affine=True, track_running_stats=True),
    "cma-noaffine-eps1e-4": dict(eps=1e-4, momentum=None, affine=False, track_running_stats=True),
    "m1.0-noaffine-eps0.1": dict(eps=0.1, momentum=1.0, affine=False, track_running_stats=True),
    "notrack": dict(eps=1e-5, momentum=0.1, affine=True, track_running_stats=False),
    "notrack-noaffine-eps1e-2": dict(eps=1e-2, momentum=0.1, affine=False, track_running_stats=False),
}
# eval with the initial (random) running stats, three train steps, eval with the updated stats;
# every step a different (N, H, W).
STEPS = [("eval", (3, 4, 5)), ("train", (4, 3, 3)), ("train", (2, 6, 2)), ("train", (7, 1, 4)),
         ("eval", (5, 2, 3))]

# Output tolerances against the float64 reference, relative to the channel's output scale.
# float32/float64: the quality bar (about 1e-6 / 1e-12). float16/bfloat16: the output is
# rounded to 11 / 8 significant bits, i.e. up to 2**-11 / 2**-8 relative, plus that of the input.
REF_TOLS = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# Running stats (O(1) values here) against the reference: float32 state is stored in float32
# (2**-24 relative per step); float16/bfloat16 inputs keep float32 state, as nn.BatchNorm2d does.
STATE_TOLS = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=1e-6, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-6, atol=1e-6),
}
# The NHWC route is where the engine's channels-last fast path replaces the module call (for
# large batches with few channels; the small batches of test_matches_nn_batchnorm2d still go
# straight to the module and are bit-identical today). A different kernel rounds differently:
# allow what PyTorch's own channels_last and contiguous kernels differ by on small batches (a
# few float32 ulps of the statistics), and one output rounding (2**-10 / 2**-7 relative) for
# the half types. State: as against the reference.
NHWC_TOLS = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
EXACT = dict(rtol=0.0, atol=0.0)


# -- helpers ----------------------------------------------------------------------------------
def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state dtype bncli (core.build_engine) and nn.BatchNorm2d use for this input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_batch(gen: torch.Generator, n: int, c: int, h: int, w: int, dtype: torch.dtype, *,
               offset: float | torch.Tensor = 0.0, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """A contiguous NCHW batch drawn in float64, then rounded to ``dtype``."""
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    if isinstance(offset, torch.Tensor):
        offset = offset.view(1, c, 1, 1)
    if isinstance(scale, torch.Tensor):
        scale = scale.view(1, c, 1, 1)
    return (x * scale + offset).to(dtype)


def to_layout(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, str]:
    """What the engine is given for a contiguous NCHW ``x``, and the engine's layout argument."""
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1).contiguous(), "nhwc"
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last), "nchw"
    return x, "nchw"


def module_input(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as the module sees them: NHWC arrays become a channels_last NCHW view."""
    engine_x, _ = to_layout(x, layout)
    return engine_x.permute(0, 3, 1, 2) if layout == "nhwc" else engine_x


def as_nchw(y: torch.Tensor, layout: str) -> torch.Tensor:
    return y.permute(0, 3, 1, 2) if layout == "nhwc" else y


def random_state(gen: torch.Generator, c: int, opts: dict) -> dict[str, torch.Tensor]:
    """A non-trivial initial state: weights of both signs, running stats away from 0 / 1."""
    state: dict[str, torch.Tensor] = {}
    if opts["affine"]:
        sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)
        state["weight"] = sign * (0.5 + 1.5 * torch.rand(c, generator=gen))
        state["bias"] = torch.randn(c, generator=gen)
    if opts["track_running_stats"]:
        state["running_mean"] = 0.5 * torch.randn(c, generator=gen)
        state["running_var"] = 0.5 + torch.rand(c, generator=gen)
        state["num_batches_tracked"] = torch.randint(0, 4, (), generator=gen)
    return state


def make_pair(c: int, opts: dict, dtype: torch.dtype, state: dict[str, torch.Tensor],
              device: str = "cpu") -> tuple[BatchNormEngine, nn.BatchNorm2d]:
    """An engine and an nn.BatchNorm2d with the same configuration and initial state."""
    pdt = param_dtype(dtype)
    module = nn.BatchNorm2d(c, **opts, device=device, dtype=pdt)
    module.load_state_dict({k: v.to(pdt) if v.is_floating_point() else v for k, v in state.items()})
    eng = BatchNormEngine(BatchNormConfig(c, **opts), device=device, param_dtype=pdt)
    assert eng.load_state(state) == []
    return eng, module


def channel_scale(expected: torch.Tensor) -> torch.Tensor:
    """Per-channel RMS of an NCHW float64 tensor, shaped (1, C, 1, 1); never 0."""
    rms = expected.pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt()
    return rms.clamp_min(torch.finfo(torch.float64).tiny)


def max_rel_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max |actual - expected| / (channel RMS of expected): the number the bar is about."""
    exp = torch.from_numpy(expected)
    return float(((actual.detach().cpu().double() - exp).abs() / channel_scale(exp)).max())


def assert_close_scaled(actual: torch.Tensor, expected: np.ndarray, *, rtol: float, atol: float) -> None:
    """``|a - e| <= rtol * |e| + atol * s_c`` elementwise, ``s_c`` the channel's output RMS.

    A plain absolute ``atol`` would be too loose for channels with a small weight and too
    tight for a large one; dividing both sides by ``s_c`` makes ``atol`` relative to the output
    scale while keeping assert_close's report of the worst element.
    """
    exp = torch.from_numpy(expected)
    s = channel_scale(exp)
    torch.testing.assert_close(actual.detach().cpu().double() / s, exp / s, rtol=rtol, atol=atol)


def assert_state_matches_reference(state: dict[str, torch.Tensor], ref: ReferenceBatchNorm2d,
                                   tols: dict) -> None:
    want = ref.state()
    assert set(state) == set(want)
    for key, value in want.items():
        if key == "num_batches_tracked":
            assert state[key].dtype == torch.int64
            assert int(state[key]) == value
        else:
            torch.testing.assert_close(state[key].double(), torch.from_numpy(value), **tols, msg=key)


# -- 1. engine vs nn.BatchNorm2d ------------------------------------------------------------
def run_module_comparison(seed: int, dtype: torch.dtype, layout: str, opts: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    c = 3 + seed
    eng, module = make_pair(c, opts, dtype, random_state(gen, c, opts), device)
    offset, scale = torch.randn(c, generator=gen), 0.5 + 2 * torch.rand(c, generator=gen)
    exact = layout != "nhwc"
    out_tols = EXACT if exact else NHWC_TOLS[dtype]
    state_tols = EXACT if exact else STATE_TOLS[dtype]
    for mode, (n, h, w) in STEPS:
        x = make_batch(gen, n, c, h, w, dtype, offset=offset, scale=scale).to(device)
        engine_x, engine_layout = to_layout(x, layout)
        y = eng.apply(engine_x, mode=mode, layout=engine_layout)
        assert y.shape == engine_x.shape and y.dtype == dtype and y.device.type == device
        module.train(mode == "train")
        with torch.no_grad():
            want = module(module_input(x, layout))
        torch.testing.assert_close(as_nchw(y, layout), want, **out_tols, msg=f"output, {mode} step")
        got_state, want_state = eng.state_dict(), module.state_dict()
        assert list(got_state) == list(want_state)
        for key, value in want_state.items():
            assert got_state[key].dtype == value.dtype, key
            tols = EXACT if key == "num_batches_tracked" else state_tols
            torch.testing.assert_close(got_state[key], value.cpu(), **tols, msg=f"{key}, {mode} step")


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_nn_batchnorm2d(seed: int, dtype: torch.dtype, layout: str, opts: dict) -> None:
    """Outputs and the whole state_dict equal the module's over eval/train/train/train/eval."""
    run_module_comparison(seed, dtype, layout, opts, "cpu")


# -- 2. engine vs the float64 NumPy reference -----------------------------------------------
def run_reference_comparison(seed: int, dtype: torch.dtype, layout: str, opts: dict, device: str) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    c = 4 + seed
    state = random_state(gen, c, opts)
    eng = BatchNormEngine(BatchNormConfig(c, **opts), device=device, param_dtype=param_dtype(dtype))
    eng.load_state(state)
    # The reference starts from the state as the engine stores it (float32 for non-float64 data).
    ref = ReferenceBatchNorm2d(c, **opts, state={k: v.numpy() for k, v in eng.state_dict().items()})
    offset, scale = 0.5 * torch.randn(c, generator=gen), 0.5 + 1.5 * torch.rand(c, generator=gen)
    for mode, (n, h, w) in STEPS:
        x = make_batch(gen, n, c, h, w, dtype, offset=offset, scale=scale)
        engine_x, engine_layout = to_layout(x.to(device), layout)
        y = as_nchw(eng.apply(engine_x, mode=mode, layout=engine_layout), layout)
        want = ref.forward(x.double().numpy(), training=mode == "train")
        assert_close_scaled(y, want, **REF_TOLS[dtype])
        assert_state_matches_reference(eng.state_dict(), ref, STATE_TOLS[dtype])


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_float64_reference(seed: int, dtype: torch.dtype, layout: str, opts: dict) -> None:
    """Ordinary data (|mean| ~ std): outputs and running stats within the per-dtype bar."""
    run_reference_comparison(seed, dtype, layout, opts, "cpu")


# Precision at the bar, per layout, batch size and mean offset (std 1), C = 8. Measured on this
# CPU build (torch 2.13), max |y - ref| / output RMS over train and eval, range over 6 seeds:
#                                N*H*W: 100              4096                  32768
#   float32 NCHW           mean 0:      2.1e-7..4.0e-7  3.6e-7..5.3e-7        4.3e-7..5.7e-7 (*)
#                          mean 3:      3.1e-7..3.9e-7  4.1e-7..5.4e-7        5.1e-7..8.1e-7 (*)
#                          mean 1000:   3.3e-5..8.7e-5  (one float32 ulp of 1000 is 6e-5 of the std)
#   float32 NHWC / channels_last
#                          mean 0:      2.7e-7..4.0e-7  3.4e-7..4.4e-7 (*)    4.1e-7..5.7e-7 (*)
#                          mean 3:      5.4e-7..7.4e-7  3.5e-7..5.4e-7 (*)    4.4e-7..5.8e-7 (*)
#                          mean 1000:   1.3e-4..2.4e-4  4.8e-5..6.0e-5 (*)    3.6e-5..4.7e-5 (*)
#   float64 any layout     mean 0 or 3: <= 1.3e-14
#   float64 NCHW           mean 1000:   <= 7.5e-13      2.3e-12..3.0e-12      5.6e-14..2.8e-13 (*)
#   float64 NHWC / cl      mean 1000:   <= 4.9e-13      2.5e-13..3.9e-13 (*)  4.9e-13..9.5e-13 (*)
# (*): the engine's fast paths (bncli/fastpath.py). Without them PyTorch's channels-last CPU
# kernel, which sums the statistics in float32, misses the bar from 256 pixels up (8.4e-7 ..
# 4.3e-6 at 4096, 1.6e-5 at 32768, 2.9e-3 at mean 1000). At mean 1000 no float32 statistics or
# y = x * a + b can meet it. The misses are findings, kept visible as xfail (strict where the
# worst seed misses by 1.5x or more).
SMALL, LARGE, FAST = (4, 5, 5), (16, 16, 16), (8, 64, 64)  # (N, H, W)
CHANNELS_LAST = ("nhwc", "channels_last")
PRECISION_MISSES: dict[tuple, tuple[str, bool]] = {
    **{(torch.float32, layout, 1000.0, size): ("3.3e-5 .. 2.4e-4, float32 resolution at 1000", True)
       for layout in LAYOUTS for size in (SMALL, LARGE, FAST)},
    (torch.float64, "nchw", 1000.0, LARGE): ("2.3e-12 .. 3.0e-12, float64 resolution at 1000", True),
}


def _precision_case(dtype: torch.dtype, layout: str, offset: float, size: tuple[int, int, int]) -> object:
    key = (dtype, layout, offset, size)
    marks = []
    if key in PRECISION_MISSES:
        measured, strict = PRECISION_MISSES[key]
        marks = [pytest.mark.xfail(reason=f"finding: measured {measured}", strict=strict)]
    name = f"{str(dtype).replace('torch.', '')}-{layout}-mean{offset:g}-NHW{size[0] * size[1] * size[2]}"
    return pytest.param(dtype, layout, offset, size, marks=marks, id=name)


PRECISION_CASES = [_precision_case(dtype, layout, offset, size)
                   for dtype in (torch.float32, torch.float64) for layout in LAYOUTS
                   for offset in (0.0, 3.0, 1000.0) for size in (SMALL, LARGE, FAST)]


def precision_errors(dtype: torch.dtype, layout: str, offset: float, size: tuple[int, int, int],
                     seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, float]:
    """Worst scaled error vs the reference of a train step, then eval with the updated stats."""
    errors: dict[str, float] = {"train": 0.0, "eval": 0.0}
    for seed in seeds:
        for mode, err in _precision_errors(dtype, layout, offset, size, seed).items():
            errors[mode] = max(errors[mode], err)
    return errors


def _precision_errors(dtype: torch.dtype, layout: str, offset: float, size: tuple[int, int, int],
                      seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    n, h, w = size
    x = make_batch(gen, n, 8, h, w, dtype, offset=offset, scale=1.0)
    # momentum=None from num_batches_tracked=0: the first step sets the running stats to the
    # batch's own, so eval sees data at the same offset and scale as train.
    eng = BatchNormEngine(BatchNormConfig(8, momentum=None), param_dtype=param_dtype(dtype))
    ref = ReferenceBatchNorm2d(8, momentum=None)
    errors = {}
    for mode in ("train", "eval"):
        engine_x, engine_layout = to_layout(x, layout)
        y = as_nchw(eng.apply(engine_x, mode=mode, layout=engine_layout), layout)
        errors[mode] = max_rel_error(y, ref.forward(x.double().numpy(), training=mode == "train"))
    return errors


@pytest.mark.parametrize(("dtype", "layout", "offset", "size"), PRECISION_CASES)
def test_precision_bar(dtype: torch.dtype, layout: str, offset: float, size: tuple[int, int, int]) -> None:
    """float32 within 1e-6 and float64 within 1e-12 of the reference, relative to the output scale."""
    bar = 1e-6 if dtype == torch.float32 else 1e-12
    errors = precision_errors(dtype, layout, offset, size, seeds=(0,) if size == FAST else (0, 1, 2))
    assert max(errors.values()) <= bar, errors


@pytest.mark.parametrize("size", [LARGE, FAST], ids=["NHW4096", "NHW32768"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_large_offset_has_no_catastrophic_cancellation(dtype: torch.dtype, layout: str,
                                                       size: tuple[int, int, int]) -> None:
    """Mean 1000, std 1: error bounded by the input's resolution, not ruined by cancellation.

    A one-pass ``E[x^2] - E[x]^2`` variance (a tempting fast path) loses ~1000**2 * 2**-24
    = 0.06 of the variance in float32; two-pass statistics stay near one ulp of 1000 (6e-5)
    per element, and the module's channels-last kernel within ~50 ulps on these batches.
    """
    bound = 64 * torch.finfo(dtype).eps * 1000.0  # 7.6e-3 (float32), 1.4e-11 (float64)
    errors = precision_errors(dtype, layout, 1000.0, size, seeds=(0,))
    assert max(errors.values()) <= bound, errors


# Batches big enough for the engine's channels-last routes (C <= 15; batch statistics from 256
# pixels, eval from 2**18 values; N = 8 reaches both). There the engine does not call the module
# on the tensor as given, so the comparison is with tolerances: against the reference at the bar,
# and against the module fed a contiguous NCHW copy (its accurate kernel: the module's own
# channels-last kernel is 5e-6 .. 1.3e-5 off at this size, see the table above) within NHWC_TOLS.
FAST_HW = {3: (96, 128), 8: (64, 64)}


def fast_path_engaged(x: torch.Tensor, mode: str) -> bool:
    return fastpath.choose(x, batch_stats=mode == "train") is not None


@pytest.mark.parametrize("c", [3, 8])
@pytest.mark.parametrize("opts", [OPTIONS[k] for k in ("default", "cma", "notrack-noaffine-eps1e-2")],
                         ids=["default", "cma", "notrack-noaffine"])
@pytest.mark.parametrize("layout", ["nhwc", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_large_channels_last_batches(dtype: torch.dtype, layout: str, opts: dict, c: int) -> None:
    """train, train, eval through the fast path: reference bar, module within NHWC_TOLS, state."""
    gen = torch.Generator().manual_seed(c)
    state = random_state(gen, c, opts)
    eng, module = make_pair(c, opts, dtype, state)
    ref = ReferenceBatchNorm2d(c, **opts, state={k: v.numpy() for k, v in eng.state_dict().items()})
    offset, scale = torch.randn(c, generator=gen), 0.5 + 2 * torch.rand(c, generator=gen)
    h, w = FAST_HW[c]
    for mode, n in (("train", 6), ("train", 8), ("eval", 8)):
        x = make_batch(gen, n, c, h, w, dtype, offset=offset, scale=scale)
        engine_x, engine_layout = to_layout(x, layout)
        # The fast path runs for every train step (or this test covers nothing new); at C=8 the
        # eval step stays on the module, which measured faster there (bncli bench), bitwise anyway.
        uses_batch_stats = mode == "train" or not opts["track_running_stats"]
        assert fast_path_engaged(module_input(x, layout), "train" if uses_batch_stats else "eval") or (
            mode == "eval" and c == 8)
        y = as_nchw(eng.apply(engine_x, mode=mode, layout=engine_layout), layout)
        assert y.dtype == dtype
        assert_close_scaled(y, ref.forward(x.double().numpy(), training=mode == "train"), **REF_TOLS[dtype])
        assert_state_matches_reference(eng.state_dict(), ref, STATE_TOLS[dtype])
        module.train(mode == "train")
        with torch.no_grad():
            torch.testing.assert_close(y, module(x), **NHWC_TOLS[dtype], msg=f"vs module, {mode}")
        torch.testing.assert_close(eng.state_dict(), module.state_dict(), **STATE_TOLS[dtype])


@pytest.mark.parametrize("c", [3, 8])
@pytest.mark.parametrize("layout", ["nhwc", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_large_channels_last_eval_is_bitwise_the_module(dtype: torch.dtype, layout: str, c: int) -> None:
    """Eval with running stats is elementwise: any route must give the module's bits."""
    gen = torch.Generator().manual_seed(10 + c)
    opts = OPTIONS["default"]
    eng, module = make_pair(c, opts, dtype, random_state(gen, c, opts))
    h, w = FAST_HW[c]
    x = make_batch(gen, 8, c, h, w, dtype, offset=1.0, scale=2.0)
    engine_x, engine_layout = to_layout(x, layout)
    y = as_nchw(eng.apply(engine_x, mode="eval", layout=engine_layout), layout)
    with torch.no_grad():
        torch.testing.assert_close(y, module.eval()(module_input(x, layout)), **EXACT)


# -- 3. the streaming methods ---------------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_apply_with_stats_equals_train_apply(affine: bool, dtype: torch.dtype, layout: str) -> None:
    """Exact float64 batch stats applied chunk-wise give the train-mode output, state untouched."""
    gen = torch.Generator().manual_seed(3)
    c = 5
    opts = dict(OPTIONS["default"], affine=affine)
    x = make_batch(gen, 6, c, 4, 5, dtype, offset=torch.randn(c, generator=gen), scale=2.0)
    eng = BatchNormEngine(BatchNormConfig(c, **opts), param_dtype=param_dtype(dtype))
    eng.load_state(random_state(gen, c, opts))
    before = eng.state_dict()
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    engine_x, engine_layout = to_layout(x, layout)
    axis = 0  # chunks along N, as the out-of-core reader yields them
    chunks = [eng.apply_with_stats(part, mean, var, layout=engine_layout)
              for part in torch.split(engine_x, [1, 3, 2], dim=axis)]
    streamed = as_nchw(torch.cat(chunks, dim=axis), layout)
    assert streamed.dtype == dtype
    torch.testing.assert_close(eng.state_dict(), before, **EXACT)
    # Elementwise with the same per-channel scale/shift: chunking cannot change a bit.
    whole = as_nchw(eng.apply_with_stats(engine_x, mean, var, layout=engine_layout), layout)
    torch.testing.assert_close(streamed, whole, **EXACT)
    # Against train mode, which computes its own statistics: both are within the bar of the
    # exact result, so they agree to twice the bar.
    train = as_nchw(eng.apply(engine_x, mode="train", layout=engine_layout), layout)
    tols = {k: 2 * v for k, v in REF_TOLS[dtype].items()}
    assert_close_scaled(streamed, train.double().numpy(), **tols)
    w = eng.state_dict().get("weight")
    b = eng.state_dict().get("bias")
    want = (x.double() - mean.view(1, c, 1, 1)) / (var.view(1, c, 1, 1) + opts["eps"]).sqrt()
    if affine:
        want = want * w.double().view(1, c, 1, 1) + b.double().view(1, c, 1, 1)
    assert_close_scaled(streamed, want.numpy(), **REF_TOLS[dtype])


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_update_running_stats_matches_module(dtype: torch.dtype, momentum: float | None, steps: int) -> None:
    """update_running_stats(exact stats) = the module's train-mode update, step by step.

    num_batches_tracked is compared exactly. The running stats agree to the statistics'
    rounding: the module forms the batch mean in float32 for float32 data, the streaming path
    gets it exact in float64, so they may differ by a couple of float32 ulps (measured at most
    2.4e-7 relative) and a few float64 ulps for float64.
    """
    gen = torch.Generator().manual_seed(11)
    c = 6
    opts = dict(OPTIONS["default"], momentum=momentum)
    state = random_state(gen, c, opts)
    module = nn.BatchNorm2d(c, momentum=momentum, dtype=dtype)
    module.load_state_dict(state)
    eng = BatchNormEngine(BatchNormConfig(c, momentum=momentum), param_dtype=dtype)
    eng.load_state(state)
    ref = ReferenceBatchNorm2d(c, momentum=momentum, state={k: v.to(dtype).numpy() for k, v in state.items()})
    tols = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-14, atol=1e-15)
    for step in range(steps):
        x = make_batch(gen, 2 + step, c, 3, 4, dtype, offset=1.0, scale=2.0)
        module.train()(x)
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
        count = x.numel() // c
        assert eng.update_running_stats(mean, var, count) is None
        ref.update(*batch_moments(x.double().numpy()), count)
        got, want = eng.state_dict(), module.state_dict()
        assert int(got["num_batches_tracked"]) == int(want["num_batches_tracked"]) == ref.num_batches_tracked
        torch.testing.assert_close(got["weight"], want["weight"], **EXACT)
        for key in ("running_mean", "running_var"):
            assert got[key].dtype == dtype
            torch.testing.assert_close(got[key], want[key], **tols, msg=f"{key} vs module, step {step + 1}")
            torch.testing.assert_close(got[key].double(), torch.from_numpy(getattr(ref, key)), **STATE_TOLS[dtype],
                                       msg=f"{key} vs reference, step {step + 1}")


def test_streaming_step_reproduces_train_apply() -> None:
    """apply_with_stats + update_running_stats is one train step of apply, output and state."""
    gen = torch.Generator().manual_seed(5)
    c = 4
    x = make_batch(gen, 5, c, 3, 3, torch.float32, offset=0.5, scale=1.5)
    state = random_state(gen, c, OPTIONS["cma"])
    streaming = BatchNormEngine(BatchNormConfig(c, momentum=None))
    direct = BatchNormEngine(BatchNormConfig(c, momentum=None))
    streaming.load_state(state)
    direct.load_state(state)
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    y_stream = streaming.apply_with_stats(x, mean, var)
    streaming.update_running_stats(mean, var, x.numel() // c)
    y_direct = direct.apply(x, mode="train")
    torch.testing.assert_close(y_stream, y_direct, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(streaming.state_dict(), direct.state_dict(), rtol=1e-6, atol=1e-7)


def test_update_running_stats_without_tracking_is_a_no_op() -> None:
    eng = BatchNormEngine(BatchNormConfig(3, track_running_stats=False))
    before = eng.state_dict()
    eng.update_running_stats(torch.zeros(3), torch.ones(3), 1)  # count 1 is fine: nothing to update
    torch.testing.assert_close(eng.state_dict(), before, **EXACT)


def test_streaming_rejects_bad_arguments() -> None:
    eng = BatchNormEngine(BatchNormConfig(3))
    with pytest.raises(ShapeError, match="Expected more than 1 value per channel"):
        eng.update_running_stats(torch.zeros(3), torch.ones(3), 1)
    # A scalar would broadcast into every channel.
    with pytest.raises(StateError, match=r"batch mean has shape \(\)"):
        eng.update_running_stats(torch.tensor(0.0), torch.ones(3), 10)
    with pytest.raises(StateError, match=r"batch var has shape \(4,\).*num_features=3"):
        eng.apply_with_stats(torch.randn(2, 3, 2, 2), torch.zeros(3), torch.ones(4))
    # A channel mismatch is the engine's ShapeError, not F.batch_norm's RuntimeError.
    with pytest.raises(ShapeError, match="4 channels on its axis 1"):
        eng.apply_with_stats(torch.randn(2, 4, 2, 2), torch.zeros(3), torch.ones(3))
    with pytest.raises(DTypeError, match="int64"):
        eng.apply_with_stats(torch.ones(2, 3, 2, 2, dtype=torch.int64), torch.zeros(3), torch.ones(3))
    # One value per channel is fine: the statistics are given.
    y = eng.apply_with_stats(torch.full((1, 3, 1, 1), 2.0), torch.ones(3), torch.full((3,), 4.0))
    torch.testing.assert_close(y, torch.full((1, 3, 1, 1), 1 / (4 + 1e-5) ** 0.5))
    assert int(eng.state_dict()["num_batches_tracked"]) == 0


# -- 4. errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "pattern"), [
    ((3, 8, 8), r"4D \(N, C, H, W\) input, got 3D shape \(3, 8, 8\)"),
    ((2, 3, 4, 8, 8), r"got 5D shape \(2, 3, 4, 8, 8\)"),
    ((), r"got 0D shape \(\)"),
])
def test_validate_input_rank(shape: tuple[int, ...], pattern: str) -> None:
    with pytest.raises(ShapeError, match=pattern) as info:
        validate_input(shape, torch.float32, 3, "train")
    assert "check-shape" in (info.value.hint or "")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64])
def test_validate_input_dtype(dtype: torch.dtype) -> None:
    name = str(dtype).replace("torch.", "")
    with pytest.raises(DTypeError, match=f"floating-point input, got dtype {name}") as info:
        validate_input((2, 3, 4, 4), dtype, 3, "eval")
    assert "astype('float32')" in (info.value.hint or "")


def test_validate_input_channel_mismatch() -> None:
    with pytest.raises(ShapeError, match=r"4 channels on its axis 1 \(NCHW\) \(shape \(2, 4, 5, 5\)\), "
                                         r"but the BatchNorm2d layer has num_features=3") as info:
        validate_input((2, 4, 5, 5), torch.float32, 3, "train")
    assert "--layout" in (info.value.hint or "")
    with pytest.raises(ShapeError, match=r"5 channels on its last axis \(NHWC\)"):
        validate_input((2, 4, 4, 5), torch.float32, 4, "train", "nhwc")
    validate_input((2, 4, 4, 5), torch.float32, 5, "train", "nhwc")  # the right layout passes


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_validate_input_empty(shape: tuple[int, ...], mode: str) -> None:
    with pytest.raises(ShapeError, match=r"empty: shape .* has a zero-size axis"):
        validate_input(shape, torch.float32, 3, mode)


@pytest.mark.parametrize(("shape", "layout"), [((1, 3, 1, 1), "nchw"), ((1, 1, 1, 3), "nhwc")])
def test_validate_input_one_value_per_channel(shape: tuple[int, ...], layout: str) -> None:
    with pytest.raises(ShapeError, match=r"Expected more than 1 value per channel when training, "
                                         r"got input size torch.Size\(\[1, 3, 1, 1\]\)") as info:
        validate_input(shape, torch.float32, 3, "train", layout)
    assert "--mode eval" in (info.value.hint or "")
    validate_input(shape, torch.float32, 3, "eval", layout)  # running stats: fine
    validate_input((2, 3, 1, 1), torch.float32, 3, "train", "nchw")  # N*H*W = 2: fine


def test_apply_raises_the_engine_errors_not_torch_ones() -> None:
    eng = BatchNormEngine(BatchNormConfig(3))
    with pytest.raises(ShapeError):
        eng.apply(torch.randn(3, 4, 4))
    with pytest.raises(ShapeError, match="Expected more than 1 value per channel"):
        eng.apply(torch.randn(1, 3, 1, 1), mode="train")
    assert eng.apply(torch.randn(1, 3, 1, 1), mode="eval").shape == (1, 3, 1, 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        eng.apply(torch.randn(2, 3, 2, 2), mode="test")
    with pytest.raises(ValueError, match="layout must be one of"):
        eng.apply(torch.randn(2, 3, 2, 2), layout="chwn")
    assert int(eng.state_dict()["num_batches_tracked"]) == 0  # nothing was applied in train mode


def test_eval_without_running_stats_needs_a_batch() -> None:
    """No running stats: eval uses batch statistics, so N*H*W = 1 fails as in train mode."""
    eng = BatchNormEngine(BatchNormConfig(3, track_running_stats=False))
    with pytest.raises(ShapeError, match="eval mode also uses batch statistics") as info:
        eng.apply(torch.randn(1, 3, 1, 1), mode="eval")
    assert "--track-running-stats" in (info.value.hint or "")
    with pytest.raises(ShapeError, match="eval mode also uses batch statistics"):
        eng.apply(torch.randn(1, 1, 1, 3), mode="eval", layout="nhwc")
    assert eng.apply(torch.randn(1, 3, 2, 1), mode="eval").shape == (1, 3, 2, 1)


def test_load_state_rejects_bad_tensors_and_loads_nothing() -> None:
    eng = BatchNormEngine(BatchNormConfig(3))
    before = eng.state_dict()
    good_weight = torch.full((3,), 5.0)
    with pytest.raises(StateError, match=r"'running_mean' has shape \(4,\), but the input has 3 channels "
                                         r"\(expected shape \(3,\)\)") as info:
        eng.load_state({"weight": good_weight, "running_mean": torch.zeros(4)}, source="bn.pt")
    assert "--prefix" in (info.value.hint or "")
    with pytest.raises(StateError, match="bn.pt: running_var has negative entries"):
        eng.load_state({"weight": good_weight, "running_var": torch.tensor([1.0, -0.5, 1.0])}, source="bn.pt")
    with pytest.raises(StateError, match=r"num_batches_tracked has shape \(2,\), expected a scalar"):
        eng.load_state({"num_batches_tracked": torch.tensor([1, 2])})
    with pytest.raises(StateError, match="num_batches_tracked is -1"):
        eng.load_state({"weight": good_weight, "num_batches_tracked": torch.tensor(-1)})
    with pytest.raises(StateError, match="'bias' is a list, not a tensor"):
        eng.load_state({"bias": [0.0, 0.0, 0.0]})
    with pytest.raises(StateError, match=r"'weight' has shape \(3, 1\)"):
        eng.load_state({"weight": torch.ones(3, 1)})
    # A refused state leaves none of its tensors behind (the good weight came first).
    torch.testing.assert_close(eng.state_dict(), before, **EXACT)


def test_load_state_and_set_affine() -> None:
    eng = BatchNormEngine(BatchNormConfig(2, affine=False))
    ignored = eng.load_state({"weight": torch.ones(2), "running_mean": torch.tensor([1.0, 2.0]),
                              "num_batches_tracked": torch.tensor(7.0)})
    assert ignored == ["weight"]
    state = eng.state_dict()
    assert state["num_batches_tracked"].dtype == torch.int64 and int(state["num_batches_tracked"]) == 7
    with pytest.raises(StateError, match="--weight was given, but affine is off"):
        eng.set_affine(weight=torch.ones(2))
    eng = BatchNormEngine(BatchNormConfig(2))
    eng.set_affine(weight=torch.tensor([2.0, 3.0], dtype=torch.float64), bias=torch.tensor([1.0, -1.0]))
    y = eng.apply(torch.zeros(1, 2, 1, 1), mode="eval")
    torch.testing.assert_close(y.flatten(), torch.tensor([1.0, -1.0]))
    with pytest.raises(StateError, match=r"--bias: 'bias' has shape \(3,\)"):
        eng.set_affine(bias=torch.zeros(3))


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_resolve_device_without_gpu(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceError, match=rf"Device '{name}' is not available on this machine: "
                                          r"torch.cuda.is_available\(\) is False") as info:
        resolve_device(name)
    assert "Available here: cpu" in (info.value.hint or "")
    assert "--device auto" in (info.value.hint or "")


def test_resolve_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(DeviceError, match="Unknown device 'gpu0'") as info:
        resolve_device("gpu0")
    assert "cpu" in (info.value.hint or "") and "auto" in (info.value.hint or "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_resolve_device_cuda_really_unavailable() -> None:
    with pytest.raises(DeviceError, match="not available") as info:
        resolve_device("cuda")
    assert "Available here: cpu" in (info.value.hint or "")


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    (dict(eps=0.0), StateError, "eps must be a positive finite number, got 0.0"),
    (dict(eps=-1e-5), StateError, "eps must be a positive finite number"),
    (dict(eps=float("nan")), StateError, "eps must be a positive finite number, got nan"),
    (dict(eps=float("inf")), StateError, "eps must be a positive finite number, got inf"),
    (dict(momentum=-0.1), StateError, r"momentum must lie in \[0, 1\] or be None, got -0.1"),
    (dict(momentum=1.5), StateError, "momentum must lie in"),
    (dict(momentum=float("nan")), StateError, "momentum must lie in"),
    (dict(num_features=0), ShapeError, "num_features must be at least 1, got 0"),
])
def test_config_rejects_bad_values(kwargs: dict, error: type, pattern: str) -> None:
    args = dict(num_features=3, **kwargs) if "num_features" not in kwargs else kwargs
    with pytest.raises(error, match=pattern) as info:
        BatchNormConfig(**args)
    assert info.value.hint


@pytest.mark.parametrize("momentum", [0.0, 1.0, None])
def test_config_accepts_edge_values(momentum: float | None) -> None:
    assert BatchNormConfig(1, eps=1e-12, momentum=momentum).momentum == momentum


# -- 5. state round trip and layer selection ----------------------------------------------------
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_state_dict_round_trips_into_nn_batchnorm2d(dtype: torch.dtype, opts: dict) -> None:
    gen = torch.Generator().manual_seed(21)
    c = 3
    eng = BatchNormEngine(BatchNormConfig(c, **opts), param_dtype=dtype)
    eng.load_state(random_state(gen, c, opts))
    for n in (4, 2):
        eng.apply(make_batch(gen, n, c, 3, 3, dtype, offset=1.0), mode="train")
    module = nn.BatchNorm2d(c, **opts, dtype=dtype)
    result = module.load_state_dict(eng.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = make_batch(gen, 3, c, 4, 4, dtype, offset=-1.0)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), eng.apply(x, mode="eval"), **EXACT)
    # and back: a fresh engine loads the module's state and gives the same output again
    again = BatchNormEngine(BatchNormConfig(c, **opts), param_dtype=dtype)
    assert again.load_state(module.state_dict()) == []
    torch.testing.assert_close(again.apply(x, mode="eval"), eng.apply(x, mode="eval"), **EXACT)


@pytest.fixture
def model() -> nn.Sequential:
    """Conv2d + BatchNorm2d(4) + ReLU + Conv2d + BatchNorm2d(6), with trained-looking BN state."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(5, 3, 6, 6) * 2 + 1)
        for bn in (net[1], net[4]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    return net.eval()


@pytest.fixture
def checkpoint(tmp_path: Path, model: nn.Sequential) -> Callable[..., Path]:
    """Save the model's state_dict as {wrapper: state_dict, "epoch": 3} (optionally "module."-keyed)."""

    def save(wrapper: str = "model", module_prefix: bool = False) -> Path:
        sd = {("module." if module_prefix else "") + k: v for k, v in model.state_dict().items()}
        path = tmp_path / f"{wrapper}-{module_prefix}.pt"
        torch.save({wrapper: sd, "epoch": 3}, path)
        return path

    return save


def test_bn_layers_and_select_layer_on_a_checkpoint(checkpoint: Callable[..., Path], model: nn.Sequential) -> None:
    flat = io.load_state_dict(checkpoint())
    assert "epoch" not in flat and "model.1.running_mean" in flat
    assert core.bn_layers(flat) == [("model.1", 4), ("model.4", 6)]
    for given, index in (("1", 1), ("model.4", 4), ("4.", 4)):
        layer, prefix = core.select_layer(flat, given, "ckpt.pt")
        assert prefix == f"model.{index}"
        assert set(layer) == set(engine.STATE_KEYS)
        torch.testing.assert_close(layer, dict(model[index].state_dict()), **EXACT)


@pytest.mark.parametrize(("wrapper", "module_prefix", "given"), [
    ("model", True, "1"),            # DataParallel inside {"model": ...}
    ("state_dict", True, "1"),       # the PyTorch ImageNet example's checkpoint
    ("state_dict", False, "module.1"),  # prefix copied from a DataParallel run
    ("model", True, "module.1"),
])
def test_select_layer_handles_module_prefix(checkpoint: Callable[..., Path], model: nn.Sequential,
                                            wrapper: str, module_prefix: bool, given: str) -> None:
    flat = io.load_state_dict(checkpoint(wrapper, module_prefix))
    layer, prefix = core.select_layer(flat, given, "ckpt.pt")
    assert prefix == f"{wrapper}.{'module.' if module_prefix else ''}1"
    torch.testing.assert_close(layer, dict(model[1].state_dict()), **EXACT)


def test_select_layer_bare_module_prefix(model: nn.Sequential) -> None:
    flat = {f"module.{k}": v for k, v in model.state_dict().items()}
    assert core.select_layer(flat, "4", "sd")[1] == "module.4"


def test_select_layer_errors_list_the_layers(checkpoint: Callable[..., Path]) -> None:
    flat = io.load_state_dict(checkpoint())
    with pytest.raises(StateError, match="ckpt.pt: no BatchNorm layer with prefix 'layer3'") as info:
        core.select_layer(flat, "layer3", "ckpt.pt")
    assert "BatchNorm layers in this file: model.1 [C=4], model.4 [C=6]" in (info.value.hint or "")
    with pytest.raises(StateError, match="holds 2 BatchNorm layers; which one") as info:
        core.select_layer(flat, None, "ckpt.pt")
    assert "model.1 [C=4], model.4 [C=6]" in (info.value.hint or "")
    with pytest.raises(StateError, match="no BatchNorm layer with prefix '0'") as info:
        core.select_layer(flat, "0", "ckpt.pt")  # the conv, not a BatchNorm
    no_bn = {k: v for k, v in flat.items() if k.startswith("model.0.")}
    with pytest.raises(StateError, match="holds no BatchNorm layer"):
        core.select_layer(no_bn, None, "conv.pt")


def test_select_layer_bare_state_dict() -> None:
    sd = nn.BatchNorm2d(5).state_dict()
    assert core.bn_layers(sd) == [("", 5)]
    layer, prefix = core.select_layer(sd, None, "bn.pt")
    assert prefix == "" and set(layer) == set(engine.STATE_KEYS)
    affine_only = nn.BatchNorm2d(5, track_running_stats=False).state_dict()
    assert core.select_layer(affine_only, None, "bn.pt")[0].keys() == {"weight", "bias"}


def test_build_engine_from_checkpoint_matches_the_model_layer(checkpoint: Callable[..., Path],
                                                              model: nn.Sequential) -> None:
    opts = core.EngineOptions(state=checkpoint("state_dict", True), prefix="4", momentum=0.2)
    eng, source = core.build_engine(opts, data_channels=None, data_dtype=torch.float32)
    assert eng.config.num_features == 6 and "state_dict.module.4" in source.description
    x = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(eng.apply(x, mode="eval"), model[4](x), **EXACT)


# -- 6. CUDA ---------------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("opts", [OPTIONS[k] for k in ("default", "cma", "notrack")],
                         ids=["default", "cma", "notrack"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seed", SEEDS)
@needs_gpu
@pytest.mark.cuda
def test_cuda_matches_nn_batchnorm2d(seed: int, dtype: torch.dtype, layout: str, opts: dict) -> None:
    run_module_comparison(seed, dtype, layout, opts, "cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@needs_gpu
@pytest.mark.cuda
def test_cuda_matches_float64_reference(dtype: torch.dtype, layout: str) -> None:
    run_reference_comparison(0, dtype, layout, OPTIONS["default"], "cuda")


@needs_gpu
@pytest.mark.cuda
def test_cuda_device_resolution_and_state_on_cpu() -> None:
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("auto").type == "cuda"
    eng = BatchNormEngine(BatchNormConfig(3), device=resolve_device("cuda"))
    y = eng.apply(torch.randn(4, 3, 2, 2), mode="train")  # a CPU input is moved to the engine's device
    assert y.device.type == "cuda"
    assert all(v.device.type == "cpu" for v in eng.state_dict().values())

