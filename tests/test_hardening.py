"""Defects found by outside testing (issue 11): every one of them stays fixed.

NaN in --json, absurd option values, a full or closed stdout, bugs becoming tracebacks,
the 3D message, --layout case, wording, and the out-of-core header order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from bncli.cli import app, main
from bncli.commands.common import EXIT_INTERNAL, EXIT_PIPE

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"
BNCLI = [sys.executable, "-m", "bncli"]


def flat(text: str) -> str:
    return " ".join(text.split())


def strict_json(text: str) -> Any:
    """Parse like a strict JSON reader: NaN, Infinity and -Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} in the JSON output")

    return json.loads(text, parse_constant=refuse)


def no_traceback(result: Any) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def nan_batch(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    x[1, 1, 2, 2] = np.inf
    np.save(tmp_path / "nan.npy", x)
    return tmp_path / "nan.npy"


# -- defect 1: NaN/Inf in --json, and no traceback ever ---------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_normalize_json_with_nan_is_valid_json(runner: CliRunner, nan_batch: Path, tmp_path: Path,
                                               mode: str) -> None:
    result = runner.invoke(app, ["normalize", str(nan_batch), "-o", str(tmp_path / "o.npy"), "--mode", mode,
                                 "--json"])
    assert result.exit_code == 0, result.output
    doc = strict_json(result.stdout)
    if mode == "train":  # the NaN poisons channel 0's running mean, the Inf channel 1's
        assert doc["state"]["running_mean"][0] is None and doc["state"]["running_var"][1] is None
    assert doc["channels"][0]["mean_before"] is None
    no_traceback(result)


@pytest.mark.parametrize("command", [
    ["compare", "{x}"], ["stats", "{x}"], ["check-shape", "{x}"],
    ["normalize", "{x}", "--out-of-core", "-o", "{tmp}/ooc.npy"],
    ["normalize", "{x}", "--no-track-running-stats", "-o", "{tmp}/nt.npy"],
])
def test_every_json_document_is_nan_free(runner: CliRunner, nan_batch: Path, tmp_path: Path,
                                         command: list[str]) -> None:
    args = [a.format(x=nan_batch, tmp=tmp_path) for a in command]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    strict_json(result.stdout)


def test_json_helper_nulls_non_finite_values_everywhere() -> None:
    import torch

    from bncli.commands.common import to_json

    doc = {"a": float("nan"), "b": [1.0, float("inf")], "c": np.array([np.nan, 2.0]),
           "d": torch.tensor([float("-inf")]), "e": np.float32("nan"), "f": {"g": (float("nan"),)}}
    assert strict_json(to_json(doc)) == {"a": None, "b": [1.0, None], "c": [None, 2.0], "d": [None],
                                         "e": None, "f": {"g": [None]}}


COMMAND_CORES = {
    "normalize": ("bncli.core.normalize_tensors", ["normalize", "{batch}", "-o", "{tmp}/o.npy"]),
    "compare": ("bncli.compare.compare_file", ["compare", "{batch}"]),
    "stats": ("bncli.datastats.dataset_stats", ["stats", "{batch}"]),
    "check-shape": ("bncli.api.check_shape", ["check-shape", "{batch}"]),
    "bench": ("bncli.bench.run", ["bench", "--shape", "2,3,4,4"]),
}


