"""--key keeps the rest: a container's other tensors are written through unchanged, bit for bit."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from bncli import io
from bncli.cli import app


def images(seed: int = 0, n: int = 4, c: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 5, 6, generator=g) * 2 + 1


def bn(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor as one train step of one fresh nn.BatchNorm2d, in order."""
    module = nn.BatchNorm2d(xs[0].shape[1])
    return [module(x).detach() for x in xs]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: dtype, shape and every byte."""
    return a.dtype == b.dtype and a.shape == b.shape and a.reshape(-1).view(torch.uint8).equal(
        b.reshape(-1).view(torch.uint8))


def others() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return {"masks": torch.rand(4, 1, 5, 6, generator=g) > 0.5, "labels": torch.randint(0, 10, (4,), generator=g),
            "weights16": torch.randn(4, generator=g).half(), "scale": torch.tensor(3.5, dtype=torch.float64)}


def normalize(runner: CliRunner, *args: str | Path) -> Any:
    return runner.invoke(app, ["normalize", *map(str, args)])


def test_pt_keeps_every_other_entry_keys_order_and_values(runner: CliRunner, tmp_path: Path) -> None:
    rest = others()
    obj = {"meta": {"epoch": 3, "name": "run-7"}, "masks": rest["masks"],
           "data": {"images": images(), "labels": rest["labels"]}, "extra": [rest["weights16"], rest["scale"]]}
    torch.save(obj, tmp_path / "multi.pt")
    res = normalize(runner, tmp_path / "multi.pt", "--key", "data.images", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["passed_through"] == ["masks", "data.labels", "extra.0", "extra.1"] and doc["dropped"] == []
    out = torch.load(tmp_path / "multi.bn.pt", weights_only=True)
    assert list(out) == ["meta", "masks", "data", "extra"] and list(out["data"]) == ["images", "labels"]
    assert out["meta"] == {"epoch": 3, "name": "run-7"} and isinstance(out["extra"], list)
    assert same(out["masks"], rest["masks"]) and same(out["data"]["labels"], rest["labels"])
    assert same(out["extra"][0], rest["weights16"]) and same(out["extra"][1], rest["scale"])
    torch.testing.assert_close(out["data"]["images"], bn(images())[0], rtol=0, atol=0)


def test_npz_keeps_members_in_order(runner: CliRunner, tmp_path: Path) -> None:
    rest = {k: v.numpy() for k, v in others().items()}
    np.savez(tmp_path / "d.npz", labels=rest["labels"], images=images().numpy(), masks=rest["masks"],
             scale=rest["scale"])
    res = normalize(runner, tmp_path / "d.npz", "--key", "images")
    assert res.exit_code == 0, res.output
    assert "kept 3 other tensors" in res.stdout
    with zipfile.ZipFile(tmp_path / "d.bn.npz") as zf:
        assert zf.namelist() == ["labels.npy", "images.npy", "masks.npy", "scale.npy"]
    with np.load(tmp_path / "d.bn.npz", allow_pickle=False) as out:
        for k in ("labels", "masks", "scale"):
            assert out[k].dtype == rest[k].dtype and out[k].tobytes() == rest[k].tobytes(), k
        torch.testing.assert_close(torch.from_numpy(out["images"]), bn(images())[0], rtol=0, atol=0)


def header_keys(path: Path) -> list[str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return list(json.loads(raw[8:8 + n]))


def test_safetensors_keeps_tensors_dtypes_order_and_metadata(runner: CliRunner, tmp_path: Path) -> None:
    rest = others()
    del rest["scale"]
    save_file({"images": images().half(), **rest}, str(tmp_path / "s.safetensors"), metadata={"source": "cam-2"})
    res = normalize(runner, tmp_path / "s.safetensors", "--key", "images", "--force")
    assert res.exit_code == 0, res.output
    out_path = tmp_path / "s.bn.safetensors"
    assert header_keys(out_path) == header_keys(tmp_path / "s.safetensors")
    with safe_open(str(out_path), "pt") as fh:
        assert fh.metadata() == {"source": "cam-2"}
    out = load_file(str(out_path))
    for k, v in rest.items():
        assert same(out[k], v), k
    assert out["images"].dtype == torch.float16
    torch.testing.assert_close(out["images"], bn(images().half())[0], rtol=0, atol=0)


def test_repeated_key_normalizes_each_as_its_own_batch(runner: CliRunner, tmp_path: Path) -> None:
    rest = others()
    a, b = images(1), images(2, n=7)
    torch.save({"left": a, "masks": rest["masks"], "right": b}, tmp_path / "pair.pt")
    res = normalize(runner, tmp_path / "pair.pt", "--key", "right", "--key", "left", "--save-state",
                    tmp_path / "s.pt", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [t["key"] for t in doc["files"][0]["tensors"]] == ["right", "left"]
    assert doc["files"][0]["passed_through"] == ["masks"] and doc["state_written"]
    out = torch.load(tmp_path / "pair.bn.pt", weights_only=True)
    assert list(out) == ["left", "masks", "right"]
    want_right, want_left = bn(b, a)  # in the order the keys were given
    torch.testing.assert_close(out["right"], want_right, rtol=0, atol=0)
    torch.testing.assert_close(out["left"], want_left, rtol=0, atol=0)
    assert same(out["masks"], rest["masks"])
    assert int(torch.load(tmp_path / "s.pt", weights_only=True)["num_batches_tracked"]) == 2


def test_repeated_keys_need_one_channel_count(runner: CliRunner, tmp_path: Path) -> None:
    torch.save({"rgb": images(c=3), "depth": images(c=1)}, tmp_path / "x.pt")
    res = normalize(runner, tmp_path / "x.pt", "--key", "rgb", "--key", "depth")
    assert res.exit_code == 1
    assert f"{tmp_path / 'x.pt'} [depth]: The input has 1 channel" in " ".join(res.stderr.split())
    assert not (tmp_path / "x.bn.pt").exists()


def test_npy_output_holds_the_one_tensor_and_says_what_is_dropped(runner: CliRunner, tmp_path: Path) -> None:
    torch.save({"images": images(), "labels": torch.arange(4), "epoch": 5}, tmp_path / "m.pt")
    res = normalize(runner, tmp_path / "m.pt", "--key", "images", "-o", tmp_path / "y.npy")
    assert res.exit_code == 0, res.output
    assert "not written: labels, epoch (a .npy file holds one array)" in " ".join(res.stderr.split())
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), bn(images())[0], rtol=0, atol=0)
    doc = json.loads(normalize(runner, tmp_path / "m.pt", "--key", "images", "-o", tmp_path / "y.npz",
                               "--json").stdout)
    assert doc["passed_through"] == ["labels"] and doc["dropped"] == ["epoch"]  # .npz holds tensors only
    res = normalize(runner, tmp_path / "m.pt", "--key", "images", "--key", "labels", "-o", tmp_path / "z.npy")
    assert res.exit_code == 1 and "a .npy file holds one array" in res.stderr and not (tmp_path / "z.npy").exists()


def test_cross_format_and_tied_tensors(runner: CliRunner, tmp_path: Path) -> None:
    weight = torch.randn(6)
    torch.save({"images": images(), "w": weight, "w_tied": weight}, tmp_path / "t.pt")  # one storage, two keys
    assert normalize(runner, tmp_path / "t.pt", "--key", "images", "-o", tmp_path / "t.safetensors").exit_code == 0
    out = load_file(str(tmp_path / "t.safetensors"))
    assert sorted(out) == ["images", "w", "w_tied"] and same(out["w"], weight) and same(out["w_tied"], weight)


def test_bfloat16_into_numpy_is_refused_before_work(runner: CliRunner, tmp_path: Path) -> None:
    torch.save({"images": images(), "emb": torch.randn(3).bfloat16()}, tmp_path / "b.pt")
    res = normalize(runner, tmp_path / "b.pt", "--key", "images", "-o", tmp_path / "b.npz")
    assert res.exit_code == 1 and "'emb' (bfloat16)" in res.stderr and not (tmp_path / "b.npz").exists()


def test_missing_and_ambiguous_keys_list_the_tensors(runner: CliRunner, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.ones((2, 3, 2, 2), np.float32), b=np.ones((2, 3, 2, 2), np.float32))
    res = normalize(runner, tmp_path / "d.npz")
    assert res.exit_code == 1 and "holds 2 tensors; which one?" in res.stderr and "--key" in res.stderr
    res = normalize(runner, tmp_path / "d.npz", "--key", "c")
    assert res.exit_code == 1 and "has no tensor named 'c'" in res.stderr


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_load_container_round_trips_through_the_writer(tmp_path: Path, suffix: str) -> None:
    tensors = {"x": images(), "y": torch.arange(5, dtype=torch.int32)}
    path = tmp_path / f"c{suffix}"
    if suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in tensors.items()})
    elif suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    c = io.load_container(path)
    assert list(c.tensors) == list(tensors) if suffix != ".safetensors" else sorted(c.tensors) == ["x", "y"]
    dest = tmp_path / f"back{suffix}"
    io.write_atomic(dest, io.container_writer(c, {}, suffix), force=False)
    back = io.load_container(dest)
    for k, v in tensors.items():
        assert same(back.tensors[k], v)
