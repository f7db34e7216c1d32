"""Many inputs: files, folders and patterns through bncli.io.expand_inputs, and --glob on the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from bncli.cli import app
from bncli.errors import InputError
from bncli.io import DEFAULT_GLOB, expand_inputs, natural_key, parse_glob


def shards(folder: Path, names: list[str], shape: tuple[int, ...] = (2, 3, 4, 4)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for name in names:
        path = folder / name
        if path.suffix == ".npy":
            np.save(path, rng.normal(size=shape).astype(np.float32))
        else:
            path.write_bytes(b"not a tensor")
        out.append(path)
    return out


def test_folder_is_expanded_in_natural_order(tmp_path: Path) -> None:
    shards(tmp_path / "d", ["shard_10.npy", "shard_2.npy", "shard_1.npy", "notes.txt", ".hidden.npy"])
    (tmp_path / "d" / "sub").mkdir()
    shards(tmp_path / "d" / "sub", ["deep.npy"])
    got = expand_inputs([tmp_path / "d"])
    assert [p.name for p in got] == ["shard_1.npy", "shard_2.npy", "shard_10.npy"]  # not recursive, no .txt


def test_explicit_files_keep_their_order_and_duplicates_count_once(tmp_path: Path) -> None:
    a, b = shards(tmp_path / "d", ["b.npy", "a.npy"])
    got = expand_inputs([b, tmp_path / "d", a, tmp_path / "d" / ".." / "d" / "b.npy"])
    assert got == [b, a]  # b as given first; the folder adds only a; other spellings of b dropped


def test_glob_selects_files_of_a_folder_only(tmp_path: Path) -> None:
    shards(tmp_path / "d", ["train_1.npy", "val_1.npy", "train_2.NPY"])
    other = shards(tmp_path, ["explicit.bin"])[0]
    got = expand_inputs([tmp_path / "d", other], glob="train_*.npy")
    assert [p.name for p in got] == ["train_1.npy", "train_2.NPY", "explicit.bin"]  # case-insensitive
    assert expand_inputs([tmp_path / "d"], glob=["val_*", " "]) == [tmp_path / "d" / "val_1.npy"]


def test_unexpanded_pattern_is_expanded(tmp_path: Path) -> None:
    shards(tmp_path, ["s_10.npy", "s_9.npy", "t.npy"])
    assert [p.name for p in expand_inputs([str(tmp_path / "s_*.npy")])] == ["s_9.npy", "s_10.npy"]
    with pytest.raises(InputError, match="no file matches this pattern"):
        expand_inputs([str(tmp_path / "q_*.npy")])


def test_missing_file_passes_through_for_the_loader(tmp_path: Path) -> None:
    assert expand_inputs([tmp_path / "missing.npy"]) == [tmp_path / "missing.npy"]
    assert expand_inputs([]) == []


def test_folder_without_matches_is_a_clear_error(tmp_path: Path) -> None:
    shards(tmp_path / "d", ["a.txt", "b.csv"])
    with pytest.raises(InputError, match=r"no file in this folder matches \*\.npy.*holds 2 other entries") as err:
        expand_inputs([tmp_path / "d"])
    assert "--glob" in (err.value.hint or "")
    (tmp_path / "e").mkdir()
    with pytest.raises(InputError, match="it is empty"):
        expand_inputs([tmp_path / "e"])


def test_stdin_only_where_allowed() -> None:
    with pytest.raises(InputError, match="standard input"):
        expand_inputs(["-"])
    assert expand_inputs(["-", "-"], allow_stdin=True) == [Path("-")]


def test_parse_glob() -> None:
    assert parse_glob(None) == parse_glob(DEFAULT_GLOB) == ("*.npy", "*.npz", "*.pt", "*.pth", "*.safetensors")
    assert parse_glob(" *.a , *.b ,") == ("*.a", "*.b")
    with pytest.raises(ValueError, match="no file pattern"):
        parse_glob(" , ")


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=12, unique=True))
def test_natural_key_orders_numbers_as_numbers(numbers: list[int]) -> None:
    names = [f"shard_{n}.npy" for n in numbers]
    random.Random(0).shuffle(names)
    assert sorted(names, key=natural_key) == [f"shard_{n}.npy" for n in sorted(numbers)]


def test_natural_key_is_total() -> None:
    names = ["a01", "a1", "A1", "a1b", "a", "b", "a0"]
    assert len({natural_key(n) for n in names}) == len(names)  # no ties: one order on every machine
    assert sorted(names, key=natural_key) == ["a", "a0", "A1", "a01", "a1", "a1b", "b"]


# -- the CLI ----------------------------------------------------------------------------------
def test_stats_of_a_folder_equals_stats_of_its_files(runner: CliRunner, tmp_path: Path) -> None:
    files = shards(tmp_path / "d", [f"shard_{i}.npy" for i in (10, 2, 1)])
    by_folder = runner.invoke(app, ["stats", str(tmp_path / "d"), "--json"])
    assert by_folder.exit_code == 0, by_folder.stderr
    doc = json.loads(by_folder.stdout)
    assert [Path(i["path"]).name for i in doc["inputs"]] == ["shard_1.npy", "shard_2.npy", "shard_10.npy"]
    by_files = json.loads(runner.invoke(app, ["stats", *map(str, sorted(files, key=natural_key)), "--json"]).stdout)
    assert doc["mean"] == by_files["mean"] and doc["var"] == by_files["var"]


def test_stats_and_check_shape_take_glob(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d", ["train_1.npy", "train_2.npy"])
    shards(tmp_path / "d", ["val_1.npy"], shape=(2, 5, 4, 4))  # other channel count: must not be picked
    res = runner.invoke(app, ["stats", str(tmp_path / "d"), "--glob", "train_*", "--json"])
    assert res.exit_code == 0, res.stderr
    assert len(json.loads(res.stdout)["inputs"]) == 2
    assert runner.invoke(app, ["stats", str(tmp_path / "d")]).exit_code == 1  # 3 vs 5 channels
    res = runner.invoke(app, ["check-shape", str(tmp_path / "d"), "--glob", "val_*,train_2*", "--json"])
    assert res.exit_code == 0
    assert [Path(r["path"]).name for r in json.loads(res.stdout)] == ["train_2.npy", "val_1.npy"]


def test_cli_folder_errors(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d", ["readme.txt"])
    for command in ("stats", "check-shape"):
        res = runner.invoke(app, [command, str(tmp_path / "d")])
        assert res.exit_code == 1
        assert "Error:" in res.stderr and "no file in this folder matches" in res.stderr
        assert "Fix:" in res.stderr and "Traceback" not in res.stderr
        bad = runner.invoke(app, [command, str(tmp_path / "d"), "--glob", ","])
        assert bad.exit_code == 2 and "no file pattern" in bad.stderr


def test_check_shape_folder_reports_each_file(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d", ["b_2.npy", "b_10.npy"])
    np.save(tmp_path / "d" / "b_3.npy", np.zeros((3, 4, 4), np.float32))
    res = runner.invoke(app, ["check-shape", str(tmp_path / "d")])
    assert res.exit_code == 1
    lines = [line for line in res.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert [line.split()[0] + " " + Path(line.split()[1]).name for line in lines] == [
        "OK b_2.npy", "FAIL b_3.npy", "OK b_10.npy"]
    assert "2 of 3 inputs valid." in res.stdout
