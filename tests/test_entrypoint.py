"""The installed entry points, and the startup promise: no torch for --help or check-shape on .npy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bncli import __version__

SCRIPT = Path(sys.executable).with_name("bncli")

PROBE = """
import sys
from bncli.cli import app
try:
    app(sys.argv[1:], standalone_mode=True)
except SystemExit as exc:
    code = exc.code
print("TORCH_IMPORTED=" + str("torch" in sys.modules), "EXIT=" + str(code), file=sys.stderr)
"""


def probe(*args: str) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    line = proc.stderr.strip().splitlines()[-1]
    return "TORCH_IMPORTED=True" in line, line


@pytest.mark.skipif(not SCRIPT.exists(), reason="bncli console script not installed beside this python")
def test_console_script_runs(tmp_path: Path) -> None:
    proc = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"bncli {__version__}"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4, 2, 3, 3)).astype(np.float32))
    proc = subprocess.run([str(SCRIPT), "normalize", str(tmp_path / "x.npy"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.bn.npy").exists()


def test_python_dash_m(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bncli", "check-shape", str(tmp_path / "missing.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "no such file" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["normalize", "--help"], ["check-shape", "--help"],
                                  ["compare", "--help"], ["inspect", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    imported, line = probe(*args)
    assert not imported, line
    assert "EXIT=0" in line


def test_check_shape_npy_does_not_import_torch(tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", np.zeros((2, 3, 4, 4), np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 4), np.uint8))
    imported, line = probe("check-shape", str(tmp_path / "ok.npy"), str(tmp_path / "bad.npy"), "--json")
    assert not imported, line
    assert "EXIT=1" in line


def test_inspect_on_a_data_npy_does_not_import_torch(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 4), np.float32))
    imported, line = probe("inspect", str(tmp_path / "x.npy"))
    assert not imported, line
    assert "EXIT=1" in line


def test_normalize_does_import_torch(tmp_path: Path) -> None:
    """Control for the probe: it does see torch when a command needs it."""
    np.save(tmp_path / "ok.npy", np.zeros((2, 3, 4, 4), np.float32))
    imported, line = probe("normalize", str(tmp_path / "ok.npy"))
    assert imported and "EXIT=0" in line


@pytest.mark.slow
@pytest.mark.skipif(not SCRIPT.exists(), reason="bncli console script not installed beside this python")
def test_ctrl_c_leaves_no_partial_file(tmp_path: Path) -> None:
    """A real SIGINT mid-write: exit 130, neither the output nor a temp file remains."""
    import signal
    import time

    src = tmp_path / "big.npy"
    out = np.lib.format.open_memmap(src, mode="w+", dtype=np.float32, shape=(512, 4, 128, 128))
    out[:] = 1.0
    out[::2] = 3.0
    del out
    proc = subprocess.Popen([str(SCRIPT), "normalize", str(src), "--out-of-core", "--chunk-size", "256K"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".big.bn.npy.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy"]
