"""``bncli bench``: the timing harness, a tiny CPU sweep through the CLI, the JSON schema, errors.

Timings are never asserted against a speed: only the harness's own arithmetic is checked,
on calls of known cost, with bounds a loaded 2-core machine meets.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from bncli import bench, timing
from bncli.cli import app
from bncli.commands.bench import Preset
from bncli.engine import available_devices

TINY = ["bench", "--shape", "2,3,8,8", "--dtype", "float32", "--reps", "3", "--warmup", "1"]
VARIANT_KEYS = {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "reps", "method", "gbs", "pct_of_copy",
                "max_abs_err", "error"}
RESULT_KEYS = {"shape", "dtype", "layout", "mode", "pass", "bytes", "bytes_model", "engine_path",
               "ratio_engine_nn", "variants"}


@pytest.fixture(scope="module")
def tiny_doc() -> dict[str, Any]:
    """One tiny sweep, run once through the CLI for the schema tests."""
    result = CliRunner(env={"COLUMNS": "120", "NO_COLOR": "1"}).invoke(app, [*TINY, "--json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- the harness ---------------------------------------------------------------------------
def test_harness_measures_a_sleep() -> None:
    result = timing.measure(lambda: time.sleep(0.02), reps=5, warmup=1)
    assert len(result.times) == 5 and result.method == "perf_counter"
    assert 0.019 < result.median < 0.2  # sleep never returns early; a busy machine may be late
    assert result.iqr >= 0 and result.quantile(0.25) <= result.median <= result.quantile(0.75)


def test_harness_does_not_time_the_before_hook_and_interleaves() -> None:
    calls: list[str] = []
    cases = {
        "a": timing.Case(lambda: calls.append("a"), before=lambda: time.sleep(0.02)),
        "b": timing.Case(lambda: calls.append("b")),
    }
    gc_states: list[bool] = []
    cases["c"] = timing.Case(lambda: gc_states.append(gc.isenabled()))
    timings = timing.time_cases(cases, reps=6, warmup=2)
    assert [len(t.times) for t in timings.values()] == [6, 6, 6]
    assert gc_states[2:] == [False] * 6 and gc.isenabled()  # paused while timing, as timeit does
    assert timings["a"].median < 0.01  # the 20 ms hook ran before every call, untimed
    timed = calls[4:]  # after 2 warm-up calls each
    assert sorted(timed) == ["a"] * 6 + ["b"] * 6
    assert len({tuple(timed[i:i + 2]) for i in range(0, 12, 2)}) == 2  # the order changes between reps


def test_harness_picks_reps_from_the_time_budget() -> None:
    result = timing.measure(lambda: time.sleep(0.005), warmup=1, target_s=0.05, min_reps=3, max_reps=100)
    assert 3 <= len(result.times) <= 11


def test_threads_are_set_and_restored() -> None:
    before = torch.get_num_threads()
    with timing.num_threads(1) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_presets_match_the_command() -> None:
    assert {p.value for p in Preset} == set(bench.PRESETS)
    assert bench.Settings().resolved(torch.device("cpu"))[0] == "quick"
    name, shapes, _ = bench.Settings(preset="resnet50", batch=4).resolved(torch.device("cpu"))
    assert name == "resnet50" and {s[0] for s in shapes} == {4} and (4, 2048, 7, 7) in shapes


# -- a tiny sweep through the CLI ------------------------------------------------------------
def test_cli_prints_environment_and_table(runner: CliRunner) -> None:
    result = runner.invoke(app, [*TINY, "--mode", "train", "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    for text in ("torch", "threads 1", "copy bandwidth", "GB/s", "engine", "nn", "eng/nn", "%copy",
                 "2x3x8x8", "nchw", "nhwc", "train", "bytes, train forward"):
        assert text in out, text
    assert "eval" not in out.split("━")[-1]  # only train rows
    assert "Traceback" not in result.stderr


def test_json_schema(tiny_doc: dict[str, Any]) -> None:
    assert tiny_doc["schema"] == bench.SCHEMA
    assert tiny_doc["device"] == "cpu"
    env = tiny_doc["environment"]
    assert {"torch", "cuda", "cudnn", "device_name", "threads", "copy_gbs", "copy_bytes", "cache"} <= set(env)
    assert env["copy_gbs"] > 0 and env["threads"] >= 1
    assert tiny_doc["settings"]["preset"] == "custom"
    rows = tiny_doc["results"]
    assert {(r["layout"], r["mode"]) for r in rows} == {(lo, m) for lo in ("nchw", "nhwc") for m in ("train", "eval")}
    for r in rows:
        assert set(r) == RESULT_KEYS
        assert r["shape"] == [2, 3, 8, 8] and r["dtype"] == "float32" and r["pass"] == "forward"
        assert r["bytes"] == 2 * 3 * 8 * 8 * 4 * (3 if r["mode"] == "train" else 2)
        assert set(r["variants"]) == {"engine", "nn", "copy"}
        for name, v in r["variants"].items():
            assert set(v) == VARIANT_KEYS, name
            assert v["reps"] == 3 and v["median_ms"] > 0 and v["error"] is None
        assert r["variants"]["copy"]["pct_of_copy"] == pytest.approx(100.0)
        assert r["ratio_engine_nn"] == pytest.approx(
            r["variants"]["engine"]["median_ms"] / r["variants"]["nn"]["median_ms"])
        assert r["variants"]["engine"]["max_abs_err"] < 1e-4
        assert r["engine_path"] == "module"  # too small for the fast path


def test_json_is_the_only_stdout(runner: CliRunner) -> None:
    result = runner.invoke(app, [*TINY, "--mode", "eval", "--layout", "nchw", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)  # raises if anything else were on stdout
    assert len(doc["results"]) == 1


def test_output_is_saved_and_not_overwritten(runner: CliRunner, tmp_path: Path) -> None:
    dest = tmp_path / "bench.json"
    args = [*TINY, "--mode", "eval", "--layout", "nchw", "-o", str(dest)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    assert json.loads(dest.read_text())["schema"] == bench.SCHEMA
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    wrong = runner.invoke(app, [*TINY, "-o", str(tmp_path / "bench.txt")])
    assert wrong.exit_code == 1 and ".json" in wrong.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # no temp files left


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_unavailable_device_is_a_friendly_error(runner: CliRunner, device: str) -> None:
    if device in available_devices():
        pytest.skip(f"{device} is available here")
    result = runner.invoke(app, ["bench", "--device", device])
    assert result.exit_code == 1
    assert "not available" in result.stderr and "Available here: cpu" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("bad", ["8,3,224", "8,3,0,4", "a,b,c,d", "1,1,1,99999999999"])
def test_bad_shape_is_a_usage_error(runner: CliRunner, bad: str) -> None:
    result = runner.invoke(app, ["bench", "--shape", bad])
    assert result.exit_code == 2 and "N,C,H,W" in result.stderr


MAX_THREADS = 4 * (os.cpu_count() or 1)


def plain(text: str) -> str:
    """The words of rich's boxed error/help text, box borders dropped, whitespace collapsed."""
    return " ".join(word for word in text.split() if word.strip("│╭╮╰╯─"))