@pytest.mark.parametrize("name", sorted(COMMAND_CORES))
def test_a_bug_is_one_line_with_its_own_exit_code(runner: CliRunner, batch: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    target, args = COMMAND_CORES[name]

    def boom(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(target, boom)
    argv = [a.format(batch=batch, tmp=tmp_path) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == EXIT_INTERNAL == 70
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Error: internal error (RuntimeError: boom second line)."
    assert "--debug" in flat(result.stderr) and "report" in flat(result.stderr)
    no_traceback(result)
    debug = runner.invoke(app, ["--debug", *argv])
    assert isinstance(debug.exception, RuntimeError)  # --debug keeps the traceback


def test_a_bug_while_parsing_options_is_one_line_too(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], batch: Path) -> None:
    def boom(text: str) -> int:
        raise ZeroDivisionError("parser bug")

    monkeypatch.setattr("bncli.outofcore.parse_size", boom)
    monkeypatch.setattr(sys, "argv", ["bncli", "stats", str(batch), "--chunk-size", "8M"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Error: internal error (ZeroDivisionError: parser bug)." in err and "Traceback" not in err


# -- defect 2: absurd numeric option values are usage errors with the range --------------------
ABSURD = [
    (["normalize", "{b}", "--chunk-size", "999999999999"], "allowed range is 1 byte to 16.0 GiB"),
    (["normalize", "{b}", "--chunk-size", "9" * 400], "too large"),
    (["normalize", "{b}", "--chunk-size", "0.5"], "less than one byte"),
    (["stats", "{b}", "--chunk-size", "999999999999"], "allowed range is 1 byte to 16.0 GiB"),
    (["stats", "{b}", "--chunk-size", "2T"], "allowed range"),
    (["stats", "{b}", "--scale", "1e300"], "allowed range 1e-12 to 1e+12"),
    (["stats", "{b}", "--scale", "nan"], "allowed range"),
    (["stats", "{b}", "--scale", "inf"], "allowed range"),
    (["stats", "{b}", "--scale", "1e-400"], "allowed range"),
    (["normalize", "{b}", "--eps", "inf"], "finite number > 0"),
    (["normalize", "{b}", "--eps", "nan"], "finite number > 0"),
    (["compare", "{b}", "--eps", "1e400"], "finite number > 0"),
    (["normalize", "{b}", "--momentum", "nan"], "outside [0, 1]"),
    (["compare", "{b}", "--momentum", "1e9"], "outside [0, 1]"),
    (["normalize", "{b}", "-C", "99999999999"], "allowed range 1 to 16,777,216"),
    (["normalize", "{b}", "-C", "0"], "allowed range 1 to 16,777,216"),
    (["compare", "{b}", "--num-features", "-3"], "allowed range"),
    (["check-shape", "{b}", "-C", "10000000000000000000000"], "allowed range"),
    (["normalize", "{b}", "--weight", "nan,1,1"], "not a finite number"),
    (["compare", "{b}", "--bias", "0,inf,0"], "not a finite number"),
    (["normalize", "{b}", "--weight", "1,x,2"], "neither a comma-separated list"),
    (["normalize", "{b}", "--bias", ","], "no values given"),
]


@pytest.mark.parametrize(("args", "message"), ABSURD)
def test_absurd_values_exit_2_with_the_allowed_range(runner: CliRunner, batch: Path, tmp_path: Path,
                                                     args: list[str], message: str) -> None:
    before = sorted(tmp_path.iterdir())
    result = runner.invoke(app, [a.format(b=batch) for a in args])
    assert result.exit_code == 2, result.output
    assert message in flat(result.stderr)
    no_traceback(result)
    assert sorted(tmp_path.iterdir()) == before  # refused before anything was written


def test_largest_chunk_size_is_accepted(runner: CliRunner, batch: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["stats", str(batch), "--chunk-size", "16G", "--json"])
    assert result.exit_code == 0 and strict_json(result.stdout)["chunk_bytes"] == 16 << 30


# -- defect 3: a full stdout, a closed pipe ----------------------------------------------------
@pytest.mark.parametrize("args", [["stats", "{b}", "--json"], ["normalize", "{b}", "-o", "{t}/o.npy"],
                                  ["check-shape", "{b}"], ["compare", "{b}", "--json"]])
def test_stdout_on_a_full_disk_is_a_clear_error(batch: Path, tmp_path: Path, args: list[str]) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with Path("/dev/full").open("w") as full:
        proc = subprocess.run([*BNCLI, *[a.format(b=batch, t=tmp_path) for a in args]], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: cannot write to standard output: No space left on device [ENOSPC].")
    assert "Fix:" in proc.stderr and "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr


@pytest.fixture
def many_inputs(tmp_path: Path) -> list[str]:
    """Enough check-shape inputs that the report (~200 KiB) cannot fit in a pipe's buffer.

    Distinct files: the same file named twice is checked once (bncli.io.expand_inputs).
    """
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 2, 2), np.float32))
    paths = [tmp_path / f"x{i}.npy" for i in range(3000)]
    for path in paths:
        os.link(tmp_path / "x.npy", path)
    return [str(p) for p in paths]


def test_closed_pipe_exits_quietly(many_inputs: list[str]) -> None:
    proc = subprocess.Popen([*BNCLI, "check-shape", "--no-scan", *many_inputs], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader is gone, as after `| head -1`
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()
    assert first.startswith(b"OK ")
    assert code == EXIT_PIPE == 141, err
    assert err == ""


def test_head_minus_one_in_a_real_shell(many_inputs: list[str], tmp_path: Path) -> None:
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(many_inputs))
    script = (f'mapfile -t inputs < {listing}; '
              f'{sys.executable} -m bncli check-shape --no-scan "${{inputs[@]}}" 2>{tmp_path}/err | head -1; '
              'echo "status=${PIPESTATUS[0]}"')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("OK ") and len(lines) == 2
    assert lines[1] == f"status={EXIT_PIPE}"
    assert (tmp_path / "err").read_text() == ""


# Every command that writes files finishes them when its reader leaves first: the files are
# committed and complete, then it exits 141. A pipe whose read end is closed before bncli starts
# makes the very first report line fail, deterministically.
WRITING_RUNS = {
    "normalize": (["normalize", "{d}/batch.npy", "-o", "{t}/y.npy", "--save-state", "{t}/s.pt"], ["y.npy", "s.pt"]),
    "normalize-many": (["normalize", "{t}/in", "--output-dir", "{t}/out", "--dataset-stats"],
                       ["out/a.bn.npy", "out/b.bn.npy"]),
    "normalize-stdout": (["normalize", "{d}/batch.npy", "-o", "-", "--format", "npy", "--save-state", "{t}/s.pt"],
                         ["s.pt"]),
    "stats": (["stats", "{d}/batch.npy", "--save-state", "{t}/s.pt"], ["s.pt"]),
    "recalibrate": (["recalibrate", "{d}/model.pt2", "{d}/batch.npy", "-b", "8", "-o", "{t}/m.pt2",
                     "--save-state", "{t}/s.pt"], ["m.pt2", "s.pt"]),
    "fold": (["fold", "{d}/model.pt2", "-o", "{t}/f.pt2"], ["f.pt2"]),
}


@pytest.mark.parametrize("name", list(WRITING_RUNS))
def test_a_closed_stdout_does_not_stop_a_command_that_writes(tmp_path: Path, name: str) -> None:
    args, outputs = WRITING_RUNS[name]
    (tmp_path / "in").mkdir()
    for stem in "ab":
        np.save(tmp_path / "in" / f"{stem}.npy", np.load(SAMPLES / "batch.npy"))
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        proc = subprocess.run([*BNCLI, *(a.format(d=SAMPLES, t=tmp_path) for a in args)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=300, env={**os.environ, "COLUMNS": "80"})
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_PIPE, proc.stderr
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr
    for out in outputs:
        assert (tmp_path / out).stat().st_size > 0, out
    if name == "normalize":
        res = CliRunner().invoke(app, ["normalize", str(SAMPLES / "batch.npy"), "-o", str(tmp_path / "z.npy")])
        assert res.exit_code == 0 and np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "z.npy"))
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.startswith(".")], "temp files left"


