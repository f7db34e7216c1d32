"""The engine's CPU channels-last fast path equals nn.BatchNorm2d (see bncli/engine.py).

Eval mode is bitwise equal to the module on the same input. Train mode (and eval without
running stats) computes the batch statistics in another order, so it is compared with the
module on the same values in NCHW memory (the module's most accurate CPU path) at
torch.testing's default tolerances, and must be at least as close to a float64 reference
as the module's own channels-last path.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from bncli.engine import BatchNormConfig, BatchNormEngine, channels_last_fast_path

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TRAIN_SHAPE = (2, 3, 128, 128)  # 98k values: above the train threshold
EVAL_SHAPE = (2, 3, 256, 256)  # 393k values: above the eval threshold


def channels_last(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def pair(c: int, dtype: torch.dtype, *, momentum: float | None = 0.1, affine: bool = True,
         track: bool = True, seed: int = 1) -> tuple[BatchNormEngine, nn.BatchNorm2d]:
    """An engine and a plain module with the same random state."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    engine = BatchNormEngine(BatchNormConfig(c, momentum=momentum, affine=affine, track_running_stats=track),
                             param_dtype=param)
    gen = torch.Generator().manual_seed(seed)
    state = {"weight": torch.rand(c, generator=gen) + 0.5, "bias": torch.rand(c, generator=gen) - 0.5,
             "running_mean": torch.rand(c, generator=gen) - 0.5, "running_var": torch.rand(c, generator=gen) + 0.5,
             "num_batches_tracked": torch.tensor(3)}
    engine.load_state(state)
    module = nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track, dtype=param)
    module.load_state_dict(engine.module.state_dict())
    return engine, module


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_eval_is_bitwise_the_module(dtype: torch.dtype, affine: bool, layout: str) -> None:
    x = channels_last(EVAL_SHAPE, dtype)
    assert channels_last_fast_path(x, "eval")
    engine, module = pair(3, dtype, affine=affine)
    with torch.no_grad():
        want = module.eval()(x)
    data = x.permute(0, 2, 3, 1) if layout == "nhwc" else x  # NHWC memory either way
    got = engine.apply(data, "eval", layout)
    got = got.permute(0, 3, 1, 2) if layout == "nhwc" else got
    assert torch.equal(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    assert got.dtype == dtype


@pytest.mark.parametrize(("dtype", "momentum", "affine", "track"), [
    *[(dtype, 0.1, True, True) for dtype in DTYPES],
    (torch.float32, None, True, True), (torch.float32, 0.1, False, True), (torch.float32, 0.1, True, False)])
def test_train_equals_the_module(dtype: torch.dtype, momentum: float | None, affine: bool, track: bool) -> None:
    x = channels_last(TRAIN_SHAPE, dtype)
    assert channels_last_fast_path(x, "train")
    engine, module = pair(3, dtype, momentum=momentum, affine=affine, track=track)
    cl_module = nn.BatchNorm2d(3, momentum=momentum, affine=affine, track_running_stats=track,
                               dtype=module.weight.dtype if affine else engine.module.running_mean.dtype
                               if track else torch.float32)
    cl_module.load_state_dict(module.state_dict())
    with torch.no_grad():
        want = module.train()(x.contiguous())  # same values, NCHW memory
        cl = cl_module.train()(x)  # same memory, the module's channels-last kernel
    got = engine.apply(x, "train")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(engine.module.state_dict()[key], value, msg=key)

    xd = x.to(torch.float64)
    w = module.weight.to(torch.float64) if affine else None
    b = module.bias.to(torch.float64) if affine else None
    ref = F.batch_norm(xd, None, None, w, b, True, 0.0, module.eps)
    err_engine = (got.to(torch.float64) - ref).abs().max()
    err_module = (cl.to(torch.float64) - ref).abs().max()
    assert err_engine <= err_module * 1.01 + 1e-12


def test_eval_without_running_stats_uses_batch_statistics() -> None:
    x = channels_last(EVAL_SHAPE, torch.float32)
    engine, module = pair(3, torch.float32, track=False)
    with torch.no_grad():
        want = module.eval()(x.contiguous())
    torch.testing.assert_close(engine.apply(x, "eval"), want)


def test_nan_stays_in_its_channel() -> None:
    x = channels_last(TRAIN_SHAPE, torch.float32)
    x[0, 0, 5, 5] = float("nan")
    engine, module = pair(3, torch.float32)
    with torch.no_grad():
        want = module.train()(x.contiguous())
    got = engine.apply(x, "train")
    assert got[:, 0].isnan().all() and want[:, 0].isnan().all()
    torch.testing.assert_close(got[:, 1:], want[:, 1:])


@pytest.mark.parametrize(("shape", "memory", "mode"), [
    (TRAIN_SHAPE, torch.contiguous_format, "train"),  # NCHW: the module's fast kernel already
    ((2, 16, 128, 128), torch.channels_last, "train"),  # a full vector of channels
    ((2, 8, 256, 256), torch.channels_last, "eval"),  # float32 eval: the module keeps up from C=5
    ((2, 3, 32, 32), torch.channels_last, "train"),  # too small to pay for the extra ops
    ((2, 3, 128, 128), torch.channels_last, "eval"),  # below the eval threshold
    ((1, 3, 257, 263), torch.channels_last, "train"),  # 257*263 pixels: no useful row width
])
def test_fast_path_only_where_it_pays(shape: tuple[int, ...], memory: torch.memory_format, mode: str) -> None:
    assert channels_last_fast_path(torch.empty(shape).contiguous(memory_format=memory), mode) == 0


def test_fast_path_thresholds_depend_on_dtype() -> None:
    def takes(c: int, dtype: torch.dtype, mode: str) -> bool:
        x = torch.empty(2, c, 256, 256, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return channels_last_fast_path(x, mode) > 0

    assert takes(15, torch.bfloat16, "eval") and takes(15, torch.float16, "eval")
    assert takes(4, torch.float32, "eval") and not takes(5, torch.float32, "eval")
    assert takes(15, torch.float32, "train") and not takes(16, torch.float32, "train")
    assert takes(15, torch.float64, "train") and takes(3, torch.float64, "eval") and not takes(4, torch.float64, "eval")


@settings(max_examples=10, deadline=None)
@given(c=st.integers(2, 15), h=st.integers(60, 130), w=st.integers(60, 130), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_eval_bitwise_and_train_close(c: int, h: int, w: int, seed: int, dtype: torch.dtype) -> None:
    n = -(-(1 << 18) // (c * h * w))  # just above the eval threshold, so both modes can take the path
    x = channels_last((n, c, h, w), dtype, seed)
    assume(channels_last_fast_path(x, "train") > 0)  # some pixel counts have no useful row width
    engine, module = pair(c, dtype, seed=seed)
    with torch.no_grad():
        assert torch.equal(engine.apply(x, "eval"), module.eval()(x))
        want = module.train()(x.contiguous())
    got = engine.apply(x, "train")
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-5)
    else:  # one bfloat16 rounding step where the float32 results straddle a rounding boundary
        torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(engine.module.running_var, module.running_var)