@pytest.mark.parametrize(("args", "allowed"), [
    (["--threads", "100000"], f"1 to {MAX_THREADS}"), (["--threads", "0"], f"1 to {MAX_THREADS}"),
    (["--reps", "2"], "3 to 100000"), (["--reps", "10000000"], "3 to 100000"),
    (["--warmup", "-1"], "0 to 10000"), (["--warmup", "99999"], "0 to 10000"),
    (["--batch", "0"], "1 to 2147483647"),
])
def test_out_of_range_numbers_are_usage_errors(runner: CliRunner, args: list[str], allowed: str) -> None:
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.stderr
    assert f"allowed range {allowed}" in plain(result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_huge_thread_count_does_not_crash_the_process() -> None:
    """torch.set_num_threads(100000) segfaulted (exit 139): the bound stops it before torch sees it."""
    proc = subprocess.run([sys.executable, "-m", "bncli", "bench", "--threads", "100000", "--shape", "2,3,8,8"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert f"1 to {MAX_THREADS}" in plain(proc.stderr)


@pytest.mark.parametrize("args", [["--shape", "100000,3,224,224"], ["--preset", "resnet50", "--batch", "1000000"]])
def test_shapes_that_cannot_fit_in_memory_are_refused_first(runner: CliRunner, args: list[str]) -> None:
    """A mistyped size is a usage error naming the memory needed and the largest shape allowed,
    before anything is allocated (this test would take minutes, or be OOM-killed, otherwise)."""
    start = time.perf_counter()
    result = runner.invoke(app, ["bench", *args])
    assert result.exit_code == 2, result.stderr
    text = plain(result.stderr)
    assert "GiB" in text and "available here" in text and "allowed are shapes of up to about" in text
    assert time.perf_counter() - start < 30


def test_memory_estimate_lets_ordinary_shapes_through() -> None:
    assert bench.memory_problem(bench.Settings(shapes=((8, 3, 224, 224),))) is None
    assert bench.memory_problem(bench.Settings(preset="resnet50")) is None


@pytest.mark.parametrize("width", [80, 120])
def test_output_fits_the_terminal(width: int) -> None:
    """Every line of stdout and stderr within COLUMNS; the 80-column table merges the first
    columns and drops some, a 120-column one shows them all (no number wrapped or cut)."""
    wide = CliRunner(env={"COLUMNS": str(width), "NO_COLOR": "1", "TERM": "dumb"})
    result = wide.invoke(app, ["bench", "--shape", "16,3,64,64", "--dtype", "float32", "--reps", "3",
                               "--warmup", "1", "--backward"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines() + result.stderr.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    header = next(line for line in result.stdout.splitlines() if "eng/nn" in line)
    if width == 80:
        assert header.split()[0] == "case" and "nn %copy" not in header
        assert "16x3x64x64 f32 nhwc train+bwd" in result.stdout
    else:
        assert header.split()[:4] == ["shape", "┃", "dtype", "┃"] and "nn %copy" in header
    for line in result.stdout.splitlines():
        if "16x3x64x64" in line:
            assert line.count("│") == header.count("┃")  # one line per row: nothing wrapped


def test_bench_help_fits_80_columns() -> None:
    result = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}).invoke(app, ["bench", "--help"])
    assert result.exit_code == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "…" not in result.stdout  # no word cut to fit a column
    assert f"1 to {MAX_THREADS} (4x the cores)" in plain(result.stdout)


def test_backward_rows(runner: CliRunner) -> None:
    result = runner.invoke(app, [*TINY, "--mode", "train", "--layout", "nchw", "--backward", "--json"])
    assert result.exit_code == 0, result.stderr
    fwd, both = json.loads(result.stdout)["results"]
    assert (fwd["pass"], both["pass"]) == ("forward", "forward+backward")
    assert set(both["variants"]) == {"nn", "copy"} and both["ratio_engine_nn"] is None
    assert both["bytes"] == 2 * 3 * 8 * 8 * 4 * 8
    assert both["variants"]["nn"]["max_abs_err"] < 1e-4


def test_stalled_and_noisy_rows_are_flagged() -> None:
    def row(copy_s: float, spread: float = 0.0) -> bench.Row:
        r = bench.Row((8, 3, 224, 224), "float32", "nchw", "eval", "forward")  # 4.8 MB: 2 passes, 9.6 MB
        r.timings = {"copy": timing.Timing((copy_s - spread, copy_s, copy_s + spread), "perf_counter")}
        return r

    healthy = [row(0.0004), row(0.0004), row(0.0005)]  # ~20 GB/s
    assert bench._health_notes(healthy, 20.0) == []
    stalled = bench._health_notes([*healthy, row(0.008)], 20.0)  # ~1 GB/s, steady: a scheduler tick
    assert len(stalled) == 1 and stalled[0].startswith("1 of 4 rows copied at under a quarter")
    assert "--threads 1" in stalled[0]
    noisy = bench._health_notes([*healthy, row(0.0004, spread=0.0002)], 20.0)
    assert len(noisy) == 1 and "IQR exceeds 10%" in noisy[0] and "pin threads" in noisy[0]


def test_pinned_threads_get_no_advice_to_pin_them() -> None:
    """bench --threads 1: the notes still say what was seen, but not 'pin threads' / 'use --threads 1'."""
    noisy = bench.Row((8, 3, 224, 224), "float32", "nchw", "eval", "forward")
    noisy.timings = {"copy": timing.Timing((0.0002, 0.0004, 0.0006), "perf_counter")}
    stalled = bench.Row((8, 3, 224, 224), "float32", "nchw", "eval", "forward")
    stalled.timings = {"copy": timing.Timing((0.008,) * 3, "perf_counter")}
    healthy = []
    for _ in range(3):
        r = bench.Row((8, 3, 224, 224), "float32", "nchw", "eval", "forward")
        r.timings = {"copy": timing.Timing((0.0004,) * 3, "perf_counter")}
        healthy.append(r)
    notes = bench._health_notes([*healthy, noisy, stalled], 20.0, threads=1, pinned=True)
    assert len(notes) == 2 and all("idle machine" in n for n in notes)
    assert not any("--threads" in n or "pin" in n for n in notes)
    pinned_two = bench._health_notes([*healthy, stalled], 20.0, threads=2, pinned=True)
    assert "--threads 1" in pinned_two[0]  # one thread still avoids the stall


def test_threads_1_run_gives_no_thread_advice(runner: CliRunner) -> None:
    result = runner.invoke(app, [*TINY, "--mode", "eval", "--layout", "nchw", "--threads", "1"])
    assert result.exit_code == 0, result.stderr
    assert "pin threads" not in result.stderr and "--threads" not in result.stderr


# -- correctness gates and soft failures -----------------------------------------------------
@pytest.mark.parametrize("factor", [2.0, float("nan")])
def test_a_wrong_variant_is_reported_and_not_timed(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    def wrong(self: Any, x: torch.Tensor, mode: str = "train", layout: str = "nchw") -> torch.Tensor:
        return x * factor

    monkeypatch.setattr(bench.BatchNormEngine, "apply", wrong)
    report = bench.run(bench.Settings(shapes=((2, 3, 8, 8),), dtypes=("float32",), modes=("eval",),
                                      layouts=("nchw",), reps=3, warmup=1))
    (row,) = report.rows
    assert "engine" not in row.timings and "nn" in row.timings
    assert "float64 reference" in row.failures["engine"]
    assert any("engine differs" in n for n in report.notes)
    engine = row.to_json()["variants"]["engine"]
    assert set(engine) == VARIANT_KEYS and engine["median_ms"] is None
    assert engine["max_abs_err"] > 1 if factor == 2.0 else engine["max_abs_err"] is None  # JSON has no NaN
    json.dumps(report.to_json(), allow_nan=False)


def test_compile_failure_is_soft(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(module: Any, **kwargs: Any) -> Any:
        def call(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch.compiler, "reset", lambda: None)  # importing dynamo alone takes seconds
    result = runner.invoke(app, [*TINY, "--mode", "eval", "--compile", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    first = doc["results"][0]["variants"]["compile"]
    assert first["error"] == "torch.compile failed: no C++ compiler found"
    assert "compile" not in doc["results"][1]["variants"]  # off after the first failure
    assert any("remaining rows" in n for n in doc["notes"])


# -- CUDA (skipped without a GPU) ------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_sweep(runner: CliRunner, graphs: bool) -> None:
    args = ["bench", "--device", "cuda", "--shape", "4,8,16,16", "--dtype", "float32", "--reps", "5", "--json"]
    result = runner.invoke(app, args + (["--cuda-graphs"] if graphs else []))
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["device"].startswith("cuda") and doc["environment"]["cache"].startswith("L2 flushed")
    method = "cuda-graph+events" if graphs else "cuda-events"
    for r in doc["results"]:
        assert r["variants"]["engine"]["method"] == method and r["variants"]["engine"]["error"] is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_time_a_known_spin() -> None:
    cycles = int(torch.cuda.get_device_properties(0).clock_rate * 1e3 * 0.002)  # ~2 ms of clock ticks
    result = timing.measure(lambda: torch.cuda._sleep(cycles), device="cuda", reps=5, warmup=1)
    assert result.method == "cuda-events"
    assert 0.0005 < result.median < 0.05