def test_normalize_into_head_minus_one_in_a_real_shell(tmp_path: Path) -> None:
    script = (f'{sys.executable} -m bncli normalize {SAMPLES}/batch.npy -o {tmp_path}/y.npy 2>{tmp_path}/err '
              '| head -1; echo "status=${PIPESTATUS[0]}"')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("input ") and len(lines) == 2
    assert lines[1] in ("status=0", f"status={EXIT_PIPE}")  # 0 if the report fit in the pipe before head left
    assert np.load(tmp_path / "y.npy").shape == (16, 3, 32, 32)
    assert (tmp_path / "err").read_text() == ""


@pytest.mark.parametrize("args", [["check-shape", "{d}/batch.npy"], ["inspect", "{d}/model.pt"],
                                  ["compare", "{d}/batch.npy"]])
def test_a_command_that_only_reports_stops_at_a_closed_stdout(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*BNCLI, *(a.format(d=SAMPLES) for a in args)], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_PIPE and proc.stderr == ""


# -- defect 8: the rule first, in every command ------------------------------------------------
RULE = "BatchNorm2d expects 4D input (N, C, H, W), got 3D input of shape (3, 32, 32)"


@pytest.mark.parametrize("args", [["check-shape", "{x}"], ["normalize", "{x}", "-o", "{t}/o.npy"],
                                  ["normalize", "{x}", "--out-of-core", "-o", "{t}/o.npy"],
                                  ["compare", "{x}"], ["stats", "{x}"]])
