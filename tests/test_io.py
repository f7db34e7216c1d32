"""File I/O: every format, key choice, dtype kept, pickle refused, atomic writes."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bncli import io
from bncli.errors import InputError, KeyChoiceError, OutputError, UnsafeFileError


class Evil:
    """Unpickling this runs `touch <marker>`: proof that a loader executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# -- reading ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npy", ".npz"])
def test_round_trip_keeps_dtype_and_values(tmp_path: Path, suffix: str, dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 4, 5).to(dtype)
    dest = tmp_path / f"x{suffix}"
    if suffix in (".npy", ".npz") and dtype == torch.bfloat16:
        with pytest.raises(OutputError, match="bfloat16"):
            io.save_tensor(x, dest)
        assert not dest.exists()
        return
    io.save_tensor(x, dest)
    y, _ = io.load_tensor(dest)
    assert y.dtype == dtype
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    info = io.peek(dest)
    assert info.shape == (2, 3, 4, 5)
    assert info.dtype == str(dtype).replace("torch.", "")


def test_peek_reads_headers_without_data(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(64, 3, 64, 64)).flush()
    with path.open("r+b") as fh:  # truncate the data: a header-only read must still work
        fh.truncate(200)
    info = io.peek(path)
    assert info.shape == (64, 3, 64, 64)
    assert info.dtype == "float32"


def test_safetensors_header_peek_and_bf16_chunks(tmp_path: Path) -> None:
    x = torch.randn(4, 2, 3, 3).bfloat16()
    save_file({"a": x, "b": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    info = io.peek(tmp_path / "m.safetensors", "a")
    assert (info.shape, info.dtype, info.key) == ((4, 2, 3, 3), "bfloat16", "a")
    blocks = list(io.iter_chunks(tmp_path / "m.safetensors", "a", max_bytes=2 * 18 * 2))
    assert len(blocks) == 2
    np.testing.assert_array_equal(np.concatenate(blocks), x.float().numpy())


def test_iter_chunks_covers_every_row(tmp_path: Path) -> None:
    x = np.arange(7 * 3 * 2 * 2, dtype=np.float32).reshape(7, 3, 2, 2)
    np.save(tmp_path / "x.npy", x)
    blocks = list(io.iter_chunks(tmp_path / "x.npy", max_bytes=2 * 12 * 4))
    assert [b.shape[0] for b in blocks] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), x)


def test_several_tensors_need_a_key(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((2, 3, 4, 4), np.float32), labels=np.arange(2))
    with pytest.raises(KeyChoiceError) as err:
        io.load_tensor(path)
    assert "images (2, 3, 4, 4) float32" in (err.value.hint or "")
    assert "labels" in (err.value.hint or "")
    x, key = io.load_tensor(path, "images")
    assert key == "images" and tuple(x.shape) == (2, 3, 4, 4)
    with pytest.raises(KeyChoiceError, match="no tensor named 'nope'"):
        io.load_tensor(path, "nope")


def test_nested_checkpoint_flattens_to_dotted_keys(tmp_path: Path) -> None:
    torch.save({"model": {"bn": {"weight": torch.ones(3)}}, "epoch": 3, "list": [torch.zeros(2)]},
               tmp_path / "ck.pt")
    flat = io.load_state_dict(tmp_path / "ck.pt")
    assert set(flat) == {"model.bn.weight", "list.0"}


