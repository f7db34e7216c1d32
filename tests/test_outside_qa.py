"""Regressions found by outside testing after the inspect/.pt2/stats/hardening work.

Each test failed before its fix: corrupt and exotic input files, OS errors on inputs the
.pt2 reader opened itself, option names in messages, counted nouns, lines wider than the
terminal, statistics that no BatchNorm state can hold.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bncli
from bncli.bench import Row, _health_notes
from bncli.cli import app
from bncli.commands.common import EXIT_INTERNAL
from bncli.timing import Timing

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


def flat(text: str) -> str:
    return " ".join(text.split())


def run(runner: CliRunner, *args: str) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != EXIT_INTERNAL, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    return result


# -- corrupt and exotic .pt files -------------------------------------------------------------
def test_an_empty_pt_file_is_an_unreadable_input(runner: CliRunner, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    shape = run(runner, "check-shape", empty)
    assert shape.exit_code == 1 and "error[unreadable]" in shape.stdout
    assert "cannot read this .pt file (the file ends early)" in flat(shape.stdout)
    for command in ("stats", "inspect"):
        result = run(runner, command, empty)
        assert result.exit_code == 1 and "cannot read this .pt file" in flat(result.stderr)


def test_random_bytes_are_a_corrupt_file_not_an_unsafe_one(runner: CliRunner, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes([0x13, 0x00, 0xFF, 0x10]) * 64)  # 0x13 is no pickle opcode
    result = run(runner, "check-shape", garbage)
    assert "error[unreadable]" in result.stdout and "neither a torch.save zip archive nor a pickle" \
        in flat(result.stdout)
    assert "error[unsafe]" not in result.stdout
    # Control: a pickle that uses a real opcode the weights-only loader refuses (INST) stays unsafe.
    inst = tmp_path / "inst.pt"
    inst.write_bytes(b"(i__main__\nX\n(dp0\nb.")
    assert "error[unsafe]" in run(runner, "check-shape", inst).stdout


@pytest.fixture
def sparse_files(tmp_path: Path) -> dict[str, Path]:
    x = torch.randn(4, 3, 5, 5)
    x[x.abs() < 0.5] = 0
    torch.save(x.to_sparse(), tmp_path / "sparse.pt")
    torch.save(x, tmp_path / "dense.pt")
    bn = torch.nn.BatchNorm2d(3)
    bn.train()
    for _ in range(60):
        bn(torch.randn(8, 3, 4, 4))
    state = bn.state_dict()
    state["weight"] = state["weight"].detach().to_sparse()
    torch.save(state, tmp_path / "bn_sparse.pt")
    return {"sparse": tmp_path / "sparse.pt", "dense": tmp_path / "dense.pt", "state": tmp_path / "bn_sparse.pt"}


def test_a_sparse_tensor_file_reads_as_its_dense_values(runner: CliRunner, sparse_files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    assert run(runner, "check-shape", sparse_files["sparse"]).exit_code == 0
    sparse = json.loads(run(runner, "stats", sparse_files["sparse"], "--json").stdout)
    dense = json.loads(run(runner, "stats", sparse_files["dense"], "--json").stdout)
    assert sparse["mean"] == dense["mean"] and sparse["var"] == dense["var"]
    out = tmp_path / "out.npy"
    assert run(runner, "normalize", sparse_files["sparse"], "-o", out).exit_code == 0
    expected = torch.nn.BatchNorm2d(3)(torch.load(sparse_files["dense"])).detach().numpy()
    torch.testing.assert_close(np.load(out), expected, rtol=0, atol=0)
    audit = run(runner, "inspect", sparse_files["state"], "--json")
    assert audit.exit_code == 0 and json.loads(audit.stdout)[0]["layers"][0]["weight"]["length"] == 3


def test_check_shape_api_takes_sparse_meta_and_big_endian_data() -> None:
    x = torch.randn(2, 3, 4, 4)
    sparse = bncli.check_shape(x.to_sparse())
    assert sparse.valid and sparse.dtype == "float32"
    meta = bncli.check_shape(torch.empty(2, 3, 4, 4, device="meta"))
    assert meta.valid and meta.shape == [2, 3, 4, 4]
    big_endian = bncli.check_shape(x.numpy().astype(">f4"))
    assert big_endian.valid and big_endian.dtype == "float32", big_endian.findings
    nan = x.numpy().astype(">f4")
    nan[0, 0, 0, 0] = np.nan
    assert [f.code for f in bncli.check_shape(nan).findings] == ["non_finite"]


@pytest.fixture
def big_endian(tmp_path: Path) -> Path:
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(6, 3, 5, 4)).astype(">f4")
    np.save(tmp_path / "be.npy", x)
    return tmp_path / "be.npy"


@pytest.mark.parametrize("route", ["--in-memory", "--out-of-core"])
def test_a_big_endian_npy_is_normalized(runner: CliRunner, big_endian: Path, tmp_path: Path, route: str) -> None:
    out = tmp_path / "out.npy"
    assert run(runner, "normalize", big_endian, "-o", out, route).exit_code == 0
    x = np.load(big_endian).astype(np.float64)
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    y = np.load(out)
    assert y.dtype == np.float32
    torch.testing.assert_close(y.astype(np.float64), (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    assert run(runner, "compare", big_endian).exit_code == 0


def test_not_float_names_the_kind_and_one_conversion(runner: CliRunner, tmp_path: Path) -> None:
    torch.save(torch.randn(2, 3, 4, 4).to(torch.float8_e4m3fn), tmp_path / "f8.pt")
    np.save(tmp_path / "i.npy", np.zeros((2, 3, 4, 4), np.int64))
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 4, 4), bool))
    text = flat(run(runner, "check-shape", tmp_path / "f8.pt", tmp_path / "i.npy", tmp_path / "b.npy").stdout)
    assert "low-precision floating-point dtype float8_e4m3fn" in text
    assert "integer dtype float8" not in text
    assert "integer dtype int64" in text and "boolean dtype bool" in text
    assert "convert first" not in text and "Convert it: x.astype(np.float32) (NumPy) or x.float() (torch)." in text


def test_check_shape_writes_a_1d_shape_as_python_does(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros(5, np.float32))
    assert "shape (5,)  dtype float32" in run(runner, "check-shape", tmp_path / "v.npy").stdout


@pytest.mark.parametrize("command", [["check-shape"], ["stats"], ["recalibrate", str(SAMPLES / "model.pt2")]])
def test_a_pt2_where_data_is_expected_points_to_the_model_commands(runner: CliRunner, command: list[str],
                                                                   tmp_path: Path) -> None:
    model = tmp_path / "model.pt2"
    shutil.copy(SAMPLES / "model.pt2", model)
    args = [*command, str(model)] + (["-o", str(tmp_path / "r.pt2")] if command[0] == "recalibrate" else [])
    result = run(runner, *args)
    text = flat(result.stdout + result.stderr)
    assert result.exit_code == 1 and "is an exported model (.pt2, torch.export.save), not a tensor file" in text
    assert f"bncli inspect {model}" in text and f"bncli compare {model} --data" in text
    assert "unsupported file type" not in text


# -- OS errors --------------------------------------------------------------------------------
@pytest.fixture
def unreadable_by_access(monkeypatch: pytest.MonkeyPatch) -> Any:
    """os.access(path, R_OK) is False for these names, as for a mode-000 file and a non-root user."""
    names: set[str] = set()
    real_access = os.access

    def fake_access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        if mode & os.R_OK and Path(path).name in names:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", fake_access)
    return names


TINY_BENCH = ["bench", "--shape", "2,3,4,4", "--dtype", "float32", "--mode", "eval", "--layout", "nchw",
              "--reps", "3", "--warmup", "0"]


@pytest.mark.parametrize("case", ["inspect", "fold -o", "recalibrate -o", "recalibrate --save-state", "bench -o"])
def test_click_never_refuses_a_path_as_unreadable(runner: CliRunner, tmp_path: Path, unreadable_by_access: Any,
                                                  denied: Any, case: str) -> None:
    """click's Path(readable=True) made an unreadable input, or an existing output that --force
    replaces (it need not be readable at all), a usage error (exit 2) before bncli could say
    which file and why."""
    model = tmp_path / "m.pt2"
    shutil.copy(SAMPLES / "model.pt2", model)
    locked = {"inspect": "locked.pt", "fold -o": "locked.pt2", "recalibrate -o": "locked.pt2",
              "recalibrate --save-state": "locked.pt", "bench -o": "locked.json"}[case]
    (tmp_path / locked).write_bytes(b"old")
    unreadable_by_access.add(locked)
    target = str(tmp_path / locked)
    args = {"inspect": ["inspect", target],
            "fold -o": ["fold", str(model), "-o", target, "--force"],
            "recalibrate -o": ["recalibrate", str(model), str(SAMPLES / "batch.npy"), "-o", target, "--force"],
            "recalibrate --save-state": ["recalibrate", str(model), str(SAMPLES / "batch.npy"), "-o",
                                         str(tmp_path / "r.pt2"), "--save-state", target, "--force"],
            "bench -o": [*TINY_BENCH, "-o", target, "--force"]}[case]
    if case == "inspect":
        denied.add(locked)
    result = run(runner, *args)
    assert result.exit_code != 2, result.output
    if case == "inspect":
        assert result.exit_code == 1 and "permission denied: this user may not read the file" in flat(result.stderr)
    else:
        assert result.exit_code == 0, result.output
        assert (tmp_path / locked).read_bytes() != b"old"


@pytest.fixture
def denied(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make opening files with a given name fail with EACCES, as for a mode-000 file."""
    names: set[str] = set()
    real_open = builtins.open

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, os.PathLike)) and Path(file).name in names:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    return names


