"""Exact streaming statistics (bncli.moments), dataset_stats over shards, and `bncli stats`."""

from __future__ import annotations

import io as stdio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file as save_np_safetensors
from safetensors.torch import save_file as save_torch_safetensors
from typer.testing import CliRunner

from bncli import datastats, io, moments, outofcore
from bncli.cli import app
from bncli.errors import DTypeError, InputError, ShapeError
from bncli.moments import Moments, block_moments
from bncli.progress import progress_callback

TIGHT = {"rtol": 1e-12, "atol": 0.0}


def reference(x: np.ndarray, layout: str = "nchw") -> dict[str, np.ndarray]:
    """Float64 two-pass statistics of a whole array: the independent reference."""
    if layout == "nhwc":
        x = np.moveaxis(x, 3, 1)
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=(0, 2, 3))
    dev = x64 - mean[None, :, None, None]
    m2 = (dev * dev).sum(axis=(0, 2, 3))
    n = x64.size // x64.shape[1]
    return {"mean": mean, "var": m2 / n, "var_unbiased": m2 / (n - 1),
            "min": x64.min(axis=(0, 2, 3)), "max": x64.max(axis=(0, 2, 3))}


def assert_matches(m: Moments, ref: dict[str, np.ndarray], spread: float = 1.0) -> None:
    # Means near zero have no meaningful relative error: allow 1e-12 of the data's spread.
    np.testing.assert_allclose(m.mean, ref["mean"], rtol=1e-12, atol=1e-12 * spread)
    np.testing.assert_allclose(m.var, ref["var"], **TIGHT)
    np.testing.assert_allclose(m.var_unbiased, ref["var_unbiased"], **TIGHT)
    np.testing.assert_array_equal(m.minimum, ref["min"])
    np.testing.assert_array_equal(m.maximum, ref["max"])


def streamed(x: np.ndarray, cuts: list[int], layout: str = "nchw") -> Moments:
    m = Moments.empty(x.shape[3] if layout == "nhwc" else x.shape[1])
    for a, b in zip([0, *cuts], [*cuts, x.shape[0]], strict=True):
        m.update(x[a:b], layout)
    return m


