"""compare MODEL.pt2 / recalibrate / fold through the CLI: what the user sees, and what is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pt2_helpers as h
import pytest
import torch
from typer.testing import CliRunner

from bncli.cli import app

SAMPLES = Path(__file__).resolve().parent.parent / "sample_data"


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")
    return CliRunner(env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"})


@pytest.fixture
def files(small_pt2: Path, tmp_path: Path) -> tuple[Path, Path]:
    model = Path(shutil.copy(small_pt2, tmp_path / "model.pt2"))
    data = tmp_path / "x.npy"
    np.save(data, h.data(16).numpy())
    return model, data


def run(runner: CliRunner, *args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def fits(text: str, width: int = 80) -> None:
    wide = [line for line in text.splitlines() if len(line) > width]
    assert not wide, f"lines wider than {width}: {wide}"


@pytest.mark.parametrize("command", ["recalibrate", "fold", "compare"])
def test_help_teaches_and_fits_80_columns(command: str, narrow: CliRunner) -> None:
    result = run(narrow, command, "--help")
    assert result.exit_code == 0
    assert "Examples" in result.stdout and ".pt2" in result.stdout
    fits(result.stdout)


def test_compare_model_on_the_sample(narrow: CliRunner) -> None:
    result = run(narrow, "compare", SAMPLES / "model.pt2", "--data", SAMPLES / "batch.npy")
    assert result.exit_code == 0, result.output
    for name in ("input_bn", "stem.bn", "layer1.0.bn1", "layer1.0.bn2"):
        assert name in result.stdout
    assert "Eval breaks at input_bn" in " ".join(result.stdout.split())
    assert "bncli recalibrate" in result.stdout
    fits(result.stdout)


def test_compare_model_json(files: tuple[Path, Path], runner: CliRunner) -> None:
    model, data = files
    result = run(runner, "compare", model, "--data", data, "-b", "5", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [layer["name"] for layer in doc["layers"]] == ["input_bn", "bn1", "bn2", "bn3"]
    assert doc["batches"] == 4 and doc["batch_size"] == 5
    assert len(doc["layers"][1]["mean_shift"]) == h.C
    assert doc["breaks_at"] in doc["off"]


def test_compare_model_needs_data_and_data_needs_a_model(files: tuple[Path, Path], runner: CliRunner,
                                                          batch: Path) -> None:
    model, data = files
    result = run(runner, "compare", model)
    assert result.exit_code == 1 and "needs data" in result.stderr and "--data" in result.stderr
    result = run(runner, "compare", batch, "--data", data)
    assert result.exit_code == 1 and "not a .pt2" in result.stderr


def test_recalibrate_writes_model_and_state(files: tuple[Path, Path], narrow: CliRunner, tmp_path: Path) -> None:
    model, data = files
    out, state = tmp_path / "out.pt2", tmp_path / "bn.safetensors"
    result = run(narrow, "recalibrate", model, data, "-o", out, "--save-state", state, "-b", "4")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in " ".join(result.stdout.split()).replace("\n", "")
    fits(result.stdout)
    from safetensors.torch import load_file

    saved = load_file(str(state))
    loaded = torch.export.load(out)  # our own output, trusted
    torch.testing.assert_close(saved["bn2.running_var"], loaded.state_dict["bn2.running_var"])
    assert int(saved["bn2.num_batches_tracked"]) == 4
    compare = run(narrow, "compare", out, "--data", data, "-b", "4", "--json")
    assert json.loads(compare.stdout)["off"] == []


def test_recalibrate_json_and_population(files: tuple[Path, Path], runner: CliRunner, tmp_path: Path) -> None:
    model, data = files
    result = run(runner, "recalibrate", model, data, "-o", tmp_path / "o.pt2", "--var", "population", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["var"] == "population" and doc["num_batches_tracked"] == 1
    assert [layer["name"] for layer in doc["layers"]] == ["input_bn", "bn1", "bn2", "bn3"]
    assert run(runner, "recalibrate", model, data, "--var", "median").exit_code == 2


def test_existing_output_is_kept_unless_force(files: tuple[Path, Path], runner: CliRunner, tmp_path: Path) -> None:
    model, data = files
    out = tmp_path / "out.pt2"
    out.write_bytes(b"keep me")
    for args in (["recalibrate", model, data, "-o", out], ["fold", model, "-o", out]):
        result = run(runner, *args)
        assert result.exit_code == 1 and "already exists" in result.stderr and "--force" in result.stderr
        assert out.read_bytes() == b"keep me"
    assert run(runner, "fold", model, "-o", out, "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"
    result = run(runner, "recalibrate", model, data, "-o", model, "--force")
    assert result.exit_code == 1 and "input" in result.stderr


def test_recalibrate_default_output_is_beside_the_model(files: tuple[Path, Path], runner: CliRunner) -> None:
    model, data = files
    assert run(runner, "recalibrate", model, data).exit_code == 0
    assert model.with_name("model.recalibrated.pt2").exists()


def test_failure_or_interrupt_leaves_nothing(files: tuple[Path, Path], runner: CliRunner, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from bncli import io

    model, data = files
    out, state = tmp_path / "out.pt2", tmp_path / "state.pt"

    def interrupted(*args: object) -> object:
        def writer(fh: object) -> None:
            raise KeyboardInterrupt
        return writer

    monkeypatch.setattr(io, "state_writer", interrupted)
    result = run(runner, "recalibrate", model, data, "-o", out, "--save-state", state)
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "x.npy"]  # no output, no temp file
    monkeypatch.undo()
    result = run(runner, "recalibrate", model, data, "-o", out, "-b", "5")  # 16 = 3 x 5 + 1: runs
    assert result.exit_code == 0, result.output


def test_static_batch_error_is_clear(tmp_path: Path, runner: CliRunner) -> None:
    model = h.export(h.small_net(), tmp_path / "static.pt2", batch=8)
    data = tmp_path / "x.npy"
    np.save(data, h.data(12).numpy())
    result = run(runner, "recalibrate", model, data, "-b", "6")
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "static batch of 8" in text and "--batch-size 8" in text
    result = run(runner, "recalibrate", model, data)
    assert result.exit_code == 1 and "--drop-last" in result.stderr
    assert run(runner, "recalibrate", model, data, "--drop-last").exit_code == 0


def test_fold_cli(files: tuple[Path, Path], narrow: CliRunner, tmp_path: Path) -> None:
    model, data = files
    out = tmp_path / "f.pt2"
    result = run(narrow, "fold", model, "-o", out)
    assert result.exit_code == 0, result.output
    fits(result.stdout)
    assert "folded 2 of 4 BN layers" in " ".join(result.stdout.split()) and "kept" in result.stdout
    result = run(narrow, "fold", model, "-o", tmp_path / "g.pt2", "--data", data, "--json")
    doc = json.loads(result.stdout)
    assert [layer["folded"] for layer in doc["layers"]] == [False, True, True, False]
    assert doc["max_abs_error"] <= doc["tolerance"] * max(1, doc["max_abs_output"])
    result = run(narrow, "fold", model, "-o", tmp_path / "h.pt2", "--tolerance", "1e-15")
    assert result.exit_code == 1 and "nothing was written" in " ".join(result.stderr.split())
    assert not (tmp_path / "h.pt2").exists()
    assert run(narrow, "fold", model, "--tolerance", "0").exit_code == 2


def test_a_corrupt_model_gets_one_clear_error(tmp_path: Path, runner: CliRunner) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    for args in (["compare", bad, "--data", bad], ["fold", bad]):
        result = run(runner, *args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert "Error:" in result.stderr and "Fix:" in result.stderr