@pytest.mark.parametrize("command", [["inspect"], ["fold"], ["compare", "--data", "DATA"],
                                     ["recalibrate", "DATA"]])
def test_an_unreadable_pt2_is_named_with_the_permission_and_fix(runner: CliRunner, tmp_path: Path, denied: Any,
                                                                command: list[str]) -> None:
    model, data = tmp_path / "locked.pt2", tmp_path / "x.npy"
    shutil.copy(SAMPLES / "model.pt2", model)
    shutil.copy(SAMPLES / "batch.npy", data)
    denied.add(model.name)
    rest = [str(data) if a == "DATA" else a for a in command[1:]]
    args = [command[0], str(model), *rest] + (["-o", str(tmp_path / "o.pt2")] if command[0] in ("fold", "recalibrate")
                                              else [])
    result = run(runner, *args)
    text = flat(result.stderr)
    assert result.exit_code == 1, result.output
    assert f"{model}: permission denied: this user may not read the file" in text
    assert f"chmod u+r {model}" in text and "[EACCES]" not in text


def test_a_folder_that_cannot_be_listed_is_called_a_folder(runner: CliRunner, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", np.zeros((2, 3, 4, 4), np.float32))
    real_scandir = os.scandir

    def fake_scandir(path: Any = ".") -> Any:
        if Path(path) == shards:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    result = run(runner, "stats", shards)
    text = flat(result.stderr)
    assert result.exit_code == 1 and f"{shards}: permission denied: this user may not list the folder" in text
    assert "may not read the file" not in text and f"chmod u+rx {shards}" in text


def test_recalibrate_names_save_state_in_its_errors(runner: CliRunner, tmp_path: Path) -> None:
    model = tmp_path / "m.pt2"
    shutil.copy(SAMPLES / "model.pt2", model)
    data = SAMPLES / "batch.npy"
    bad_ext = run(runner, "recalibrate", model, data, "-o", tmp_path / "o.pt2", "--save-state", tmp_path / "s.npy")
    assert bad_ext.exit_code == 1 and "Give the --save-state file one of these extensions" in flat(bad_ext.stderr)
    (tmp_path / "s.pt").write_bytes(b"keep")
    exists = run(runner, "recalibrate", model, data, "-o", tmp_path / "o.pt2", "--save-state", tmp_path / "s.pt")
    assert exists.exit_code == 1 and "choose another path with --save-state" in flat(exists.stderr)
    assert (tmp_path / "s.pt").read_bytes() == b"keep" and not (tmp_path / "o.pt2").exists()


# -- option names in usage errors -------------------------------------------------------------
@pytest.mark.parametrize(("args", "name"), [
    (["inspect", str(SAMPLES / "model.pt"), "--momentum", "2"], "'--momentum'"),
    (["bench", "--shape", "0,3,4,4"], "'--shape'"),
    (["stats", str(SAMPLES / "batch.npy"), "--layout", "sideways"], "'--layout'"),
])
def test_usage_errors_name_the_option(runner: CliRunner, args: list[str], name: str) -> None:
    result = run(runner, *args)
    assert result.exit_code == 2
    assert f"Invalid value for {name}" in flat(result.stderr)
    assert "Value error," not in result.stderr


# -- counted nouns ----------------------------------------------------------------------------
def test_one_layer_and_one_row_read_right(runner: CliRunner, tmp_path: Path) -> None:
    torch.save(torch.nn.BatchNorm2d(3).state_dict(), tmp_path / "bn.pt")
    assert "1 layer: 1 with errors" in flat(run(runner, "inspect", tmp_path / "bn.pt").stdout)
    row = Row((2, 3, 4, 4), "float32", "nchw", "eval", "forward",
              timings={"engine": Timing((1.0, 1.0, 2.0, 9.0), "perf_counter")})
    (note,) = _health_notes([row], env_copy_gbs=10.0)
    assert note.startswith("1 of 1 row has a variant")


def test_one_channels_last_input_looks_so(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "nhwc.npy", np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32))
    assert "1 of 1 input looks channels-last" in flat(run(runner, "stats", tmp_path / "nhwc.npy").stderr)