def test_not_4d_names_the_rule_first(runner: CliRunner, tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(app, [a.format(x=SAMPLES / "image.npy", t=tmp_path) for a in args])
    assert result.exit_code == 1
    text = flat(result.output)
    assert f"{RULE}: it looks like a single (C, H, W) image with no batch dimension" in text
    assert "unsqueeze(0)" in text
    no_traceback(result)


@pytest.mark.parametrize(("shape", "start"), [
    ((), "BatchNorm2d expects 4D input (N, C, H, W), got 0D input: a 0D scalar"),
    ((3,), "BatchNorm2d expects 4D input (N, C, H, W), got 1D input of shape (3,): a vector"),
    ((8, 3), "BatchNorm2d expects 4D input (N, C, H, W), got 2D input of shape (8, 3): (N, C) features"),
    ((2, 3, 4, 4, 4), "BatchNorm2d expects 4D input (N, C, H, W), got 5D input of shape (2, 3, 4, 4, 4):"),
    ((32, 32, 3), "BatchNorm2d expects 4D input (N, C, H, W), got 3D input of shape (32, 32, 3): it looks "
                  "like a single (H, W, C) image"),
])
def test_not_4d_message_of_every_rank(shape: tuple[int, ...], start: str) -> None:
    from bncli.diagnose import check_shape

    assert check_shape(shape, "float32")[0].message.startswith(start)


# -- --layout in any case ----------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["NHWC", "Nhwc", "nhwc"])
@pytest.mark.parametrize("command", ["normalize", "compare", "check-shape", "stats", "bench"])
def test_layout_is_case_insensitive(spelling: str, command: str) -> None:
    from typer.main import get_command

    group = get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    args = ([] if command == "bench" else [str(SAMPLES / "batch_nhwc.npy")]) + ["--layout", spelling]
    ctx = cmd.make_context(command, args)  # parses and converts, runs nothing
    assert ctx.params["layout"].value == "nhwc"


def test_layout_upper_case_runs(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["normalize", str(SAMPLES / "batch_nhwc.npy"), "--layout", "NHWC",
                                 "--mode", "TRAIN", "-o", str(tmp_path / "o.npy"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layout"] == "nhwc" and json.loads(result.stdout)["mode"] == "train"


# -- wording ------------------------------------------------------------------------------------
def test_counted_nouns_read_right(runner: CliRunner, npy_file: Any, tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(50, 1, 1, 1)).astype(np.float32)
    x[3] = np.nan
    path = npy_file(x, "one.npy")
    text = flat(runner.invoke(app, ["check-shape", str(path)]).output)
    assert "1 of 50 values is not finite" in text
    result = runner.invoke(app, ["normalize", str(path), "-o", str(tmp_path / "o.npy"), "--weight", "1,2"])
    assert "--weight has 2 values, but the layer has 1 channel." in flat(result.stderr)
    stats = runner.invoke(app, ["stats", str(path)])
    assert "1 value is NaN or Inf (1 channel: 0)" in flat(stats.stderr)
    for out in (text, flat(result.output), flat(stats.output)):
        assert "(s)" not in out and "(es)" not in out and " 1 values" not in out


@pytest.mark.parametrize(("mode", "passes"), [("train", "2 passes"), ("eval", "1 pass,")])
def test_out_of_core_header_comes_before_the_passes(runner: CliRunner, batch: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, mode: str,
                                                    passes: str) -> None:
    """The header (input, shape, state, passes) is printed before the first progress tick."""
    import contextlib

    import bncli.progress

    @contextlib.contextmanager
    def ticks(**_: Any) -> Iterator[Any]:
        def tick(task: str, done: int, total: int) -> None:
            sys.stdout.write(f"TICK {task}\n")  # on stdout too, so the order of the two is kept
        yield tick

    monkeypatch.setattr(bncli.progress, "progress_callback", ticks)
    result = runner.invoke(app, ["normalize", str(batch), "--out-of-core", "--mode", mode,
                                 "-o", str(tmp_path / "o.npy")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("input ") < out.index(f"out-of-core {passes}") < out.index("TICK pass 1/") \
        < out.index("Per-channel statistics")


def test_core_calls_on_start_before_any_progress(batch: Path, tmp_path: Path) -> None:
    from bncli import core

    events: list[str] = []
    for execution in ("in-memory", "out-of-core"):
        core.normalize_file(batch, tmp_path / f"{execution}.npy", key=None, mode="train", layout="nchw",
                            opts=core.EngineOptions(), force=False, save_state=None, execution=execution,
                            progress=lambda task, *_: events.append(task),
                            on_start=lambda plan: events.append(f"start {plan.execution['path']}"))
    assert events[0] == "start in-memory" and events[1] == "start out-of-core"
    assert events[2].startswith("pass 1/2")


# -- shell completion ---------------------------------------------------------------------------
def test_show_completion_prints_a_script() -> None:
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    proc = subprocess.run([*BNCLI, "--show-completion", "bash"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "_BNCLI_COMPLETE=complete_bash" in proc.stdout and "complete -o default -F _bncli_completion bncli" \
        in proc.stdout


def test_completion_completes_commands_and_choices() -> None:
    script = Path(sys.executable).with_name("bncli")
    if not script.exists():
        pytest.skip("bncli console script not installed beside this python")
    for words, cword, expected in (("bncli norm", "1", "normalize"),
                                   ("bncli normalize x.npy --layout ", "4", "nhwc")):
        env = {**os.environ, "_BNCLI_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword}
        proc = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=120)
        assert expected in proc.stdout.split(), (words, proc.stdout, proc.stderr)


# -- --json on failure: one JSON document on stdout as well --------------------------------------
JSON_FAILURES = {
    "normalize": ["normalize", "{t}/missing.npy", "-o", "{t}/y.npy", "--json"],
    "normalize-not-4d": ["normalize", "{d}/image.npy", "-o", "{t}/y.npy", "--json"],
    "compare": ["compare", "{d}/image.npy", "--json"],
    "compare-model": ["compare", "{d}/batch.npy", "--data", "{d}/batch.npy", "--json"],
    "stats": ["stats", "{t}/missing.npy", "--json"],
    "recalibrate": ["recalibrate", "{d}/batch.npy", "{d}/batch.npy", "--json"],
    "fold": ["fold", "{d}/batch.npy", "--json"],
    "check-shape-empty-folder": ["check-shape", "{t}/empty", "--json"],
    "inspect-empty-folder": ["inspect", "{t}/empty", "--json"],
    "bench": ["bench", "--device", "cuda", "--json"] if not os.environ.get("CUDA_VISIBLE_DEVICES") else [],
}


@pytest.mark.parametrize("name", list(JSON_FAILURES))
def test_json_failures_print_one_error_document(runner: CliRunner, tmp_path: Path, name: str) -> None:
    args = JSON_FAILURES[name]
    if name == "bench":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is there; bench would not fail")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, [a.format(d=SAMPLES, t=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"error"} and doc["error"]["exit_code"] == 1
    stderr = " ".join(result.stderr.split())
    assert stderr.startswith("Error: " + " ".join(doc["error"]["message"].split()))
    assert doc["error"]["hint"] and " ".join(doc["error"]["hint"].split()) in stderr


def test_json_internal_error_and_interrupt_documents(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from bncli import api as diagnose  # where check-shape finds check_file

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(diagnose, "check_file", boom)
    result = runner.invoke(app, ["check-shape", str(SAMPLES / "batch.npy"), "--json"])
    assert result.exit_code == EXIT_INTERNAL
    assert json.loads(result.stdout)["error"]["message"] == "internal error (ZeroDivisionError: a bug)."

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(diagnose, "check_file", interrupted)
    result = runner.invoke(app, ["check-shape", str(SAMPLES / "batch.npy"), "--json"])
    assert result.exit_code == 130 and json.loads(result.stdout)["error"]["exit_code"] == 130


def test_without_json_a_failure_leaves_stdout_empty(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["normalize", str(tmp_path / "missing.npy"), "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 1 and result.stdout == ""


def test_a_document_already_printed_is_not_followed_by_an_error_document(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "good.npy", np.load(SAMPLES / "batch.npy"))
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 4), np.float32))
    result = runner.invoke(app, ["normalize", str(tmp_path), "--output-dir", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)  # exactly one document: the run's, with the failed file's error in it
    assert [f["error"] is None for f in doc["files"]] == [False, True] and "exit_code" not in json.dumps(doc)


def test_inspect_takes_a_folder_of_checkpoints(runner: CliRunner, tmp_path: Path) -> None:
    for name in ("model.pt", "broken.ckpt", "model.pt2", "batch.npy"):
        (tmp_path / name).write_bytes((SAMPLES / name).read_bytes())
    result = runner.invoke(app, ["inspect", str(tmp_path), "--json"])
    assert result.exit_code == 1  # broken.ckpt fails
    assert [Path(r["path"]).name for r in json.loads(result.stdout)] == ["broken.ckpt", "model.pt", "model.pt2"]
    result = runner.invoke(app, ["inspect", str(tmp_path), "--glob", "*.pt", "--json"])
    assert result.exit_code == 0 and [Path(r["path"]).name for r in json.loads(result.stdout)] == ["model.pt"]
