"""Guarded `bncli stats`: check-shape findings first, dtypes, --scale; and its precision, exact to ~1e-15."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bncli import datastats, moments
from bncli.cli import app
from bncli.errors import DTypeError


def stats_json(runner: CliRunner, *args: str) -> dict:
    res = runner.invoke(app, ["stats", *args, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def flat(text: str) -> str:
    return " ".join(text.split())


def note_lines(stderr: str) -> list[str]:
    """The notes as printed (rich wraps them), one whitespace-normalized string per note."""
    notes: list[str] = []
    for line in stderr.splitlines():
        if line.startswith("Note: "):
            notes.append(line[len("Note: "):])
        elif notes and line:
            notes[-1] += " " + line
    return [flat(n) for n in notes]


# -- the two reports of the issue -------------------------------------------------------------
def test_nhwc_uint8_shards_are_no_longer_silently_32_channels(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    for i in range(20):
        np.save(tmp_path / "shards" / f"batch_{i}.npy", rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    res = runner.invoke(app, ["stats", str(tmp_path / "shards")])
    assert res.exit_code == 0
    notes = note_lines(res.stderr)
    assert notes[0].startswith("20 of 20 inputs look channels-last (N, H, W, C)")
    assert "they have 32 channels" in notes[0] and "--layout nhwc" in notes[0]
    doc = stats_json(runner, str(tmp_path / "shards"))
    assert doc["channels"] == 32
    assert flat(doc["notes"][0]) == notes[0]  # the same note, on stderr and in JSON
    assert doc["inputs"][0]["findings"][0]["code"] == "channels_last"
    # An explicit layout is the user's answer: no channels-last note either way.
    nchw = stats_json(runner, str(tmp_path / "shards"), "--layout", "nchw")
    assert nchw["channels"] == 32 and not any("channels-last" in n for n in nchw["notes"])
    nhwc = stats_json(runner, str(tmp_path / "shards"), "--layout", "nhwc", "--scale", "255")
    assert nhwc["channels"] == 3 and nhwc["notes"] == []
    assert all(i["findings"] == [] for i in nhwc["inputs"])


def test_pooling_unit_floats_with_uint8_pixels_is_refused(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.save(tmp_path / "batch.npy", rng.uniform(0, 1, (4, 3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "batch_uint8.npy", rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8))
    for extra in ([], ["--json"]):
        res = runner.invoke(app, ["stats", str(tmp_path / "batch.npy"), str(tmp_path / "batch_uint8.npy"), *extra])
        assert res.exit_code == 1
        assert (json.loads(res.stdout)["error"]["exit_code"] == 1) if extra else res.stdout == ""
        err = res.stderr
        assert err.startswith("Error: The inputs have 2 different dtypes (float32: ")
        assert "batch.npy; uint8: " in err and "batch_uint8.npy)" in err and "[0, 255]" in err
        assert "Fix:" in err and "--allow-mixed-dtypes" in err and "Traceback" not in err


def test_allow_mixed_dtypes_with_scale_divides_integer_inputs_only(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    floats = rng.uniform(0, 1, (5, 3, 6, 6)).astype(np.float32)
    ints = rng.integers(0, 256, (3, 3, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "f.npy", floats)
    np.save(tmp_path / "u.npy", ints)
    args = [str(tmp_path / "f.npy"), str(tmp_path / "u.npy"), "--allow-mixed-dtypes", "--scale", "255"]
    doc = stats_json(runner, *args)
    pooled = np.concatenate([floats.astype(np.float64), ints / 255.0])
    np.testing.assert_allclose(doc["mean"], pooled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(doc["var"], pooled.var(axis=(0, 2, 3)), rtol=1e-12)
    assert [i["scale"] for i in doc["inputs"]] == [1.0, 255.0]
    assert doc["max"] == pytest.approx(list(pooled.max(axis=(0, 2, 3))), rel=1e-15)
    [note] = doc["notes"]
    assert note.startswith("--scale 255 applies to integer inputs only: 1 integer input divided by 255, "
                           "1 floating-point input kept unscaled (")
    text = runner.invoke(app, ["stats", *args])
    assert text.exit_code == 0
    assert note_lines(text.stderr) == [flat(note)]
    assert "integer inputs divided by 255" in text.stdout


def test_scale_is_not_applied_to_float_inputs_and_says_so(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.random.default_rng(3).normal(size=(4, 2, 5, 5)) * 200)
    plain = stats_json(runner, str(tmp_path / "f.npy"))
    scaled = stats_json(runner, str(tmp_path / "f.npy"), "--scale", "255")
    assert scaled["mean"] == plain["mean"] and scaled["var"] == plain["var"]
    assert scaled["inputs"][0]["scale"] == 1.0
    assert any("every input is floating point: nothing was divided" in n for n in scaled["notes"])


@pytest.mark.parametrize("dtypes", [("float32", "float16"), ("uint8", "int16")])
def test_any_dtype_mix_is_refused_unless_allowed(runner: CliRunner, tmp_path: Path, dtypes: tuple[str, str]) -> None:
    for i, dtype in enumerate(dtypes):
        np.save(tmp_path / f"{i}.npy", np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4).astype(dtype))
    paths = [str(tmp_path / "0.npy"), str(tmp_path / "1.npy")]
    res = runner.invoke(app, ["stats", *paths])
    assert res.exit_code == 1 and f"{dtypes[0]}: " in res.stderr and f"{dtypes[1]}: " in res.stderr
    assert stats_json(runner, *paths, "--allow-mixed-dtypes")["count"] == 2 * 2 * 16
    with pytest.raises(DTypeError, match="2 different dtypes"):
        datastats.dataset_stats(paths)


def test_integers_are_fine_booleans_and_complex_are_not(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.arange(96, dtype=np.int32).reshape(2, 3, 4, 4))
    doc = stats_json(runner, str(tmp_path / "i.npy"))
    assert doc["mean"][0] == pytest.approx(np.arange(96).reshape(2, 3, 16)[:, 0].mean())
    assert any("holds int32 values, reported as they are" in n for n in doc["notes"])
    for name, array in (("b.npy", np.zeros((2, 3, 4, 4), bool)), ("c.npy", np.zeros((2, 3, 4, 4), np.complex64))):
        np.save(tmp_path / name, array)
        res = runner.invoke(app, ["stats", str(tmp_path / name)])
        assert res.exit_code == 1
        assert f"cannot compute statistics of dtype {array.dtype}" in " ".join(res.stderr.split())


def test_not_4d_uses_the_check_shape_explanation(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "image.npy", np.zeros((3, 32, 32), np.float32))
    res = runner.invoke(app, ["stats", str(tmp_path / "image.npy")])
    assert res.exit_code == 1
    assert "BatchNorm2d expects 4D input (N, C, H, W), got 3D input" in " ".join(res.stderr.split())
    assert "looks like a single (C, H, W) image with no batch dimension" in res.stderr
    assert "Fix: Add the batch axis" in res.stderr


def test_channel_mismatch_hint_points_at_the_channels_last_input(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "nhwc.npy", np.zeros((2, 32, 32, 3), np.float32))
    np.save(tmp_path / "nchw.npy", np.zeros((2, 3, 32, 32), np.float32))
    res = runner.invoke(app, ["stats", str(tmp_path / "nhwc.npy"), str(tmp_path / "nchw.npy")])
    assert res.exit_code == 1
    assert "nhwc.npy looks channels-last: pass --layout nhwc if it is." in " ".join(res.stderr.split())


def test_an_empty_shard_counts_for_nothing_with_a_note(runner: CliRunner, tmp_path: Path) -> None:
    x = np.random.default_rng(4).normal(size=(3, 2, 4, 4))
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", np.zeros((0, 2, 4, 4)))
    doc = stats_json(runner, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"))
    assert doc["count"] == 48
    np.testing.assert_allclose(doc["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-13)
    assert any(n.startswith("1 input with no values") for n in doc["notes"])


# -- precision: pairwise summation, against exact integer sums ----------------------------------
def exact_mean_var(x: np.ndarray, axes: tuple[int, ...], scale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance as exact fractions of Python-int sums, rounded once to float64."""
    xi = x.astype(np.int64)
    n = x.size // xi.sum(axis=axes).size
    s1 = [int(v) for v in xi.sum(axis=axes)]
    s2 = [int(v) for v in (xi * xi).sum(axis=axes)]
    mean = np.array([float(Fraction(a, n * scale)) for a in s1])
    var = np.array([float(Fraction(n * q - a * a, n * n * scale * scale)) for a, q in zip(s1, s2, strict=True)])
    return mean, var


