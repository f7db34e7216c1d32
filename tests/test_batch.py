"""normalize and compare over many inputs: one layer, per-input or pooled statistics, failures isolated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference import ReferenceBatchNorm2d
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import bncli.progress
from bncli import batch, core, distributed
from bncli.cli import app
from bncli.errors import InputError

TOL = {"rtol": 1e-5, "atol": 1e-5}


def shards(folder: Path, sizes: tuple[int, ...] = (3, 1, 5), c: int = 3, seed: int = 0,
           dtype: str = "float32") -> list[np.ndarray]:
    """NCHW float shards of different batch sizes, with per-channel offsets; shard_<i>.npy."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    arrays = []
    for i, n in enumerate(sizes):
        x = (rng.normal(size=(n, c, 4, 5)) * rng.uniform(0.5, 3, c)[None, :, None, None]
             + rng.uniform(-2, 4, c)[None, :, None, None]).astype(dtype)
        np.save(folder / f"shard_{i}.npy", x)
        arrays.append(x)
    return arrays


def run(runner: CliRunner, *args: str | Path) -> Any:
    return runner.invoke(app, ["normalize", *map(str, args)])


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith((".part", ".probe", ".bak"))]


# -- train mode: each input one step of one layer ------------------------------------------------
@pytest.mark.parametrize("momentum", ["0.1", "none"])
def test_many_inputs_are_consecutive_train_steps_of_one_layer(runner: CliRunner, tmp_path: Path,
                                                               momentum: str) -> None:
    xs = shards(tmp_path / "d")
    res = run(runner, tmp_path / "d", "--output-dir", tmp_path / "out", "--momentum", momentum,
              "--save-state", tmp_path / "s.pt")
    assert res.exit_code == 0, res.output
    module = nn.BatchNorm2d(3, momentum=None if momentum == "none" else 0.1)
    ref = ReferenceBatchNorm2d(3, momentum=None if momentum == "none" else 0.1)
    for i, x in enumerate(xs):
        got = torch.from_numpy(np.load(tmp_path / "out" / f"shard_{i}.bn.npy"))
        torch.testing.assert_close(got, module(torch.from_numpy(x)).detach(), rtol=0, atol=0)  # the module's own
        np.testing.assert_allclose(got.double().numpy(), ref.forward(x, training=True), rtol=1e-5, atol=1e-5)
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert int(state["num_batches_tracked"]) == 3
    for k, v in module.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    assert "batches each of 3 files its own, in order: 3 train steps" in res.stdout
    assert "num_batches_tracked 3" in res.stdout and "wrote 3 of 3 files" in res.stdout


def test_eval_mode_leaves_the_state_as_it_was(runner: CliRunner, tmp_path: Path) -> None:
    xs = shards(tmp_path / "d")
    state = {"running_mean": torch.tensor([1.0, -2.0, 0.5]), "running_var": torch.tensor([4.0, 0.25, 1.0]),
             "num_batches_tracked": torch.tensor(7)}
    torch.save(state, tmp_path / "bn.pt")
    res = run(runner, tmp_path / "d", "--mode", "eval", "--state", tmp_path / "bn.pt", "--output-dir",
              tmp_path / "out", "--save-state", tmp_path / "after.pt", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["statistics"] == "running" and doc["summary"]["written"] == 3
    module = nn.BatchNorm2d(3).eval()
    module.load_state_dict({**nn.BatchNorm2d(3).state_dict(), **state})
    for i, x in enumerate(xs):
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out" / f"shard_{i}.bn.npy")),
                                   module(torch.from_numpy(x)).detach(), **TOL)
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    assert int(after["num_batches_tracked"]) == 7
    torch.testing.assert_close(after["running_var"], state["running_var"])


# -- --dataset-stats: one pooled batch ------------------------------------------------------------
OPTION_SETS = [[], ["--momentum", "none"], ["--eps", "1e-3", "--weight", "0.5,2,-1", "--bias", "1,0,0.25"],
               ["--no-track-running-stats"], ["--no-affine", "--momentum", "0.3"]]