# -- stats: lines that fit, values that mean something ---------------------------------------
@pytest.mark.parametrize("columns", ["80", "40"])
def test_many_channels_normalize_line_fits_and_stays_python(tmp_path: Path, columns: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((4, 40, 3, 3)) * rng.random(40)[None, :, None, None] * 100).astype(np.float32)
    np.save(tmp_path / "many.npy", x)
    result = CliRunner(env={"COLUMNS": columns, "NO_COLOR": "1"}).invoke(app, ["stats", str(tmp_path / "many.npy")])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= int(columns)
    call = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("transforms.")):])
    transforms = types.SimpleNamespace(Normalize=lambda mean, std: (mean, std))
    mean, std = eval(call, {"transforms": transforms})  # the text bncli printed
    r = bncli.dataset_stats(tmp_path / "many.npy")
    assert np.allclose(mean, r.mean, rtol=1e-5) and np.allclose(std, r.std, rtol=1e-5)


def test_normalize_line_breaks_only_between_items() -> None:
    from bncli.commands.stats import fit_normalize_line

    line = "transforms.Normalize(mean=[0.1, -0.25, 3], std=[1, 2, 3])"
    assert fit_normalize_line(line, 80) == line
    narrow = fit_normalize_line(line, 30)
    assert narrow.splitlines()[0] == "transforms.Normalize(mean=[0.1,"
    assert "".join(narrow.split()) == "".join(line.split())


