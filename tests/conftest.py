"""Shared fixtures: files under tmp_path, a CliRunner with a fixed terminal width."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

WIDTH = "120"


@pytest.fixture(autouse=True)
def _keep_sigint_handler() -> Iterator[None]:
    """bncli.cli.main ignores SIGINT once a command is over (for the interpreter's teardown);
    a test that calls main() in-process must not leave pytest deaf to Ctrl-C."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """In-process CLI runner; stdout and stderr are separate (result.stdout / result.stderr)."""
    monkeypatch.setenv("COLUMNS", WIDTH)
    monkeypatch.setenv("NO_COLOR", "1")
    return CliRunner(env={"COLUMNS": WIDTH, "NO_COLOR": "1", "TERM": "dumb"})


@pytest.fixture
def npy_file(tmp_path: Path) -> Callable[..., Path]:
    """Write an array to tmp_path/<name>.npy and return the path."""

    def make(array: np.ndarray, name: str = "x.npy") -> Path:
        path = tmp_path / name
        np.save(path, array)
        return path

    return make


@pytest.fixture
def batch(tmp_path: Path) -> Path:
    """A valid (8, 3, 6, 5) float32 NCHW batch with per-channel offsets and scales."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3, 6, 5)) * np.array([1.0, 2.0, 0.5])[None, :, None, None]
    x += np.array([0.5, -1.0, 3.0])[None, :, None, None]
    path = tmp_path / "batch.npy"
    np.save(path, x.astype(np.float32))
    return path


@pytest.fixture(scope="session")
def small_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/pt2_helpers.SmallNet (seed 0) exported with a dynamic batch axis, once per session.

    Tests copy it before writing anything beside it.
    """
    from pt2_helpers import export, small_net

    return export(small_net(), tmp_path_factory.mktemp("pt2") / "small.pt2")