def max_rel(got: list[float], ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got) / ref - 1)))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_stats_are_exact_to_1e15_at_any_chunk_size(runner: CliRunner, tmp_path: Path, layout: str) -> None:
    # 614,400 uint8 values per channel: the sequential sum of squares (einsum) lost up to
    # 2.4e-13 of the variance here; pairwise summation keeps it at a few ulps.
    rng = np.random.default_rng(5)
    shape = (600, 32, 32, 3) if layout == "nhwc" else (600, 3, 32, 32)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    axes = (0, 1, 2) if layout == "nhwc" else (0, 2, 3)
    mean, var = exact_mean_var(x, axes)
    mean255, var255 = exact_mean_var(x, axes, scale=255)
    for chunk in ("3K", "100K", "1M", "8M"):
        doc = stats_json(runner, str(tmp_path / "x.npy"), "--layout", layout, "--chunk-size", chunk)
        assert max_rel(doc["mean"], mean) <= 1e-15, chunk
        assert max_rel(doc["var"], var) <= 2e-15, chunk
        doc = stats_json(runner, str(tmp_path / "x.npy"), "--layout", layout, "--chunk-size", chunk, "--scale", "255")
        assert max_rel(doc["mean"], mean255) <= 1e-15, chunk
        assert max_rel(doc["var"], var255) <= 2e-15, chunk


@pytest.mark.parametrize("elements", [37, 4096, moments.SUB_BLOCK_ELEMENTS])
def test_block_moments_sum_squares_pairwise(monkeypatch: pytest.MonkeyPatch, elements: int) -> None:
    """Whatever the piece size, one block's M2 is within a few ulps of the exact one."""
    monkeypatch.setattr(moments, "SUB_BLOCK_ELEMENTS", elements)
    x = np.random.default_rng(6).integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    m = moments.block_moments(x)
    _, var = exact_mean_var(x, (0, 2, 3))
    assert np.max(np.abs(m.var / var - 1)) <= 2e-15