@pytest.mark.parametrize("options", OPTION_SETS, ids=["default", "cumulative", "affine", "no-running", "no-affine"])
def test_dataset_stats_equal_batchnorm_on_the_concatenation(runner: CliRunner, tmp_path: Path,
                                                            options: list[str]) -> None:
    xs = shards(tmp_path / "d", sizes=(3, 1, 5, 2))
    res = run(runner, tmp_path / "d", "--dataset-stats", "--output-dir", tmp_path / "out",
              "--save-state", tmp_path / "s.pt", *options)
    assert res.exit_code == 0, res.output
    opts: dict[str, Any] = {"momentum": 0.1, "eps": 1e-5, "affine": True, "track_running_stats": True}
    if "none" in options:
        opts["momentum"] = None
    if "0.3" in options:
        opts["momentum"] = 0.3
    if "1e-3" in options:
        opts["eps"] = 1e-3
    opts["affine"] = "--no-affine" not in options
    opts["track_running_stats"] = "--no-track-running-stats" not in options
    module = nn.BatchNorm2d(3, **opts)
    if "--weight" in options:
        with torch.no_grad():
            module.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
            module.bias.copy_(torch.tensor([1.0, 0.0, 0.25]))
    whole = module(torch.from_numpy(np.concatenate(xs))).detach()
    ref = ReferenceBatchNorm2d(3, **opts, state={"weight": [0.5, 2.0, -1.0], "bias": [1.0, 0.0, 0.25]}
                               if "--weight" in options else None)
    ref_whole = ref.forward(np.concatenate(xs), training=True)
    start = 0
    for i, x in enumerate(xs):
        got = torch.from_numpy(np.load(tmp_path / "out" / f"shard_{i}.bn.npy"))
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got, whole[start:start + len(x)], **TOL)
        np.testing.assert_allclose(got.double().numpy(), ref_whole[start:start + len(x)], rtol=1e-5, atol=1e-5)
        start += len(x)
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state.keys() == module.state_dict().keys()
    for k, v in module.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=1e-6, atol=1e-7)
    if opts["track_running_stats"]:
        assert int(state["num_batches_tracked"]) == 1
        np.testing.assert_allclose(state["running_var"].double().numpy(), ref.running_var, rtol=1e-6)


def test_dataset_stats_over_mixed_formats_and_nhwc(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    xs = [(rng.normal(size=(n, 4, 5, 2)) * [1.0, 3.0] + [0.5, -4.0]).astype(np.float32) for n in (2, 3, 1, 4)]
    np.save(tmp_path / "a.npy", xs[0])
    np.savez(tmp_path / "b.npz", images=xs[1], labels=np.arange(3))
    save_file({"images": torch.from_numpy(xs[2])}, str(tmp_path / "c.safetensors"))
    torch.save({"images": torch.from_numpy(xs[3]), "epoch": 2}, tmp_path / "d.pt")
    paths = [tmp_path / n for n in ("a.npy", "b.npz", "c.safetensors", "d.pt")]
    res = run(runner, *paths, "--key", "images", "--layout", "nhwc", "--dataset-stats", "--output-dir",
              tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["statistics"] == "dataset" and doc["dataset"]["count"] == 10 * 4 * 5
    assert [f["ok"] for f in doc["files"]] == [True] * 4
    module = nn.BatchNorm2d(2)
    whole = module(torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2)).detach().permute(0, 2, 3, 1)
    got = [np.load(tmp_path / "out" / "a.bn.npy"), np.load(tmp_path / "out" / "b.bn.npz")["images"]]
    from safetensors.torch import load_file

    got.append(load_file(str(tmp_path / "out" / "c.bn.safetensors"))["images"].numpy())
    pt = torch.load(tmp_path / "out" / "d.bn.pt", weights_only=True)
    got.append(pt["images"].numpy())
    assert pt["epoch"] == 2  # the rest of the file is kept
    torch.testing.assert_close(torch.from_numpy(np.concatenate(got)), whole, **TOL)
    torch.testing.assert_close(torch.tensor(doc["state"]["running_mean"]), module.running_mean, **TOL)


def test_dataset_stats_streamed_equal_in_memory(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d", sizes=(6, 2, 9))
    base = [tmp_path / "d", "--dataset-stats", "--force"]
    assert run(runner, *base, "--output-dir", tmp_path / "mem", "--in-memory",
               "--save-state", tmp_path / "mem.pt").exit_code == 0
    res = run(runner, *base, "--output-dir", tmp_path / "ooc", "--out-of-core", "--chunk-size", "300",
              "--save-state", tmp_path / "ooc.pt", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {f["tensors"][0]["execution"]["path"] for f in doc["files"]} == {"out-of-core"}
    assert {f["tensors"][0]["execution"]["passes"] for f in doc["files"]} == {1}  # the statistics are given
    for i in range(3):
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "ooc" / f"shard_{i}.bn.npy")),
                                   torch.from_numpy(np.load(tmp_path / "mem" / f"shard_{i}.bn.npy")), **TOL)
    a, b = torch.load(tmp_path / "mem.pt", weights_only=True), torch.load(tmp_path / "ooc.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_streamed_inputs_chain_through_one_layer(runner: CliRunner, tmp_path: Path) -> None:
    xs = shards(tmp_path / "d", sizes=(4, 3))
    res = run(runner, tmp_path / "d", "--out-of-core", "--chunk-size", "200", "--output-dir", tmp_path / "out",
              "--save-state", tmp_path / "s.pt")
    assert res.exit_code == 0, res.output
    module = nn.BatchNorm2d(3)
    for i, x in enumerate(xs):
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out" / f"shard_{i}.bn.npy")),
                                   module(torch.from_numpy(x)).detach(), **TOL)
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert int(state["num_batches_tracked"]) == 2
    torch.testing.assert_close(state["running_var"], module.running_var, rtol=1e-6, atol=1e-7)


