"""Scale-out: bncli.distributed (split, exchange, errors) and `torchrun -m bncli stats` on 2-3 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from bncli import datastats, distributed
from bncli.cli import app
from bncli.errors import InputError, ShapeError
from bncli.moments import Moments, block_moments, merge_pairwise

TORCHRUN = Path(sys.executable).with_name("torchrun")


# -- the pieces, in one process ------------------------------------------------------------------
@given(st.lists(st.integers(0, 1000), max_size=30), st.integers(1, 8))
def test_split_is_contiguous_complete_and_balanced(weights: list[int], parts: int) -> None:
    blocks = distributed.split_contiguous(weights, parts)
    assert len(blocks) == parts
    assert [i for b in blocks for i in b] == list(range(len(weights)))  # in order, each item once
    if sum(weights):
        share = sum(weights) / parts
        for b in blocks:
            assert abs(sum(weights[i] for i in b) - share) <= max(weights)


def test_split_examples() -> None:
    assert distributed.split_contiguous([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert distributed.split_contiguous([1, 1, 1, 1, 20], 3) == [range(0, 4), range(4, 5), range(5, 5)]
    assert distributed.split_contiguous([0, 0, 0], 2) == [range(0, 2), range(2, 3)]
    with pytest.raises(ValueError):
        distributed.split_contiguous([1], 0)


def test_pack_round_trips_bit_for_bit() -> None:
    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5))
    x[0, 1, 0, 0], x[1, 2, 0, 0] = np.nan, np.inf
    m = block_moments(x)
    back = Moments.unpack(m.pack())
    assert m.pack().shape == (Moments.packed_size(3),)
    for name in ("shift", "centered_mean", "m2", "minimum", "maximum", "non_finite"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    assert back.count == m.count and back.non_finite.dtype == np.int64


def test_merge_pairwise_is_exact_and_does_not_touch_its_inputs() -> None:
    rng = np.random.default_rng(1)
    blocks = [rng.normal(size=(n, 2, 3, 3)) * 5 + 100 for n in (1, 4, 2, 7, 3)]
    parts = [block_moments(b) for b in blocks]
    before = [p.pack().copy() for p in parts]
    merged = merge_pairwise(parts, 2)
    whole = np.concatenate(blocks)
    np.testing.assert_allclose(merged.mean, whole.mean(axis=(0, 2, 3)), rtol=1e-14)
    np.testing.assert_allclose(merged.var, whole.var(axis=(0, 2, 3)), rtol=1e-12)
    assert all(np.array_equal(p.pack(), b, equal_nan=True) for p, b in zip(parts, before, strict=True))
    assert merge_pairwise([], 2).count == 0


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*distributed.LAUNCH_VARS, "LOCAL_RANK", "BNCLI_DISTRIBUTED"):
        monkeypatch.delenv(var, raising=False)


def test_launch_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    assert not distributed.launched() and distributed.env_rank() == 0
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.launched() and distributed.env_rank() == 1
    monkeypatch.setenv("BNCLI_DISTRIBUTED", "0")
    assert not distributed.launched() and distributed.env_rank() == 0
    monkeypatch.delenv("BNCLI_DISTRIBUTED")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()


def test_session_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    with distributed.session() as world:
        assert world is distributed.LOCAL and world.is_primary and world.size == 1
    with pytest.raises(InputError, match="No torch.distributed environment") as err:
        with distributed.session(enabled=True):
            pass
    assert "torchrun" in (err.value.hint or "")


@pytest.fixture
def gloo_group() -> object:
    """A one-process gloo group in this process: TorchWorld's real code path, no launcher."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def test_torch_world_exchanges_and_reports_errors(gloo_group: object, tmp_path: Path) -> None:
    world = distributed.TorchWorld(owned=False)
    assert (world.rank, world.size) == (0, 1)
    assert world.gather(lambda: {"a": [1, 2.5, None]}) == [{"a": [1, 2.5, None]}]
    m = block_moments(np.random.default_rng(2).normal(size=(3, 2, 4, 4)))
    [back] = world.gather_moments([m], [1], 2)
    np.testing.assert_array_equal(back.pack(), m.pack())
    assert world.gather_moments([], [0], 2) == []

    def bad() -> None:
        raise ShapeError("x.npy: wrong", hint="fix it")

    with pytest.raises(ShapeError, match="x.npy: wrong"):
        world.gather(bad)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its own traceback
        world.gather(lambda: 1 / 0)
    # The statistics through the torch world equal the local ones, bit for bit.
    np.save(tmp_path / "a.npy", np.random.default_rng(3).normal(size=(5, 2, 3, 3)))
    via_torch = datastats.dataset_stats([tmp_path / "a.npy"], world=world)
    local = datastats.dataset_stats([tmp_path / "a.npy"])
    np.testing.assert_array_equal(via_torch.moments.pack(), local.moments.pack())


