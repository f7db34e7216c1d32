"""Properties that must hold for every input (STYLE rule 10), checked with hypothesis.

* train mode: each channel of the output has mean ~0 and biased variance v / (v + eps)
  (~1 when the channel's variance v is not tiny next to eps);
* streaming: per-chunk ``apply_with_stats`` equals the whole-array result bit for bit;
* ``diagnose.check_shape`` gives an error finding if and only if the engine refuses the input.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bncli.diagnose import check_shape
from bncli.engine import BatchNormConfig, BatchNormEngine, validate_input
from bncli.errors import DTypeError, ShapeError

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- train-mode moments ---------------------------------------------------------------------
@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    """A float64 NCHW batch with per-channel offset and scale, and the layout to feed it in."""
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 5))
    w = draw(st.integers(2 if n * h == 1 else 1, 5))  # N*H*W >= 2: train mode needs it
    seed = draw(st.integers(0, 2**32 - 1))
    scales = 10.0 ** np.array(draw(st.lists(st.floats(-3, 2), min_size=c, max_size=c)))
    # offsets up to 30 standard deviations: beyond that a float32 value holds little of its std
    offsets = scales * np.array(draw(st.lists(st.floats(-30, 30), min_size=c, max_size=c)))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)) * scales[None, :, None, None] + offsets[None, :, None, None]
    return x, draw(st.sampled_from(["nchw", "nhwc", "channels_last"]))


@settings(max_examples=60, **SETTINGS)
@given(batch=batches(), dtype=st.sampled_from([torch.float32, torch.float64]),
       eps=st.sampled_from([1e-5, 1e-3, 0.1]))
def test_train_mode_output_has_zero_mean_and_unit_variance(batch: tuple[np.ndarray, str],
                                                           dtype: torch.dtype, eps: float) -> None:
    x_np, layout = batch
    x = torch.from_numpy(x_np).to(dtype)
    c = x.shape[1]
    eng = BatchNormEngine(BatchNormConfig(c, eps=eps, affine=False),
                          param_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if layout == "nhwc":
        y = eng.apply(x.permute(0, 2, 3, 1).contiguous(), mode="train", layout="nhwc").permute(0, 3, 1, 2)
    else:
        y = eng.apply(x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x,
                      mode="train")
    x64, y64 = x.double(), y.double()
    v_in, m_in = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    v_out, m_out = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    # The float error of a normalized value is a few ulps of max|x| / std (y = x * a + b
    # cancels), and PyTorch's channels-last kernel sums the statistics in float32.
    ratio = x64.abs().amax(dim=(0, 2, 3)) / v_in.sqrt().clamp_min(1e-300) + 1.0
    tol = 16 * torch.finfo(dtype).eps * ratio
    expected_var = v_in / (v_in + eps)
    scale = expected_var.sqrt()  # the output's std: tiny when v_in << eps, and so is the mean
    assert bool((m_out.abs() <= tol * scale + 1e-12).all()), (m_out, tol)
    assert bool(((v_out - expected_var).abs() <= 2 * tol * expected_var + 1e-12).all()), (v_out, expected_var)
    big = v_in >= 100 * eps  # here the output variance is ~1 (>= 1/1.01)
    assert bool(((v_out[big] - 1).abs() <= 0.01 + 2 * tol[big]).all())


# -- streaming: chunked = whole ---------------------------------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(batch=batches(), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
       cuts=st.lists(st.integers(0, 4), max_size=3), affine=st.booleans())
def test_chunked_apply_with_stats_equals_whole(batch: tuple[np.ndarray, str], dtype: torch.dtype,
                                               cuts: list[int], affine: bool) -> None:
    x_np, layout = batch
    x = torch.from_numpy(x_np).to(dtype)
    c = x.shape[1]
    eng = BatchNormEngine(BatchNormConfig(c, affine=affine),
                          param_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if affine:
        eng.set_affine(weight=torch.linspace(-2, 2, c), bias=torch.linspace(1, -1, c))
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    engine_layout = "nhwc" if layout == "nhwc" else "nchw"
    if layout == "nhwc":
        x = x.permute(0, 2, 3, 1).contiguous()
    bounds = sorted({0, x.shape[0], *(min(cut, x.shape[0]) for cut in cuts)})
    parts = [x[a:b] for a, b in pairwise(bounds) if b > a]
    chunked = torch.cat([eng.apply_with_stats(p, mean, var, layout=engine_layout) for p in parts])
    whole = eng.apply_with_stats(x, mean, var, layout=engine_layout)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


# -- check-shape accepts exactly what the engine accepts ----------------------------------------
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64, "uint8": torch.uint8, "int64": torch.int64, "bool": torch.bool}


def engine_refuses(shape: tuple[int, ...], dtype: str, num_features: int | None, mode: str,
                   layout: str) -> bool:
    """Whether ``normalize`` would refuse the input: the engine's config and validate_input.

    Without ``--num-features`` the layer takes C from the data (core.build_engine), so a
    zero-channel input already fails in ``BatchNormConfig``.
    """
    try:
        if num_features is None:
            num_features = (shape[3] if layout == "nhwc" else shape[1]) if len(shape) == 4 else 1
        config = BatchNormConfig(num_features)
        validate_input(shape, TORCH_DTYPES[dtype], config.num_features, mode, layout)
    except (ShapeError, DTypeError):
        return True
    return False


@settings(max_examples=300, **SETTINGS)
@given(shape=st.lists(st.sampled_from([0, 1, 1, 2, 3, 4]), max_size=6).map(tuple),
       dtype=st.sampled_from(sorted(TORCH_DTYPES)), num_features=st.none() | st.integers(1, 4),
       mode=st.sampled_from(["train", "eval"]), layout=st.sampled_from(["nchw", "nhwc"]))
def test_check_shape_errors_iff_engine_refuses(shape: tuple[int, ...], dtype: str, num_features: int | None,
                                               mode: str, layout: str) -> None:
    findings = check_shape(shape, dtype, num_features=num_features, mode=mode, layout=layout)
    assert {f.severity for f in findings} <= {"error", "warning"}
    errors = [f for f in findings if f.severity == "error"]
    assert bool(errors) == engine_refuses(shape, dtype, num_features, mode, layout), findings
    assert ("not_float" in {f.code for f in errors}) == (dtype not in ("float16", "bfloat16", "float32", "float64"))
    assert ("not_4d" in {f.code for f in errors}) == (len(shape) != 4)
    for f in findings:
        assert f.message and f.hint


@settings(max_examples=60, **SETTINGS)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
       num_features=st.integers(1, 4), mode=st.sampled_from(["train", "eval"]),
       layout=st.sampled_from(["nchw", "nhwc"]), dtype=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_engine_apply_accepts_what_check_shape_accepts(shape: tuple[int, int, int, int], num_features: int,
                                                      mode: str, layout: str, dtype: str) -> None:
    """The other direction on real tensors: no finding means apply runs (and no opaque error)."""
    findings = check_shape(shape, dtype, num_features=num_features, mode=mode, layout=layout)
    eng = BatchNormEngine(BatchNormConfig(num_features))
    x = torch.randn(shape).to(TORCH_DTYPES[dtype])
    if any(f.severity == "error" for f in findings):
        try:
            eng.apply(x, mode=mode, layout=layout)
        except (ShapeError, DTypeError):
            return
        raise AssertionError(f"check-shape refused {shape} but apply accepted it")
    assert eng.apply(x, mode=mode, layout=layout).shape == shape