def test_dataset_stats_refuse_a_bad_input_before_writing_anything(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d")
    np.save(tmp_path / "d" / "shard_9.npy", np.zeros((2, 3, 4, 5), np.uint8))
    res = run(runner, tmp_path / "d", "--dataset-stats", "--output-dir", tmp_path / "out")
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: {tmp_path / 'd' / 'shard_9.npy'}: ") and "uint8" in res.stderr
    assert not (tmp_path / "out").exists()  # the folder it made is gone again, and nothing was written


# -- failures stay with their file ----------------------------------------------------------------
def test_a_bad_input_does_not_stop_the_others(runner: CliRunner, tmp_path: Path) -> None:
    xs = shards(tmp_path / "d", sizes=(2, 3, 4))
    np.save(tmp_path / "d" / "shard_1.npy", np.zeros((3, 3, 4, 5), np.uint8))  # not float
    (tmp_path / "d" / "shard_3.npy").write_bytes(b"\x93NUMPY garbage")  # not a .npy
    np.save(tmp_path / "d" / "shard_4.npy", np.zeros((2, 4, 4, 5), np.float32))  # 4 channels, not 3
    res = run(runner, tmp_path / "d", "--output-dir", tmp_path / "out", "--save-state", tmp_path / "s.pt", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert [f["ok"] for f in doc["files"]] == [True, False, True, False, False]
    assert doc["summary"] == {"files": 5, "written": 2, "failed": 3, "tensors": 2, "ranks": 1}
    assert doc["state_written"] is False and not (tmp_path / "s.pt").exists()
    assert int(doc["state"]["num_batches_tracked"]) == 2  # the good inputs were two steps
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard_0.bn.npy", "shard_2.bn.npy"]
    assert no_temp_files(tmp_path)
    module = nn.BatchNorm2d(3)
    for i in (0, 2):
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out" / f"shard_{i}.bn.npy")),
                                   module(torch.from_numpy(xs[i])).detach(), rtol=0, atol=0)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert [e.split(":")[1].strip() for e in errors] == [str(tmp_path / "d" / f"shard_{i}.npy") for i in (1, 3, 4)]
    assert doc["files"][1]["error"]["type"] == "DTypeError" and "uint8" in doc["files"][1]["error"]["message"]
    assert "num_features=3" in doc["files"][4]["error"]["message"]
    text = run(runner, tmp_path / "d", "--output-dir", tmp_path / "out2")
    assert text.exit_code == 1 and "wrote 2 of 5 files" in text.stdout and "failed (error below)" in text.stdout


def test_every_destination_is_checked_before_any_work(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard_2.bn.npy").write_bytes(b"keep me")
    res = run(runner, tmp_path / "d", "--output-dir", tmp_path / "out")
    assert res.exit_code == 1 and "shard_2.bn.npy: already exists" in res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["shard_2.bn.npy"]
    assert (tmp_path / "out" / "shard_2.bn.npy").read_bytes() == b"keep me"
    assert run(runner, tmp_path / "d", "--output-dir", tmp_path / "out", "--force").exit_code == 0


def test_a_layer_error_stops_the_run(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d")
    res = run(runner, tmp_path / "d", "--output-dir", tmp_path / "out", "--weight", "1,2")
    assert res.exit_code == 1
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]) == 1
    assert "--weight has 2 values" in res.stderr and not (tmp_path / "out").exists()


def test_output_names_must_not_collide(runner: CliRunner, tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "x.npy", np.ones((2, 3, 2, 2), np.float32))
    res = run(runner, tmp_path / "a" / "x.npy", tmp_path / "b" / "x.npy", "--output-dir", tmp_path / "out")
    assert res.exit_code == 1 and "would be written for" in res.stderr
    # Beside their inputs they do not collide; an input is never another input's output.
    assert run(runner, tmp_path / "a" / "x.npy", tmp_path / "b" / "x.npy").exit_code == 0
    res = run(runner, tmp_path / "a" / "x.npy", tmp_path / "a" / "x.bn.npy", "--force")
    assert res.exit_code == 1 and "is an input file" in res.stderr


def test_a_folder_skips_its_own_earlier_outputs(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d")
    assert run(runner, tmp_path / "d").exit_code == 0
    res = run(runner, tmp_path / "d", "--force", "--json")
    assert res.exit_code == 0, res.output
    assert [Path(f["input"]).name for f in json.loads(res.stdout)["files"]] == [f"shard_{i}.npy" for i in range(3)]
    res = run(runner, tmp_path / "d", "--glob", "*.bn.npy", "--output-dir", tmp_path / "again", "--json")
    assert [Path(f["input"]).name for f in json.loads(res.stdout)["files"]] == [f"shard_{i}.bn.npy" for i in range(3)]


@pytest.mark.parametrize(("args", "message"), [
    (["{d}", "-o", "{t}/o.npy"], "-o names one output, and the inputs are 3 files"),
    (["{d}/shard_0.npy", "-o", "{t}/o.npy", "--output-dir", "{t}/out"], "not both"),
    (["{d}", "--dataset-stats", "--mode", "eval"], "eval mode does not use"),
    (["{d}/shard_0.npy", "--format", "npy"], "--format is the format of -o -"),
    (["{d}/shard_0.npy", "-o", "-", "--json"], "no JSON document can go there"),
    (["{d}/shard_0.npy", "--key", "a", "--key", "a"], "'a' is given twice"),
])
def test_usage_errors_exit_2_before_any_work(runner: CliRunner, tmp_path: Path, args: list[str], message: str) -> None:
    shards(tmp_path / "d")
    res = run(runner, *[a.format(d=tmp_path / "d", t=tmp_path) for a in args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_single_file_report_is_unchanged_and_a_folder_of_one_is_a_run(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d", sizes=(2,))
    single = json.loads(run(runner, tmp_path / "d" / "shard_0.npy", "--json").stdout)
    assert {"input", "channels", "state", "passed_through", "dropped"} <= single.keys() and "files" not in single
    many = json.loads(run(runner, tmp_path / "d", "--json", "--force").stdout)
    assert many["files"][0]["tensors"][0]["channels"] == single["channels"]


def test_output_dir_is_made_and_removed_when_nothing_lands_in_it(runner: CliRunner, tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 4), np.uint8))
    np.save(tmp_path / "bad2.npy", np.zeros((3, 4, 4), np.float32))
    assert run(runner, tmp_path / "bad.npy", tmp_path / "bad2.npy", "--output-dir", tmp_path / "out").exit_code == 1
    assert not (tmp_path / "out").exists()
    res = run(runner, tmp_path / "bad.npy", "--output-dir", tmp_path / "no" / "out")
    assert res.exit_code == 1 and "does not exist" in res.stderr


def test_progress_over_files(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    shards(tmp_path / "d")
    ticks: list[tuple[str, int, int]] = []

    @contextlib.contextmanager
    def record(**_: Any) -> Iterator[Any]:
        yield lambda task, done, total: ticks.append((task, done, total))

    monkeypatch.setattr(bncli.progress, "progress_callback", record)
    assert run(runner, tmp_path / "d", "--output-dir", tmp_path / "out").exit_code == 0
    files = [t for t in ticks if t[0].startswith("files: ")]
    started = [(f"files: {tmp_path / 'd' / f'shard_{i}.npy'}", i, 3) for i in range(3)]
    assert files == [*started, ("files: 3 done", 3, 3)]


def test_the_files_bar_draws_counts_on_a_terminal() -> None:
    from io import StringIO

    from rich.console import Console

    buffer = StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=100, color_system=None)
    with bncli.progress.progress_callback(console=terminal) as progress:
        assert progress is not None
        progress("files: shards/shard_1.npy", 1, 3)
        progress("pass 1/2 statistics", 1 << 20, 1 << 30)
        progress("files: 3 done", 3, 3)
    drawn = buffer.getvalue()
    assert "files 3 done" in drawn and "3/3" in drawn and "pass 1/2 statistics" in drawn


def test_chained_train_mode_refuses_to_split_across_ranks(tmp_path: Path) -> None:
    class TwoRanks(distributed.World):
        size = 2

    shards(tmp_path / "d")
    files = sorted((tmp_path / "d").iterdir())
    with pytest.raises(InputError, match="consecutive train steps"):
        batch.normalize_many(files, batch.output_paths(files), keys=[None], mode="train", layout="nchw",
                             opts=core.EngineOptions(), force=False, save_state=None, world=TwoRanks())


# -- compare -----------------------------------------------------------------------------------
def test_compare_many_inputs_one_report_each(runner: CliRunner, tmp_path: Path) -> None:
    shards(tmp_path / "d", sizes=(2, 3))
    np.save(tmp_path / "d" / "shard_2.npy", np.zeros((3, 4, 5), np.float32))
    res = runner.invoke(app, ["compare", str(tmp_path / "d"), "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc["summary"] == {"files": 3, "compared": 2, "failed": 1}
    for i in (0, 1):
        one = json.loads(runner.invoke(app, ["compare", str(tmp_path / "d" / f"shard_{i}.npy"), "--json"]).stdout)
        assert doc["files"][i] == {"ok": True, **one}
    assert doc["files"][2]["ok"] is False and "4D input" in doc["files"][2]["error"]["message"]
    text = runner.invoke(app, ["compare", str(tmp_path / "d")])
    assert text.exit_code == 1
    assert text.stdout.count("Output per channel: train mode vs eval mode") == 2
    assert "compared 2 of 3 inputs" in text.stdout and "Summary: largest |train - eval| per input" in text.stdout
    assert text.stderr.startswith(f"Error: {tmp_path / 'd' / 'shard_2.npy'}: ")


def test_compare_a_model_goes_alone(runner: CliRunner, tmp_path: Path) -> None:
    res = runner.invoke(app, ["compare", str(tmp_path / "m.pt2"), str(tmp_path / "x.npy")])
    assert res.exit_code == 2 and "compared on its own" in res.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("pooled", [[], ["--dataset-stats"]], ids=["per-input", "dataset"])
def test_many_inputs_on_cuda_equal_the_cpu_run(runner: CliRunner, tmp_path: Path, pooled: list[str]) -> None:
    shards(tmp_path / "d", sizes=(3, 1, 5))
    for device in ("cpu", "cuda"):
        res = run(runner, tmp_path / "d", *pooled, "--device", device, "--output-dir", tmp_path / device,
                  "--save-state", tmp_path / f"{device}.pt")
        assert res.exit_code == 0, res.output
    for i in range(3):
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "cuda" / f"shard_{i}.bn.npy")),
                                   torch.from_numpy(np.load(tmp_path / "cpu" / f"shard_{i}.bn.npy")), **TOL)
    a, b = (torch.load(tmp_path / f"{d}.pt", weights_only=True) for d in ("cpu", "cuda"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
