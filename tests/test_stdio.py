"""Standard input and output: `-` in, `-o -` out, format from the bytes or --format, never unpickled."""

from __future__ import annotations

import io as pyio
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from torch import nn
from typer.testing import CliRunner

from bncli import io
from bncli.cli import app
from bncli.errors import InputError, OutputError

BNCLI = [sys.executable, "-m", "bncli"]


class Evil:
    """Unpickling this creates the marker file: proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def batch(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(6, 3, 4, 5)) * np.array([1.0, 2.0, 0.5])[None, :, None, None] + 1.0).astype(np.float32)


def npy_bytes(x: np.ndarray) -> bytes:
    buffer = pyio.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("BNCLI_DEBUG", "RANK", "WORLD_SIZE")}
    return {**out, "COLUMNS": "80", "NO_COLOR": "1", **extra}


def test_a_real_pipe_npy_in_npy_out(tmp_path: Path) -> None:
    x = batch()
    np.save(tmp_path / "a.npy", x)
    with (tmp_path / "a.npy").open("rb") as fin, (tmp_path / "b.npy").open("wb") as fout:
        proc = subprocess.run([*BNCLI, "normalize", "-", "-o", "-", "--format", "npy"], stdin=fin, stdout=fout,
                              stderr=subprocess.PIPE, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    # stdout holds exactly the data: byte for byte what the file-to-file run writes.
    assert subprocess.run([*BNCLI, "normalize", str(tmp_path / "a.npy"), "-o", str(tmp_path / "c.npy")],
                          env=env(), capture_output=True, timeout=120).returncode == 0
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "c.npy").read_bytes()
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "b.npy")),
                               nn.BatchNorm2d(3)(torch.from_numpy(x)).detach(), rtol=0, atol=0)
    # ... and the report went to stderr.
    assert proc.stderr.startswith("input <stdin>  shape (6, 3, 4, 5)  dtype float32")
    assert "wrote standard output" in proc.stderr


def test_a_pipe_between_two_bncli_runs(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", batch())
    first = subprocess.Popen([*BNCLI, "normalize", str(tmp_path / "a.npy"), "-o", "-"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env())
    second = subprocess.run([*BNCLI, "normalize", "-", "-o", str(tmp_path / "twice.npy"), "--mode", "eval"],
                            stdin=first.stdout, capture_output=True, text=True, env=env(), timeout=120)
    assert first.stdout is not None
    first.stdout.close()
    assert first.wait(timeout=120) == 0 and second.returncode == 0, second.stderr
    once = nn.BatchNorm2d(3)(torch.from_numpy(batch())).detach()
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "twice.npy")),
                               nn.BatchNorm2d(3).eval()(once).detach(), rtol=0, atol=0)


def test_stdin_is_capped_with_a_clear_error(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", batch())
    with (tmp_path / "a.npy").open("rb") as fin:
        proc = subprocess.run([*BNCLI, "normalize", "-", "-o", str(tmp_path / "b.npy")], stdin=fin,
                              capture_output=True, text=True, env=env(BNCLI_STDIN_LIMIT="1K"), timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("Error: Standard input holds more than 1 KiB, the most bncli buffers in")
    assert "BNCLI_STDIN_LIMIT" in proc.stderr and not (tmp_path / "b.npy").exists()


def stdin_input(kind: str) -> tuple[bytes, torch.Tensor]:
    x = torch.from_numpy(batch(1))
    buffer = pyio.BytesIO()
    if kind == "npy":
        np.save(buffer, x.numpy())
    elif kind == "npz":
        np.savez(buffer, images=x.numpy())
    elif kind == "pt":
        torch.save({"images": x}, buffer)
    elif kind == "pt-legacy":
        torch.save({"images": x}, buffer, _use_new_zipfile_serialization=False)
    else:
        buffer.write(save({"images": x}))
    return buffer.getvalue(), x


def decode(data: bytes, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "npy":
        return {"": torch.from_numpy(np.load(pyio.BytesIO(data)))}
    if fmt == "npz":
        with np.load(pyio.BytesIO(data)) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    if fmt == "pt":
        obj = torch.load(pyio.BytesIO(data), weights_only=True)
        return obj if isinstance(obj, dict) else {"": obj}
    return load(data)


@pytest.mark.parametrize("kind", ["npy", "npz", "pt", "pt-legacy", "safetensors"])
def test_stdin_format_is_told_from_its_bytes(runner: CliRunner, tmp_path: Path, kind: str) -> None:
    data, x = stdin_input(kind)
    key = [] if kind == "npy" else ["--key", "images"]
    res = runner.invoke(app, ["normalize", "-", "-o", str(tmp_path / "y.npy"), *key, "--json"], input=data)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["input"] == "<stdin>"
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")),
                               nn.BatchNorm2d(3)(x).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["npy", "npz", "pt", "safetensors"])
def test_stdout_format_from_format_or_the_input(runner: CliRunner, tmp_path: Path, fmt: str) -> None:
    x = batch(2)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(6))
    args = ["normalize", str(tmp_path / "d.npz"), "--key", "images", "-o", "-"]
    res = runner.invoke(app, [*args, "--format", fmt])
    assert res.exit_code == 0, res.stderr
    out = decode(res.stdout_bytes, fmt)
    want = nn.BatchNorm2d(3)(torch.from_numpy(x)).detach()
    if fmt == "npy":
        torch.testing.assert_close(out[""], want, rtol=0, atol=0)
    else:
        assert list(out) == ["images", "labels"] or sorted(out) == ["images", "labels"]
        torch.testing.assert_close(out["images"], want, rtol=0, atol=0)
        assert out["labels"].tolist() == list(range(6))
    assert "wrote standard output" in res.stderr and "Per-channel statistics" in res.stderr
    default = runner.invoke(app, args)  # no --format: the input's (.npz)
    assert sorted(decode(default.stdout_bytes, "npz")) == ["images", "labels"]


def test_stdout_with_save_state(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(app, ["normalize", "-", "-o", "-", "--save-state", str(tmp_path / "s.pt")],
                        input=npy_bytes(batch()))
    assert res.exit_code == 0, res.stderr
    assert int(torch.load(tmp_path / "s.pt", weights_only=True)["num_batches_tracked"]) == 1
    assert np.load(pyio.BytesIO(res.stdout_bytes)).shape == (6, 3, 4, 5)


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle", "object.npy", "object.npz"])
def test_stdin_is_never_unpickled(runner: CliRunner, tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    buffer = pyio.BytesIO()
    if how == "torch.save":
        torch.save({"x": torch.zeros(2, 3, 2, 2), "payload": Evil(marker)}, buffer)
    elif how == "raw-pickle":
        buffer.write(pickle.dumps(Evil(marker)))
    elif how == "object.npy":
        np.save(buffer, np.array([Evil(marker), 1], dtype=object), allow_pickle=True)
    else:
        np.savez(buffer, x=np.array([Evil(marker)], dtype=object))
    res = runner.invoke(app, ["normalize", "-", "-o", str(tmp_path / "y.npy")], input=buffer.getvalue())
    assert res.exit_code == 1 and "refused to load" in res.stderr and "pickle" in res.stderr
    assert not marker.exists(), "reading stdin ran the payload"
    pickle.loads(pickle.dumps(Evil(marker)))  # control: the payload is live
    assert marker.exists()


@pytest.mark.parametrize(("data", "message"), [(b"", "Standard input is empty."),
                                               (b"hello world, not a tensor", "<stdin>: not a tensor file")])
def test_bad_stdin(runner: CliRunner, tmp_path: Path, data: bytes, message: str) -> None:
    res = runner.invoke(app, ["normalize", "-", "-o", str(tmp_path / "y.npy")], input=data)
    assert res.exit_code == 1 and res.stderr.startswith(f"Error: {message}")


@pytest.mark.parametrize(("args", "message"), [
    (["-", str(Path("x.npy"))], "must be the only input"),
    (["-"], "has no name to derive an output from"),
    (["-", "-o", "y.npy", "--dataset-stats"], "standard input can be read once"),
    (["-", "-o", "-", "--json"], "no JSON document can go there"),
])
def test_stdin_usage_errors(runner: CliRunner, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["normalize", *args], input=b"")
    assert res.exit_code == 2 and message in " ".join(res.stderr.split())


def test_out_of_core_cannot_stream_stdin(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(app, ["normalize", "-", "-o", str(tmp_path / "y.npy"), "--out-of-core"],
                        input=npy_bytes(batch()))
    assert res.exit_code == 1 and "standard input and output are read and written whole" in res.stderr


def test_stdout_terminal_and_stdin_terminal_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(pyio.BytesIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    with pytest.raises(OutputError, match="which is a terminal here"):
        io.check_stdout()
    monkeypatch.setattr(sys, "stdin", Tty())
    with pytest.raises(InputError, match="which is a terminal here"):
        io.read_stdin()


def test_read_stdin_stops_at_the_cap_and_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    data = npy_bytes(batch())
    assert io.read_stdin(pyio.BytesIO(data), limit=len(data)).suffix == ".npy"
    with pytest.raises(InputError, match="holds more than"):
        io.read_stdin(pyio.BytesIO(data), limit=len(data) - 1)
    monkeypatch.setenv("BNCLI_STDIN_LIMIT", "lots")
    with pytest.raises(InputError, match="BNCLI_STDIN_LIMIT='lots'"):
        io.read_stdin(pyio.BytesIO(data))


def test_compare_reads_stdin(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", batch())
    from_file: Any = json.loads(runner.invoke(app, ["compare", str(tmp_path / "a.npy"), "--json"]).stdout)
    res = runner.invoke(app, ["compare", "-", "--json"], input=npy_bytes(batch()))
    assert res.exit_code == 0, res.output
    assert {**json.loads(res.stdout), "input": None} == {**from_file, "input": None}


class Endless(pyio.RawIOBase):
    """An endless stream of one repeated chunk, counting the bytes handed out."""

    def __init__(self, chunk: bytes) -> None:
        self.chunk, self.served = chunk, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        out = (self.chunk * (size // len(self.chunk) + 1))[:size]
        self.served += len(out)
        return out


def test_garbage_on_stdin_is_refused_from_its_first_bytes() -> None:
    stream = Endless(bytes(range(7, 250)))  # no format starts like this; /dev/urandom, in effect
    with pytest.raises(InputError, match=r"not a tensor file bncli reads \(it starts with b'\\x07\\x08"):
        io.read_stdin(stream, limit=1 << 40)  # type: ignore[arg-type]
    assert stream.served <= 1 << 20, "refused only after buffering the stream"


@pytest.mark.parametrize("head", [b"\x93NUMPY\x01\x00", b"PK\x03\x04", b"\x80\x02",
                                  b"\x10\x00\x00\x00\x00\x00\x00\x00{"])
def test_a_plausible_start_is_read_to_the_cap(head: bytes) -> None:
    stream = Endless(head + b"\x00" * 100)
    with pytest.raises(InputError, match="holds more than 4 MiB"):
        io.read_stdin(stream, limit=4 << 20)  # type: ignore[arg-type]


def test_urandom_on_stdin_is_refused_at_once(tmp_path: Path) -> None:
    with Path("/dev/urandom").open("rb") as fin:
        proc = subprocess.run([*BNCLI, "normalize", "-", "-o", "-", "--format", "npy"], stdin=fin,
                              capture_output=True, env=env(), timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and proc.stdout == b"" and "not a tensor file bncli reads" in err


def test_an_exported_model_on_stdin_is_named_as_one(runner: CliRunner, tmp_path: Path) -> None:
    data = (Path(__file__).parents[1] / "sample_data" / "model.pt2").read_bytes()
    res = runner.invoke(app, ["normalize", "-", "-o", str(tmp_path / "y.npy")], input=data)
    text = " ".join(res.stderr.split())
    assert res.exit_code == 1 and "<stdin>: holds an exported model (.pt2, torch.export.save)" in text
    assert "bncli inspect model.pt2" in text and "bncli compare model.pt2 --data" in text
    assert not (tmp_path / "y.npy").exists()
