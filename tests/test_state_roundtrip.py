"""Every state bncli writes loads back into bncli (--state) and into nn.BatchNorm2d (issue 11, defect 5)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from bncli.cli import app

FLAGS = list(itertools.product([True, False], [True, False], ["0.1", "none"], [".pt", ".safetensors"],
                               ["float32", "float64"]))


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def layer_flags(affine: bool, track: bool) -> list[str]:
    return [f"--{'' if affine else 'no-'}affine", f"--{'' if track else 'no-'}track-running-stats"]


@pytest.mark.parametrize(("affine", "track", "momentum", "suffix", "dtype"), FLAGS)
def test_normalize_state_loads_back(runner: CliRunner, tmp_path: Path, affine: bool, track: bool,
                                    momentum: str, suffix: str, dtype: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 3, 4, 4)) * 2 + 1).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    flags = [*layer_flags(affine, track), "--momentum", momentum]
    state = tmp_path / f"state{suffix}"
    first = runner.invoke(app, ["normalize", str(tmp_path / "x.npy"), "-o", str(tmp_path / "a.npy"),
                                *flags, "--save-state", str(state)])
    assert first.exit_code == 0, first.output
    saved = load(state)

    # Into the module, strictly: exactly the keys this configuration has.
    module = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track,
                                  momentum=None if momentum == "none" else float(momentum),
                                  dtype=getattr(torch, dtype))  # bncli keeps a float64 layer float64
    module.load_state_dict(saved)
    assert set(saved) == set(module.state_dict())

    # Into bncli, with the flags it was written with, in both modes.
    for mode in ("train", "eval"):
        again = runner.invoke(app, ["normalize", str(tmp_path / "x.npy"), "-o", str(tmp_path / f"b_{mode}.npy"),
                                    *flags, "--state", str(state), "--mode", mode, "--json"])
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["ignored_state_keys"] == []
    # Eval with the saved state is the module's eval with it.
    module.eval()
    expected = module.double()(torch.from_numpy(x.astype(np.float64))).detach()  # float32 input: exact in float64
    got = torch.from_numpy(np.load(tmp_path / "b_eval.npy").astype(np.float64))
    tol = 1e-5 if dtype == "float32" else 1e-12
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_compare_takes_every_state_too(runner: CliRunner, batch: Path, tmp_path: Path) -> None:
    for affine, track in itertools.product([True, False], repeat=2):
        state = tmp_path / f"s_{affine}_{track}.pt"
        flags = layer_flags(affine, track)
        assert runner.invoke(app, ["normalize", str(batch), "-o", str(tmp_path / f"o_{affine}_{track}.npy"),
                                   *flags, "--save-state", str(state)]).exit_code == 0
        result = runner.invoke(app, ["compare", str(batch), *flags, "--state", str(state), "--json"])
        assert result.exit_code == 0, result.output


def test_an_empty_state_with_a_layer_that_needs_one_says_so(runner: CliRunner, batch: Path,
                                                             tmp_path: Path) -> None:
    state = tmp_path / "empty.pt"
    assert runner.invoke(app, ["normalize", str(batch), "-o", str(tmp_path / "o.npy"), "--no-affine",
                               "--no-track-running-stats", "--save-state", str(state)]).exit_code == 0
    assert load(state) == {}
    result = runner.invoke(app, ["normalize", str(batch), "-o", str(tmp_path / "p.npy"), "--state", str(state)])
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "holds an empty state_dict" in text and "--no-affine --no-track-running-stats" in text


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("scale", ["1", "255"])
def test_stats_state_loads_back(runner: CliRunner, tmp_path: Path, suffix: str, scale: str) -> None:
    x = np.random.default_rng(1).integers(0, 256, size=(8, 3, 5, 5)).astype(np.uint8)
    np.save(tmp_path / "u8.npy", x)
    np.save(tmp_path / "f.npy", x.astype(np.float32) / float(scale))
    state = tmp_path / f"stats{suffix}"
    result = runner.invoke(app, ["stats", str(tmp_path / "u8.npy"), "--scale", scale, "--save-state", str(state)])
    assert result.exit_code == 0, result.output
    module = torch.nn.BatchNorm2d(3)
    module.load_state_dict(load(state))  # strict
    for mode in ("train", "eval"):
        again = runner.invoke(app, ["normalize", str(tmp_path / "f.npy"), "-o", str(tmp_path / f"o_{mode}.npy"),
                                    "--state", str(state), "--mode", mode])
        assert again.exit_code == 0, again.output
    module.eval()
    expected = module(torch.from_numpy(np.load(tmp_path / "f.npy"))).detach()
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "o_eval.npy")), expected)