# -- torchrun, 2 and 3 processes on this machine ---------------------------------------------
def run_torchrun(nproc: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    launcher = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items()
           if k not in (*distributed.LAUNCH_VARS, "LOCAL_RANK", "BNCLI_DISTRIBUTED", "BNCLI_DEBUG")}
    env.update({"OMP_NUM_THREADS": "1", "COLUMNS": "120", "NO_COLOR": "1", "BNCLI_DIST_BACKEND": "gloo"})
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [*launcher, "--standalone", f"--nproc-per-node={nproc}", "-m", "bncli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def write_shards(folder: Path) -> None:
    """Five NHWC uint8 shards of uneven size (the last one is most of the data)."""
    rng = np.random.default_rng(4)
    folder.mkdir()
    for i, n in enumerate((1, 2, 1, 3, 20)):
        np.save(folder / f"shard_{i}.npy", rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))


NUMERIC = ("count", "channels", "mean", "var", "var_unbiased", "std", "std_unbiased", "min", "max", "non_finite")


@pytest.mark.slow
def test_torchrun_equals_one_process(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nproc = 2
    write_shards(tmp_path / "shards")
    args = ["stats", "shards", "--layout", "nhwc", "--scale", "255", "--json"]
    proc = run_torchrun(nproc, [*args, "--save-state", "bn.pt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 prints
    assert doc["ranks"] == nproc and doc["save_state"] == "bn.pt"
    monkeypatch.chdir(tmp_path)
    single = json.loads(runner.invoke(app, args).stdout)
    assert single["ranks"] == 1
    for key in NUMERIC:
        np.testing.assert_allclose(np.asarray(doc[key], dtype=float), np.asarray(single[key], dtype=float),
                                   rtol=1e-12, atol=0)
        assert doc[key] == single[key], key  # in fact bit for bit: per-file moments, merged in file order
    assert doc["inputs"] == single["inputs"] and doc["notes"] == single["notes"]
    state = torch.load(tmp_path / "bn.pt", weights_only=True)
    torch.testing.assert_close(state["running_mean"], torch.tensor(single["mean"]).float())


@pytest.mark.slow
def test_torchrun_error_on_one_rank_reaches_the_user_once(tmp_path: Path) -> None:
    write_shards(tmp_path / "shards")
    # 3 ranks: shards 0-3 on rank 0, the big shard_4 on rank 1, nothing on rank 2 (which must
    # not hang either). Spoil shard_4's header (same size, so the same split): only rank 1 fails.
    paths = sorted((tmp_path / "shards").iterdir())
    path = paths[4]
    data = bytearray(path.read_bytes())
    data[:6] = b"NOTNPY"
    path.write_bytes(bytes(data))
    blocks = distributed.split_contiguous([p.stat().st_size for p in paths], 3)
    assert [len(b) for b in blocks] == [4, 1, 0]
    proc = run_torchrun(3, ["stats", "shards", "--layout", "nhwc"], tmp_path)
    assert proc.returncode != 0
    assert proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("Error: shards/shard_4.npy: ") and errors[0].endswith("(rank 1 of 3)")
    assert "Fix:" in proc.stderr
    assert "bncli/" not in proc.stderr.split("Error:")[0]  # no bncli traceback before the message


def write_float_shards(folder: Path) -> None:
    """Five NCHW float32 shards of uneven size, with per-channel offsets."""
    rng = np.random.default_rng(5)
    folder.mkdir()
    for i, n in enumerate((2, 1, 3, 1, 9)):
        x = rng.normal(size=(n, 3, 6, 5)) * np.array([1.0, 2.0, 0.5])[None, :, None, None] + [[[[0.5]], [[-1]], [[3]]]]
        np.save(folder / f"shard_{i}.npy", x.astype(np.float32))


@pytest.mark.slow
def test_torchrun_normalize_dataset_stats_equals_one_process(runner: CliRunner, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_float_shards(tmp_path / "shards")
    args = ["normalize", "shards", "--dataset-stats", "--json"]
    proc = run_torchrun(2, [*args, "--output-dir", "out2", "--save-state", "bn2.pt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document: only rank 0 prints
    assert doc["summary"] == {"files": 5, "written": 5, "failed": 0, "tensors": 5, "ranks": 2}
    monkeypatch.chdir(tmp_path)
    single = runner.invoke(app, [*args, "--output-dir", "out1", "--save-state", "bn1.pt"])
    assert single.exit_code == 0, single.output
    one = json.loads(single.stdout)
    assert one["summary"]["ranks"] == 1 and one["dataset"] == doc["dataset"]  # the statistics, bit for bit
    for i in range(5):  # each rank wrote its own files; they are the one-process files, byte for byte
        assert (tmp_path / "out2" / f"shard_{i}.bn.npy").read_bytes() == \
            (tmp_path / "out1" / f"shard_{i}.bn.npy").read_bytes()
    a, b = (torch.load(tmp_path / f"bn{n}.pt", weights_only=True) for n in (1, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [f["input"] for f in doc["files"]] == [f["input"] for f in one["files"]]
    # Equal to nn.BatchNorm2d on all the shards as one batch.
    xs = [torch.from_numpy(np.load(tmp_path / "shards" / f"shard_{i}.npy")) for i in range(5)]
    module = torch.nn.BatchNorm2d(3)
    whole = module(torch.cat(xs)).detach()
    got = torch.cat([torch.from_numpy(np.load(tmp_path / "out2" / f"shard_{i}.bn.npy")) for i in range(5)])
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["running_var"], module.running_var, rtol=1e-6, atol=1e-7)