@pytest.fixture
def tiny_sub_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many (uneven) sub-blocks per chunk, and the split-inside-a-sample path."""
    monkeypatch.setattr(moments, "SUB_BLOCK_ELEMENTS", 37)


# -- the algorithm -------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5),
       layout=st.sampled_from(["nchw", "nhwc"]), dtype=st.sampled_from(["float32", "float64", "float16"]),
       seed=st.integers(0, 2**16), data=st.data())
def test_any_chunking_equals_float64_two_pass(n: int, c: int, h: int, w: int, layout: str, dtype: str,
                                              seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    shape = (n, h, w, c) if layout == "nhwc" else (n, c, h, w)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 10) + rng.uniform(-50, 50)).astype(dtype)
    if n * h * w < 2:
        x = np.concatenate([x, x + 1])
    cuts = sorted(data.draw(st.lists(st.integers(0, x.shape[0]), max_size=6)))
    old = moments.SUB_BLOCK_ELEMENTS
    moments.SUB_BLOCK_ELEMENTS = data.draw(st.sampled_from([1, 7, 64, old]))
    try:
        m = streamed(x, cuts, layout)
    finally:
        moments.SUB_BLOCK_ELEMENTS = old
    assert m.count == x.size // c
    assert_matches(m, reference(x, layout), spread=float(np.abs(x).max()) + 1)


def test_large_offset_small_spread_stays_exact(tiny_sub_blocks: None) -> None:
    # mean/std = 1e7: the E[x^2] - E[x]^2 shortcut loses every digit here; Chan does not.
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(size=(40, 2, 3, 3)) * 0.1
    m = streamed(x, [3, 4, 17, 30])
    ref = reference(x)
    assert_matches(m, ref)
    naive = (x.astype(np.float32) ** 2).mean(axis=(0, 2, 3)) - x.astype(np.float32).mean(axis=(0, 2, 3)) ** 2
    assert not np.allclose(naive, ref["var"], rtol=1e-3)


def test_big_sample_is_split_inside_the_sample(tiny_sub_blocks: None) -> None:
    x = np.random.default_rng(2).normal(size=(2, 3, 11, 13)).astype(np.float32)
    assert_matches(streamed(x, [1]), reference(x))


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int64"])
def test_integer_data_is_exact(dtype: str) -> None:
    x = np.random.default_rng(3).integers(0, 255, size=(6, 3, 4, 4)).astype(dtype)
    assert_matches(streamed(x, [2, 5]), reference(x), spread=255)


def test_non_finite_values_are_counted_not_hidden() -> None:
    x = np.random.default_rng(4).normal(size=(5, 3, 4, 4))
    x[1, 0, 2, 2] = np.nan
    x[3, 0, 0, 1] = np.inf
    x[4, 2, 1, 1] = -np.inf
    m = streamed(x, [2])
    assert m.non_finite.tolist() == [2, 0, 1]
    assert np.isnan(m.mean[0]) and np.isnan(m.var[0])  # what BatchNorm2d would see
    assert m.mean[2] == -np.inf and np.isnan(m.var[2])
    assert m.maximum[0] == np.inf and m.minimum[2] == -np.inf
    finite = np.delete(x, [0, 2], axis=1)
    np.testing.assert_allclose(m.mean[1], reference(finite)["mean"][0], **TIGHT)


def test_merge_of_empty_and_scaling() -> None:
    x = np.random.default_rng(5).normal(size=(4, 2, 3, 3)) + 3
    m = Moments.empty(2)
    m.merge(Moments.empty(2))
    m.merge(block_moments(x))
    m.merge(block_moments(x[:0]))
    s = m.scaled(255.0)
    np.testing.assert_allclose(s.mean * 255, m.mean, **TIGHT)
    np.testing.assert_allclose(s.var * 255**2, m.var, **TIGHT)
    assert m.scaled(1.0) is m
    assert np.isnan(Moments.empty(2).var).all()
    with pytest.raises(ValueError, match="channels"):
        m.merge(Moments.empty(3))


# -- dataset_stats over files ----------------------------------------------------------------
def write_shards(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    """Four shards in four formats with uneven N, per-channel scales and offsets."""
    rng = np.random.default_rng(6)
    scale = np.array([1.0, 2.0, 3.0])[None, :, None, None]
    parts = [(rng.normal(size=(n, 3, 5, 4)) * scale + 0.5).astype(np.float32) for n in (7, 1, 12, 4)]
    paths = [tmp_path / "a.npy", tmp_path / "b.npz", tmp_path / "c.pt", tmp_path / "d.safetensors"]
    np.save(paths[0], parts[0])
    np.savez(paths[1], images=parts[1])
    torch.save({"images": torch.from_numpy(parts[2])}, paths[2])
    save_np_safetensors({"images": parts[3]}, str(paths[3]))
    return paths, np.concatenate(parts)


def test_shards_in_any_format_equal_one_concatenated_file(tmp_path: Path) -> None:
    paths, whole = write_shards(tmp_path)
    np.save(tmp_path / "whole.npy", whole)
    multi = datastats.dataset_stats(paths, key="images", chunk_bytes=200)
    single = datastats.dataset_stats([tmp_path / "whole.npy"], chunk_bytes=10**9)
    ref = reference(whole)
    assert_matches(multi.moments, ref, spread=10)
    assert_matches(single.moments, ref, spread=10)
    assert multi.moments.count == whole.size // 3
    assert [s.shape[0] for s in multi.inputs] == [7, 1, 12, 4]


def test_shards_may_differ_in_height_and_width(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(3, 2, 4, 4)), rng.normal(size=(2, 2, 7, 3)) + 1
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    r = datastats.dataset_stats([tmp_path / "a.npy", tmp_path / "b.npy"], chunk_bytes=64)
    flat = np.concatenate([np.moveaxis(a, 1, 0).reshape(2, -1), np.moveaxis(b, 1, 0).reshape(2, -1)], axis=1)
    np.testing.assert_allclose(r.moments.mean, flat.mean(axis=1), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r.moments.var, flat.var(axis=1), **TIGHT)


def test_result_does_not_depend_on_threads_or_chunks(tmp_path: Path) -> None:
    x = np.random.default_rng(8).normal(size=(50, 3, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    one = datastats.dataset_stats([tmp_path / "x.npy"], chunk_bytes=1000, workers=1)
    three = datastats.dataset_stats([tmp_path / "x.npy"], chunk_bytes=1000, workers=3)
    np.testing.assert_array_equal(one.moments.mean, three.moments.mean)  # bit for bit
    np.testing.assert_array_equal(one.moments.m2, three.moments.m2)
    big = datastats.dataset_stats([tmp_path / "x.npy"], chunk_bytes=10**8)
    assert_matches(big.moments, reference(x), spread=5)
    assert_matches(one.moments, reference(x), spread=5)


def test_bf16_and_nhwc_shards(tmp_path: Path) -> None:
    x = torch.randn(6, 4, 4, 3).bfloat16()
    save_torch_safetensors({"x": x}, str(tmp_path / "x.safetensors"))
    r = datastats.dataset_stats([tmp_path / "x.safetensors"], layout="nhwc", chunk_bytes=100)
    assert_matches(r.moments, reference(x.float().numpy(), "nhwc"), spread=5)
    assert r.inputs[0].dtype == "bfloat16" and r.inputs[0].nbytes == x.numel() * 2


def test_fortran_order_npy_is_read_correctly_with_a_note(tmp_path: Path) -> None:
    x = np.asfortranarray(np.random.default_rng(9).normal(size=(5, 3, 4, 2)))
    np.save(tmp_path / "f.npy", x)
    r = datastats.dataset_stats([tmp_path / "f.npy"], chunk_bytes=64)
    assert_matches(r.moments, reference(x), spread=5)
    assert any("Fortran" in n for n in r.notes)


def test_channel_mismatch_between_shards(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    np.save(tmp_path / "b.npy", np.zeros((2, 4, 4, 4), np.float32))
    with pytest.raises(ShapeError, match=r"b\.npy: has 4 channels on its axis 1 \(NCHW\).*a\.npy has 3") as err:
        datastats.dataset_stats([tmp_path / "a.npy", tmp_path / "b.npy"])
    assert "--layout" in (err.value.hint or "")


@pytest.mark.parametrize(("array", "error", "message"), [
    (np.zeros((3, 4, 4), np.float32), ShapeError,
     r"BatchNorm2d expects 4D input \(N, C, H, W\), got 3D input of shape \(3, 4, 4\)"),
    (np.zeros((2, 3, 4, 4), bool), DTypeError, "dtype bool"),
    (np.zeros((0, 3, 4, 4), np.float32), ShapeError, "no values"),
])
def test_refusals(tmp_path: Path, array: np.ndarray, error: type, message: str) -> None:
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(error, match=message):
        datastats.dataset_stats([tmp_path / "x.npy"])


def test_truncated_npy_fails_before_reading(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 4, 4), np.float32))
    with (tmp_path / "x.npy").open("r+b") as fh:
        fh.truncate(500)
    with pytest.raises(InputError, match="truncated"):
        datastats.dataset_stats([tmp_path / "x.npy"])


def test_state_dict_is_one_cumulative_train_step_over_everything(tmp_path: Path) -> None:
    paths, whole = write_shards(tmp_path)
    r = datastats.dataset_stats(paths, key="images", chunk_bytes=300)
    state = datastats.stats_state_dict(r)
    module = torch.nn.BatchNorm2d(3, momentum=None)
    module.train()
    module(torch.from_numpy(whole).double().float())
    fresh = torch.nn.BatchNorm2d(3)
    fresh.load_state_dict(state)  # loadable as it is
    ref = reference(whole)
    torch.testing.assert_close(state["running_mean"], torch.from_numpy(ref["mean"]).float())
    torch.testing.assert_close(state["running_var"], torch.from_numpy(ref["var_unbiased"]).float())
    for key in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        torch.testing.assert_close(state[key], module.state_dict()[key], rtol=1e-5, atol=1e-6)
    assert int(state["num_batches_tracked"]) == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("16M", 16 << 20), ("16MiB", 16 << 20), ("1.5g", 3 << 29), ("4096", 4096), ("2 KB", 2048), ("1t", 1 << 40)])
def test_parse_size(text: str, expected: int) -> None:
    assert outofcore.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "big", "-1M", "0", "1.2.3M", "5Q"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        outofcore.parse_size(text)


# -- the command -----------------------------------------------------------------------------
def test_stats_table_and_normalize_line(runner: CliRunner, tmp_path: Path) -> None:
    paths, whole = write_shards(tmp_path)
    res = runner.invoke(app, ["stats", *map(str, paths), "--key", "images", "--chunk-size", "1K"])
    assert res.exit_code == 0, res.output
    ref = reference(whole)
    assert "Exact per-channel statistics" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("transforms.Normalize("))
    assert f"{ref['mean'][0]:.6g}" in line and f"{np.sqrt(ref['var'][2]):.6g}" in line
    assert "files 4" in res.stdout
    assert res.stderr == ""  # no progress bar off a terminal, no notes for float data


def test_stats_json_is_one_document(runner: CliRunner, tmp_path: Path) -> None:
    paths, whole = write_shards(tmp_path)
    res = runner.invoke(app, ["stats", *map(str, paths), "-k", "images", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    ref = reference(whole)
    assert set(doc) >= {"inputs", "layout", "channels", "count", "scale", "mean", "var", "var_unbiased", "std",
                        "std_unbiased", "min", "max", "non_finite", "normalize", "save_state", "notes"}
    assert doc["count"] == whole.size // 3 and doc["channels"] == 3
    np.testing.assert_allclose(doc["mean"], ref["mean"], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(doc["var_unbiased"], ref["var_unbiased"], **TIGHT)
    np.testing.assert_allclose(np.square(doc["std"]), ref["var"], rtol=1e-12)
    assert [i["path"] for i in doc["inputs"]] == [str(p) for p in paths]
    assert doc["normalize"].startswith("transforms.Normalize(mean=[")


def test_stats_json_reports_nan_as_null_and_warns(runner: CliRunner, tmp_path: Path) -> None:
    x = np.ones((2, 2, 3, 3), np.float32)
    x[0, 1, 0, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    res = runner.invoke(app, ["stats", str(tmp_path / "x.npy"), "--json"])
    doc = json.loads(res.stdout)
    assert doc["mean"] == [1.0, None] and doc["non_finite"] == [0, 1] and doc["normalize"] is None
    assert any("NaN or Inf" in n for n in doc["notes"])
    res = runner.invoke(app, ["stats", str(tmp_path / "x.npy")])
    assert "non-finite" in res.stdout and "NaN or Inf" in res.stderr


def test_uint8_scale_and_note(runner: CliRunner, tmp_path: Path) -> None:
    x = np.random.default_rng(10).integers(0, 256, size=(4, 5, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "img.npy", x)
    res = runner.invoke(app, ["stats", str(tmp_path / "img.npy"), "--layout", "nhwc"])
    assert res.exit_code == 0 and "--scale 255" in res.stderr
    res = runner.invoke(app, ["stats", str(tmp_path / "img.npy"), "--layout", "nhwc", "--scale", "255", "--json"])
    doc = json.loads(res.stdout)
    ref = reference(x, "nhwc")
    np.testing.assert_allclose(doc["mean"], ref["mean"] / 255, rtol=1e-12)
    np.testing.assert_allclose(doc["max"], ref["max"] / 255, rtol=1e-12)
    assert doc["notes"] == []
    assert runner.invoke(app, ["stats", str(tmp_path / "img.npy"), "--scale", "0"]).exit_code == 2


def test_save_state_feeds_normalize_eval(runner: CliRunner, tmp_path: Path) -> None:
    x = (np.random.default_rng(11).normal(size=(16, 3, 8, 8)) * [[[[2]], [[0.5]], [[4]]]] + 7).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    state = tmp_path / "bn.pt"
    res = runner.invoke(app, ["stats", str(tmp_path / "x.npy"), "--save-state", str(state)])
    assert res.exit_code == 0, res.output
    assert f"--state {state}" in res.stdout
    module = torch.nn.BatchNorm2d(3)
    module.load_state_dict(torch.load(state, weights_only=True))
    res = runner.invoke(app, ["normalize", str(tmp_path / "x.npy"), "--mode", "eval", "--state", str(state),
                              "-o", str(tmp_path / "y.npy")])
    assert res.exit_code == 0, res.output
    y = np.load(tmp_path / "y.npy").astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    # running_var is unbiased, so eval std is sqrt((n-1)/n) of 1, not exactly 1.
    n = x.size // 3
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), np.sqrt((n - 1) / n), rtol=1e-4)
    again = runner.invoke(app, ["stats", str(tmp_path / "x.npy"), "--save-state", str(state)])
    assert again.exit_code == 1 and "already exists" in again.stderr and again.stdout == ""
    wrong = runner.invoke(app, ["stats", str(tmp_path / "x.npy"), "--save-state", str(tmp_path / "s.npy")])
    assert wrong.exit_code == 1 and ".pt" in wrong.stderr


def test_stats_errors_are_one_line(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(app, ["stats", str(tmp_path / "missing.npy")])
    assert res.exit_code == 1 and "no such file" in res.stderr and "Traceback" not in res.output
    res = runner.invoke(app, ["stats", str(tmp_path / "x.npy"), "--chunk-size", "lots"])
    assert res.exit_code == 2


def test_stats_on_npy_does_not_import_torch(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 3, 2, 2), np.float32))
    probe = ("import sys\nfrom bncli.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code\n"
             "print('TORCH=' + str('torch' in sys.modules), 'EXIT=' + str(code), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe, "stats", str(tmp_path / "x.npy"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert "TORCH=False EXIT=0" in proc.stderr, proc.stderr


# -- progress ----------------------------------------------------------------------------------
def test_progress_draws_on_a_terminal_only(tmp_path: Path) -> None:
    from rich.console import Console

    np.save(tmp_path / "x.npy", np.ones((40, 3, 8, 8), np.float32))
    buf = stdio.StringIO()
    term = Console(file=buf, force_terminal=True, width=100)
    with progress_callback(console=term, min_bytes=1) as progress:
        assert progress is not None
        datastats.dataset_stats([tmp_path / "x.npy"], chunk_bytes=2048, progress=progress)
    assert "statistics" in buf.getvalue() and "30.0/30.0 KiB" in buf.getvalue()
    with progress_callback(console=Console(file=stdio.StringIO(), force_terminal=False)) as progress:
        assert progress is None
    with progress_callback(enabled=False, console=term) as progress:
        assert progress is None


def test_iter_chunks_reads_without_a_memory_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.arange(5 * 2 * 3 * 3, dtype=np.float64).reshape(5, 2, 3, 3)
    np.save(tmp_path / "x.npy", x)

    def no_memmap(*args: object, **kwargs: object) -> None:
        raise AssertionError("memory map used")

    monkeypatch.setattr(np, "memmap", no_memmap)
    monkeypatch.setattr(np, "load", no_memmap)
    blocks = list(io.iter_chunks(tmp_path / "x.npy", max_bytes=2 * 18 * 8))
    assert [b.shape[0] for b in blocks] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


def test_uint8_statistics_equal_exact_fractions(tmp_path: Path) -> None:
    # Integer data have exact statistics (integer sums as fractions): a reference with
    # no rounding at all, for shards in several files, chunked unevenly.
    from fractions import Fraction

    rng = np.random.default_rng(12)
    parts = [rng.integers(0, 256, size=(n, 6, 5, 3), dtype=np.uint8) for n in (9, 2, 14)]
    paths = []
    for i, part in enumerate(parts):
        np.save(tmp_path / f"s{i}.npy", part)
        paths.append(tmp_path / f"s{i}.npy")
    r = datastats.dataset_stats(paths, layout="nhwc", chunk_bytes=97, scale=255.0)
    raw = np.concatenate(parts).reshape(-1, 3).astype(np.int64)
    n = raw.shape[0]
    for c in range(3):
        s1, s2 = int(raw[:, c].sum()), int((raw[:, c] ** 2).sum())
        mean = Fraction(s1, n * 255)
        var = Fraction(n * s2 - s1 * s1, n * n * 255 * 255)
        assert abs(r.moments.mean[c] / float(mean) - 1) < 1e-14
        assert abs(r.moments.var[c] / float(var) - 1) < 1e-14
        assert abs(r.moments.var_unbiased[c] / float(var * n / (n - 1)) - 1) < 1e-14