def test_an_all_nan_channel_has_no_min_or_max(runner: CliRunner, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((2, 2, 3, 3)).astype(np.float32)
    x[:, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    doc = json.loads(run(runner, "stats", tmp_path / "x.npy", "--json").stdout)
    assert doc["min"][1] is None and doc["max"][1] is None
    assert doc["min"][0] == pytest.approx(float(x[:, 0].min()))
    row = next(line for line in run(runner, "stats", tmp_path / "x.npy").stdout.splitlines()
               if line.strip().startswith("1 "))
    assert "inf" not in row


def test_constant_channels_get_a_note(runner: CliRunner, tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((2, 3, 3, 3)).astype(np.float32)
    x[:, 2] = 0.5
    np.save(tmp_path / "x.npy", x)
    text = flat(run(runner, "stats", tmp_path / "x.npy").stderr)
    assert "1 channel (2) is constant (std 0): transforms.Normalize divides by the std" in text


@pytest.mark.parametrize(("values", "needle"), [
    ("one", "from 1 value per channel: running_var holds the unbiased variance"),
    ("nan", "the statistics of 3 channels (0, 1, 2) are not finite"),
])
def test_stats_refuses_a_state_no_batchnorm_can_use(runner: CliRunner, tmp_path: Path, values: str,
                                                    needle: str) -> None:
    x = np.zeros((1, 3, 1, 1), np.float32) if values == "one" else np.full((2, 3, 2, 2), np.nan, np.float32)
    np.save(tmp_path / "x.npy", x)
    result = run(runner, "stats", tmp_path / "x.npy", "--save-state", tmp_path / "bn.pt")
    assert result.exit_code == 1 and needle in flat(result.stderr), result.stderr
    assert "--mode eval" not in result.stderr
    assert not (tmp_path / "bn.pt").exists()


# -- .pt2 commands: key-value lines break between pairs ----------------------------------------
def test_recalibrate_keeps_state_and_its_path_on_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    deep = Path("a_rather_long_folder_name") / "and_another_one"
    deep.mkdir(parents=True)
    shutil.copy(SAMPLES / "model.pt2", deep / "model.pt2")
    runner = CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1"})
    state = deep / "model.recalibrated.bn_state.pt"
    result = runner.invoke(app, ["recalibrate", str(deep / "model.pt2"), str(SAMPLES / "batch.npy"),
                                 "--save-state", str(state)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any(line.strip().startswith(f"state {state}") for line in lines), result.stdout
    assert not any(line.rstrip().endswith(" state") for line in lines)


# -- .pt2 commands on data that proves nothing -------------------------------------------------
@pytest.fixture
def nan_data(tmp_path: Path) -> Path:
    x = np.random.default_rng(0).random((4, 3, 32, 32)).astype(np.float32)
    x[2, 1, 5, 5] = np.nan
    np.save(tmp_path / "nan.npy", x)
    return tmp_path / "nan.npy"


@pytest.mark.parametrize("command", ["compare", "recalibrate", "fold"])
def test_model_commands_refuse_data_with_nan(runner: CliRunner, tmp_path: Path, nan_data: Path,
                                             command: str) -> None:
    """fold's check on NaN data reported max |folded - original| 0 and wrote the model;
    compare reported 'max |eval - train| 0' and a mean shift of 'nan running std'."""
    model = tmp_path / "m.pt2"
    shutil.copy(SAMPLES / "model.pt2", model)
    out = tmp_path / "out.pt2"
    args = {"compare": ["compare", model, "--data", nan_data],
            "recalibrate": ["recalibrate", model, nan_data, "-o", out],
            "fold": ["fold", model, "--data", nan_data, "-o", out]}[command]
    result = run(runner, *args)
    text = flat(result.stderr)
    assert result.exit_code == 1, result.output
    assert f"{nan_data}: holds NaN or Inf values" in text and f"bncli check-shape {nan_data}" in text
    assert not out.exists()


def test_model_commands_name_empty_data(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "empty.npy", np.zeros((0, 3, 32, 32), np.float32))
    result = run(runner, "compare", SAMPLES / "model.pt2", "--data", tmp_path / "empty.npy")
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty.npy'}: holds no samples (shape (0, 3, 32, 32))" in flat(result.stderr)


def test_fold_refuses_to_vouch_for_a_model_that_outputs_nan(runner: CliRunner, tmp_path: Path) -> None:
    """max(err, nan) is err: a model whose original output is NaN passed the check with error 0."""
    from pt2_helpers import export, small_net

    net = small_net()
    with torch.no_grad():
        net.bn2.running_var[0] = float("nan")
    model = export(net, tmp_path / "nan_stats.pt2")
    out = tmp_path / "folded.pt2"
    result = run(runner, "fold", model, "-o", out)
    text = flat(result.stderr)
    assert result.exit_code == 1, result.output
    assert "the original model outputs NaN or Inf on the check batch" in text and "bncli inspect" in text
    assert not out.exists()


def test_a_finished_command_ignores_a_late_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the interpreter tears torch down (Python has restored SIGINT's default
    action by then) killed a run that had written all its outputs: exit 130, no message."""
    import signal
    import sys

    from bncli.cli import main

    monkeypatch.setattr(sys, "argv", ["bncli", "--version"])
    with pytest.raises(SystemExit):
        main()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # conftest restores pytest's handler


def test_a_folder_with_one_other_entry_reads_right(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    result = run(runner, "stats", tmp_path)
    assert result.exit_code == 1 and "it holds 1 other entry (notes.txt)" in flat(result.stderr)


def test_a_checkpoint_without_tensors_says_so(runner: CliRunner, tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    result = run(runner, "inspect", tmp_path / "meta.pt")
    text = flat(result.stderr)
    assert result.exit_code == 1 and "holds no tensors (only other Python values" in text
    assert "--key KEY" not in text and "holds 0 tensors" not in text


# -- .safetensors headers bncli parses itself --------------------------------------------------
def _safetensors(path: Path, header: Any, data: bytes) -> Path:
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


DATA = np.arange(96, dtype=np.float32).reshape(2, 3, 4, 4).tobytes()
BAD_HEADERS = {
    "not_an_object": ([1, 2, 3], "the header is not a JSON object"),
    "member_not_an_object": ({"x": "hello"}, "tensor 'x' is described by str"),
    "negative_size": ({"x": {"dtype": "F32", "shape": [-2, 3, 4, 4], "data_offsets": [0, 384]}},
                      "tensor 'x' has shape [-2, 3, 4, 4]"),
    "beyond_the_file": ({"x": {"dtype": "F32", "shape": [2, 3, 4, 4], "data_offsets": [0, 10**9]}},
                        "tensor 'x' lies at bytes 0..1000000000 of a 384-byte data section"),
    "wrong_size": ({"x": {"dtype": "F32", "shape": [2, 3, 4, 4], "data_offsets": [0, 100]}},
                   "tensor 'x' has 100 bytes, but shape [2, 3, 4, 4] of F32 needs 384"),
    "unknown_dtype": ({"x": {"dtype": "F99", "shape": [2, 3, 4, 4], "data_offsets": [0, 384]}},
                      "tensor 'x' has the unknown dtype 'F99'"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_a_bad_safetensors_header_is_an_unreadable_file(runner: CliRunner, tmp_path: Path, case: str) -> None:
    """check-shape called several of these valid (and stats read bytes outside the tensor);
    a header that is no object stopped every command with an internal error."""
    header, needle = BAD_HEADERS[case]
    path = _safetensors(tmp_path / "bad.safetensors", header, DATA)
    shape = run(runner, "check-shape", path)
    assert shape.exit_code == 1 and "error[unreadable]" in shape.stdout, shape.stdout
    assert f"not a valid .safetensors file: {needle}" in flat(shape.stdout)
    for command in (["stats"], ["normalize", "-o", str(tmp_path / "o.npy")], ["inspect"]):
        result = run(runner, command[0], path, *command[1:])
        assert result.exit_code == 1 and "not a valid .safetensors file" in flat(result.stderr), result.output


def test_safetensors_float8_is_named_as_torch_names_it(runner: CliRunner, tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "f8.safetensors",
                        {"x": {"dtype": "F8_E4M3", "shape": [2, 3, 4, 4], "data_offsets": [0, 96]}}, DATA[:96])
    text = flat(run(runner, "check-shape", path).stdout)
    assert "dtype float8_e4m3fn" in text and "low-precision floating-point" in text


def test_a_corrupt_npz_member_is_an_unreadable_file(runner: CliRunner, tmp_path: Path) -> None:
    np.savez(tmp_path / "z.npz", images=np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32))
    raw = bytearray((tmp_path / "z.npz").read_bytes())
    raw[200] ^= 0xFF  # inside the member's data: its CRC no longer matches
    (tmp_path / "z.npz").write_bytes(bytes(raw))
    shape = run(runner, "check-shape", tmp_path / "z.npz")
    assert shape.exit_code == 1 and "error[unreadable]" in shape.stdout
    assert "the archive is corrupt (Bad CRC-32 for file 'images.npy')" in flat(shape.stdout)
    for command in ("stats", "normalize"):
        result = run(runner, command, tmp_path / "z.npz")
        assert result.exit_code == 1 and "the archive is corrupt" in flat(result.stderr)


def _bad_utf8_name(src: Path, dst: Path) -> Path:
    """``src`` (a zip) with one member renamed to bytes that are not UTF-8, its UTF-8 flag set."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        for name in names:
            new = name.replace(name.rsplit("/", 1)[-1], "x\u00e9y") if name == names[0] else name
            zout.writestr(new, zin.read(name))
    dst.write_bytes(dst.read_bytes().replace("x\u00e9y".encode(), b"x\xc3\x28y"))
    return dst


@pytest.mark.parametrize("name", ["model.pt2", "dataset.npz"])
def test_a_zip_with_a_broken_member_name_is_a_corrupt_file(runner: CliRunner, tmp_path: Path, name: str) -> None:
    path = _bad_utf8_name(SAMPLES / name, tmp_path / f"broken{Path(name).suffix}")
    commands = [["inspect"], ["fold", "-o", str(tmp_path / "o.pt2")]] if name.endswith(".pt2") else \
        [["check-shape"], ["stats", "--key", "images"]]
    for command in commands:
        result = run(runner, command[0], path, *command[1:])
        assert result.exit_code == 1, result.output
        assert "corrupt" in flat(result.output)


def test_a_corrupt_npy_header_is_an_unreadable_file(runner: CliRunner, tmp_path: Path) -> None:
    """numpy's header parser raises tokenize.TokenError (no ValueError) for an unclosed header."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4, 4"
    header += b" " * (117 - len(header)) + b"\n"
    path = tmp_path / "cut.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(384))
    shape = run(runner, "check-shape", path)
    assert shape.exit_code == 1 and "error[unreadable]" in shape.stdout and "not a valid .npy file" in shape.stdout
    for command in ("stats", "inspect", "normalize"):
        result = run(runner, command, path)
        assert result.exit_code == 1 and "not a valid .npy file" in flat(result.stderr)


def test_a_pt_whose_pickle_breaks_the_loader_is_an_unreadable_file(runner: CliRunner, tmp_path: Path) -> None:
    """torch's weights-only unpickler raises TypeError on {OrderedDict(): None} (an unhashable key)."""
    import zipfile

    torch.save({"a": 1}, tmp_path / "base.pt")
    with zipfile.ZipFile(tmp_path / "base.pt") as zin, \
            zipfile.ZipFile(tmp_path / "odd.pt", "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            body = b"\x80\x02}ccollections\nOrderedDict\n)RNs." if name.endswith("data.pkl") else zin.read(name)
            zout.writestr(name, body)
    for command in ("check-shape", "stats", "inspect"):
        result = run(runner, command, tmp_path / "odd.pt")
        assert result.exit_code == 1 and "cannot read this .pt file (unhashable type" in flat(result.output)
