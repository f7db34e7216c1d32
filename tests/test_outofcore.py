"""Out-of-core normalize: equals the in-memory path and nn.BatchNorm2d, never leaves partial files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bncli import core, io, outofcore
from bncli.cli import app
from bncli.errors import DTypeError, InputError, OutputError, ShapeError

TOL = {torch.float16: {"rtol": 2e-3, "atol": 2e-3}, torch.float32: {"rtol": 1e-5, "atol": 1e-5},
       torch.float64: {"rtol": 1e-10, "atol": 1e-10}}


def make(tmp_path: Path, shape: tuple[int, ...], dtype: str = "float32", seed: int = 0,
         name: str = "x.npy") -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.5, 3, size=shape[-1 if len(shape) == 4 else 0]) + 2
    x = x.astype(dtype)
    path = tmp_path / name
    np.save(path, x)
    return path, x


def both(tmp_path: Path, path: Path, *, chunk_bytes: int = 700, workers: int | None = None,
         **kw: Any) -> tuple[core.NormalizeResult, core.NormalizeResult]:
    opts = kw.pop("opts", core.EngineOptions())
    common = {"key": None, "mode": kw.pop("mode", "train"), "layout": kw.pop("layout", "nchw"), "opts": opts,
              "force": True}
    mem = core.normalize_file(path, tmp_path / "mem.npy", save_state=kw.pop("mem_state", None),
                              execution="in-memory", **common)
    ooc = outofcore.normalize_streamed(path, tmp_path / "ooc.npy", chunk_bytes=chunk_bytes, workers=workers,
                                       save_state=kw.pop("ooc_state", None), **common)
    assert not kw
    return mem, ooc


def assert_same(tmp_path: Path, mem: core.NormalizeResult, ooc: core.NormalizeResult, dtype: torch.dtype) -> None:
    a, b = np.load(tmp_path / "mem.npy"), np.load(tmp_path / "ooc.npy")
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), **TOL[dtype])
    assert mem.state.keys() == ooc.state.keys()
    for k in mem.state:
        torch.testing.assert_close(ooc.state[k], mem.state[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ooc.mean_before, mem.mean_before, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ooc.std_before, mem.std_before, rtol=1e-9)
    np.testing.assert_allclose(ooc.mean_after, mem.mean_after, atol=2e-3 if dtype == torch.float16 else 1e-5)
    np.testing.assert_allclose(ooc.std_after, mem.std_after, rtol=2e-3 if dtype == torch.float16 else 1e-5)
    assert ooc.execution["path"] == "out-of-core" and mem.execution == {"path": "in-memory"}


# -- equality with the in-memory path ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_streamed_equals_in_memory(tmp_path: Path, dtype: str, layout: str, mode: str) -> None:
    shape = (13, 5, 4, 3) if layout == "nhwc" else (13, 3, 5, 4)
    path, _ = make(tmp_path, shape, dtype)
    mem, ooc = both(tmp_path, path, mode=mode, layout=layout)
    assert_same(tmp_path, mem, ooc, getattr(torch, dtype))
    assert ooc.execution["passes"] == (2 if mode == "train" else 1)


@pytest.mark.parametrize("opts", [
    core.EngineOptions(momentum=None),
    core.EngineOptions(affine=False, eps=1e-3),
    core.EngineOptions(track_running_stats=False),
    core.EngineOptions(weight="0.5,2,-1", bias="1,0,0.25", momentum=0.3),
], ids=["cumulative", "no-affine", "no-running-stats", "weight-bias"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_options_stream_like_the_module(tmp_path: Path, opts: core.EngineOptions, mode: str) -> None:
    path, _ = make(tmp_path, (9, 3, 4, 4))
    mem, ooc = both(tmp_path, path, mode=mode, opts=opts)
    assert_same(tmp_path, mem, ooc, torch.float32)


def test_eval_with_checkpoint_running_stats(tmp_path: Path) -> None:
    module = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        module.running_var.copy_(torch.tensor([4.0, 0.25, 9.0]))
        module.weight.copy_(torch.tensor([1.5, 1.0, -0.5]))
    torch.save({"model": {"bn": module.state_dict()}}, tmp_path / "ckpt.pt")
    path, x = make(tmp_path, (10, 3, 6, 2))
    opts = core.EngineOptions(state=tmp_path / "ckpt.pt", prefix="bn")
    mem, ooc = both(tmp_path, path, mode="eval", opts=opts,
                    mem_state=tmp_path / "mem_state.pt", ooc_state=tmp_path / "ooc_state.pt")
    assert_same(tmp_path, mem, ooc, torch.float32)
    module.eval()
    expected = module(torch.from_numpy(x)).detach()
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "ooc.npy")), expected)
    saved = torch.load(tmp_path / "ooc_state.pt", weights_only=True)
    torch.testing.assert_close(saved["running_var"], module.running_var)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), c=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4),
       chunk=st.integers(1, 600), layout=st.sampled_from(["nchw", "nhwc"]), seed=st.integers(0, 999))
def test_any_chunking_matches_batchnorm2d(tmp_path_factory: pytest.TempPathFactory, n: int, c: int, h: int,
                                          w: int, chunk: int, layout: str, seed: int) -> None:
    tmp = tmp_path_factory.mktemp("h")
    shape = (n, h, w, c) if layout == "nhwc" else (n, c, h, w)
    path, x = make(tmp, shape, seed=seed)
    result = outofcore.normalize_streamed(path, tmp / "y.npy", layout=layout, chunk_bytes=chunk)
    module = torch.nn.BatchNorm2d(c)
    xt = torch.from_numpy(x)
    expected = module(xt.permute(0, 3, 1, 2) if layout == "nhwc" else xt).detach()
    if layout == "nhwc":
        expected = expected.permute(0, 2, 3, 1)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp / "y.npy")), expected, rtol=1e-5, atol=1e-5)
    for k, v in module.state_dict().items():
        torch.testing.assert_close(result.state[k], v, rtol=1e-5, atol=1e-6)


def test_threads_do_not_change_the_bytes(tmp_path: Path) -> None:
    path, _ = make(tmp_path, (30, 3, 5, 5))
    outofcore.normalize_streamed(path, tmp_path / "one.npy", chunk_bytes=500, workers=1)
    outofcore.normalize_streamed(path, tmp_path / "four.npy", chunk_bytes=500, workers=4)
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "four.npy").read_bytes()


# -- interruption and failures leave nothing behind ----------------------------------------------
def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "x.npy")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("disk on fire")])
def test_interrupted_write_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            exc: BaseException) -> None:
    path, _ = make(tmp_path, (20, 3, 4, 4))
    calls = {"n": 0}
    real = io.NpyWriter.write

    def flaky(self: io.NpyWriter, block: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        real(self, block)

    monkeypatch.setattr(io.NpyWriter, "write", flaky)
    with pytest.raises(type(exc)):
        outofcore.normalize_streamed(path, tmp_path / "y.npy", chunk_bytes=400)
    assert calls["n"] >= 3  # the writer thread may already hold the next chunk
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["statistics", "apply"])
def test_interrupt_in_either_pass_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   where: str) -> None:
    path, _ = make(tmp_path, (20, 3, 4, 4))
    calls = {"n": 0}
    target = "block_moments" if where == "statistics" else None
    if target:
        real_bm = outofcore.block_moments

        def bm(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return real_bm(*a, **k)

        monkeypatch.setattr(outofcore, "block_moments", bm)
    else:
        from bncli.engine import BatchNormEngine

        real_apply = BatchNormEngine.apply_with_stats

        def apply(self: Any, *a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
            return real_apply(self, *a, **k)

        monkeypatch.setattr(BatchNormEngine, "apply_with_stats", apply)
    with pytest.raises(KeyboardInterrupt):
        outofcore.normalize_streamed(path, tmp_path / "y.npy", chunk_bytes=300, save_state=tmp_path / "s.pt")
    assert leftovers(tmp_path) == []


def test_ctrl_c_in_the_cli_exits_130_without_files(runner: CliRunner, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = make(tmp_path, (20, 3, 4, 4))

    def boom(self: io.NpyWriter, block: np.ndarray) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(io.NpyWriter, "write", boom)
    res = runner.invoke(app, ["normalize", str(path), "--out-of-core", "--chunk-size", "300"])
    assert res.exit_code == 130 and "no partial output" in res.stderr
    assert leftovers(tmp_path) == []


def test_full_disk_fails_before_the_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = make(tmp_path, (8, 3, 4, 4))

    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OutputError, match="not enough disk space"):
        outofcore.normalize_streamed(path, tmp_path / "y.npy")
    assert leftovers(tmp_path) == []


def test_npy_writer_refuses_to_write_past_a_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = io.NpyWriter(tmp_path / "a.npy", (4, 2), "<f4")

    def broken(data: object) -> int:
        raise OSError(errno.EIO, "I/O error")

    real = w._fh.write
    monkeypatch.setattr(w._fh, "write", broken)
    with pytest.raises(OSError):
        w.write(np.ones((1, 2), np.float32))
    monkeypatch.setattr(w._fh, "write", real)
    with pytest.raises(OutputError, match="earlier write failed"):
        w.write(np.ones((1, 2), np.float32))
    w._fh.close()


def test_npy_writer_checks_completeness(tmp_path: Path) -> None:
    with io.NpyWriter(tmp_path / "a.npy", (3, 2), "<f4") as w:
        w.write(np.ones((2, 2), np.float32))
        w.write(np.zeros((1, 2), np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), [[1, 1], [1, 1], [0, 0]])
    w = io.NpyWriter(tmp_path / "b.npy", (3, 2), "<f4")
    w.write(np.ones((1, 2), np.float32))
    with pytest.raises(OutputError, match="only 8 of 24 bytes"):
        w.close()
    with pytest.raises(ValueError, match="does not fit"), io.NpyWriter(tmp_path / "c.npy", (3, 2), "<f4") as w:
        w.write(np.ones((1, 2), np.float64))


# -- choosing the path -------------------------------------------------------------------------
def test_auto_streams_only_big_npy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = make(tmp_path, (4, 3, 4, 4))
    assert not outofcore.use_out_of_core(path, tmp_path / "y.npy")
    monkeypatch.setattr(outofcore, "AUTO_MIN_BYTES", 100)
    assert outofcore.use_out_of_core(path, tmp_path / "y.npy")
    assert not outofcore.use_out_of_core(path, tmp_path / "y.pt")
    assert not outofcore.use_out_of_core(path, tmp_path / "y.npy", execution="in-memory")
    monkeypatch.setattr(outofcore, "AUTO_MIN_BYTES", 1 << 40)
    monkeypatch.setattr(io, "available_memory", lambda: 1000)
    assert outofcore.use_out_of_core(path, tmp_path / "y.npy")  # would not fit: stream


def test_forced_out_of_core_explains_what_cannot_stream(tmp_path: Path) -> None:
    path, x = make(tmp_path, (4, 3, 4, 4))
    with pytest.raises(OutputError, match="writes .npy"):
        outofcore.use_out_of_core(path, tmp_path / "y.pt", execution="out-of-core")
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    with pytest.raises(InputError, match="not a .npy file"):
        outofcore.use_out_of_core(tmp_path / "x.pt", tmp_path / "y.npy", execution="out-of-core")
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    with pytest.raises(InputError, match="Fortran"):
        outofcore.use_out_of_core(tmp_path / "f.npy", tmp_path / "y.npy", execution="out-of-core")
    assert not outofcore.use_out_of_core(tmp_path / "f.npy", tmp_path / "y.npy")  # auto: in memory


@pytest.mark.parametrize(("shape", "dtype", "error", "message"), [
    ((4, 3, 4), "float32", ShapeError, "no batch dimension"),
    ((4, 3, 4, 4), "uint8", DTypeError, "uint8"),
    ((1, 3, 1, 1), "float32", ShapeError, "one value per channel"),
])
def test_invalid_input_is_refused_from_its_header(tmp_path: Path, shape: tuple[int, ...], dtype: str,
                                                  error: type, message: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros(shape, dtype))
    with pytest.raises(error, match=message):
        outofcore.normalize_streamed(tmp_path / "x.npy", tmp_path / "y.npy")
    assert leftovers(tmp_path) == []


# -- the command -------------------------------------------------------------------------------
def test_cli_out_of_core_and_in_memory_agree(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = make(tmp_path, (11, 3, 5, 5))
    a = runner.invoke(app, ["normalize", str(path), "-o", str(tmp_path / "a.npy"), "--out-of-core",
                            "--chunk-size", "1K", "--json"])
    b = runner.invoke(app, ["normalize", str(path), "-o", str(tmp_path / "b.npy"), "--in-memory", "--json"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    da, db = json.loads(a.stdout), json.loads(b.stdout)
    assert da["execution"] == {"path": "out-of-core", "passes": 2, "chunk_bytes": 1024,
                               "workers": outofcore.default_workers(), "after_statistics": "derived"}
    assert db["execution"] == {"path": "in-memory"}
    assert da["state"]["num_batches_tracked"] == db["state"]["num_batches_tracked"] == 1
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), rtol=1e-5, atol=1e-5)
    text = runner.invoke(app, ["normalize", str(path), "-o", str(tmp_path / "c.npy"), "--out-of-core"])
    assert "out-of-core 2 passes, " in text.stdout and text.stderr == ""


def test_cli_out_of_core_refusals(runner: CliRunner, tmp_path: Path) -> None:
    path, _ = make(tmp_path, (4, 3, 4, 4))
    res = runner.invoke(app, ["normalize", str(path), "-o", str(tmp_path / "y.pt"), "--out-of-core"])
    assert res.exit_code == 1 and "writes .npy" in res.stderr and "--in-memory" in res.stderr
    res = runner.invoke(app, ["normalize", str(path), "--chunk-size", "nope"])
    assert res.exit_code == 2
    help_text = runner.invoke(app, ["normalize", "--help"]).stdout
    assert "--out-of-core" in help_text and "--chunk-size" in help_text


@pytest.mark.parametrize(("mode", "tasks"), [("train", ["pass 1/2 statistics", "pass 2/2 normalize"]),
                                             ("eval", ["pass 1/1 normalize"])])
def test_progress_reports_every_byte_of_each_pass(tmp_path: Path, mode: str, tasks: list[str]) -> None:
    path, x = make(tmp_path, (17, 3, 4, 4))
    calls: list[tuple[str, int, int]] = []
    outofcore.normalize_streamed(path, tmp_path / "y.npy", mode=mode, chunk_bytes=500,
                                 progress=lambda *a: calls.append(a))
    assert [t for t in dict.fromkeys(c[0] for c in calls)] == tasks
    for task in tasks:
        done = [d for t, d, total in calls if t == task]
        assert done[0] == 0 and done[-1] == x.nbytes and done == sorted(done)
        assert {total for t, _, total in calls if t == task} == {x.nbytes}