@pytest.mark.parametrize("content, suffix, expected", [
    (b"hello world, not a tensor", ".npy", "not a .npy file"),
    (b"PK\x03\x04garbage", ".pt", "cannot read this .pt file"),
    (b"garbage", ".npz", "not a valid .npz"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", ".safetensors", "not a valid .safetensors"),
])
def test_corrupt_files_are_input_errors(tmp_path: Path, content: bytes, suffix: str, expected: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected):
        io.load_tensor(path)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        io.load_tensor(tmp_path / "nope.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InputError, match="unsupported file type '.csv'"):
        io.peek(tmp_path / "x.csv")
    with pytest.raises(InputError, match="is a directory"):
        io.peek(tmp_path)


# -- security: a malicious pickle runs no code --------------------------------------------
def test_payload_is_real_when_unpickled_unsafely(tmp_path: Path) -> None:
    """Control: the payload used below really runs code under a plain pickle.load."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle.pt", "object.npy", "raw-pickle.npy",
                                 "object.npz", "raw-pickle.npz"])
def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    evil = Evil(marker)
    kind, suffix = how.split(".") if "." in how else (how, "pt")
    path = tmp_path / f"evil.{suffix}"
    if how == "torch.save":
        path = tmp_path / "evil.pt"
        torch.save({"x": torch.zeros(1, 3, 2, 2), "payload": evil}, path)
    elif kind == "raw-pickle":
        path.write_bytes(pickle.dumps(evil))
    elif suffix == "npy":
        np.save(path, np.array([evil, 1], dtype=object), allow_pickle=True)
    else:
        np.savez(path, x=np.array([evil], dtype=object))
    for call in (io.peek, io.load_tensor):
        with pytest.raises(UnsafeFileError) as err:
            call(path)
        assert "pickle" in err.value.message
        assert err.value.hint
    if suffix in ("pt",):
        with pytest.raises(UnsafeFileError):
            io.load_state_dict(path)
    assert not marker.exists(), "loading ran the payload"


# -- writing: atomic, never over the input, never over an existing file without force -----
def test_default_output_is_beside_input() -> None:
    assert io.default_output(Path("d/batch.npy")) == Path("d/batch.bn.npy")
    assert io.default_output(Path("d/m.safetensors")) == Path("d/m.bn.safetensors")


def test_existing_output_kept_without_force(tmp_path: Path) -> None:
    dest = tmp_path / "out.npy"
    dest.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        io.save_tensor(torch.zeros(2), dest)
    assert dest.read_bytes() == b"precious"
    io.save_tensor(torch.zeros(2), dest, force=True)
    assert np.load(dest).shape == (2,)


def test_input_is_never_overwritten_even_with_force(tmp_path: Path) -> None:
    src = tmp_path / "in.npy"
    np.save(src, np.ones(3, np.float32))
    before = src.read_bytes()
    with pytest.raises(OutputError, match="never overwrites its input"):
        io.save_tensor(torch.zeros(3), src, force=True, protect=[src])
    link = tmp_path / "alias.npy"
    link.symlink_to(src)
    with pytest.raises(OutputError, match="never overwrites its input"):
        io.save_tensor(torch.zeros(3), link, force=True, protect=[src])
    assert src.read_bytes() == before


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             exc: BaseException, existing: bool) -> None:
    dest = tmp_path / "out.npy"
    if existing:
        dest.write_bytes(b"old")

    def broken_save(fh: object, array: np.ndarray, **_: object) -> None:
        fh.write(b"\x93NUMPY partial")  # type: ignore[attr-defined]
        raise exc

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(type(exc)):
        io.save_tensor(torch.zeros(4, 3, 2, 2), dest, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out.npy"] if existing else [])
    if existing:
        assert dest.read_bytes() == b"old"


def test_output_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        io.save_tensor(torch.zeros(2), tmp_path / "o.npy")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o.npy").stat().st_mode) == 0o644


def test_output_checks(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write '.txt'"):
        io.save_tensor(torch.zeros(2), tmp_path / "o.txt")
    with pytest.raises(OutputError, match="does not exist"):
        io.save_tensor(torch.zeros(2), tmp_path / "no" / "o.npy")
    with pytest.raises(OutputError, match="cannot write '.npy'") as err:
        io.save_state_dict({"w": torch.zeros(2)}, tmp_path / "s.npy")
    assert ".pt" in (err.value.hint or "")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_round_trip(tmp_path: Path, suffix: str) -> None:
    bn = torch.nn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    io.save_state_dict(bn.state_dict(), tmp_path / f"s{suffix}")
    fresh = torch.nn.BatchNorm2d(3)
    fresh.load_state_dict(io.load_state_dict(tmp_path / f"s{suffix}"))
    torch.testing.assert_close(fresh.running_var, bn.running_var, rtol=0, atol=0)
    assert int(fresh.num_batches_tracked) == 1


def test_parse_vector(tmp_path: Path) -> None:
    np.testing.assert_array_equal(io.parse_vector("1, 2.5,3", "weight"), [1, 2.5, 3])
    np.save(tmp_path / "w.npy", np.array([1.0, 2.0]))
    np.testing.assert_array_equal(io.parse_vector(str(tmp_path / "w.npy"), "weight"), [1, 2])
    np.save(tmp_path / "m.npy", np.ones((2, 2)))
    with pytest.raises(InputError, match="expected a 1D vector"):
        io.parse_vector(str(tmp_path / "m.npy"), "weight")
    with pytest.raises(InputError, match="comma-separated"):
        io.parse_vector("1,x", "bias")
