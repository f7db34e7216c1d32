"""Bounded-memory access: chunked reads by positioned I/O, a pre-sized .npy writer.

Memory maps are avoided on purpose: every page a map touches counts as resident memory,
so a pass over a 13 GiB file through np.memmap would show 13 GiB of RSS.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedIOBase, RawIOBase
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from bncli.errors import InputError, OutputError
from bncli.wording import plural

if TYPE_CHECKING:
    pass


from bncli.io.formats import (
    _read_npy_header,
    load_numpy,
    load_tensor,
    peek,
)
from bncli.io.safetensors_header import ST_DTYPES, read_header


def iter_chunks(path: Path, key: str | None = None, *, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """Yield the tensor as NumPy blocks along axis 0, about ``max_bytes`` (as stored) each.

    C-order ``.npy`` and ``.safetensors`` are read with plain positioned reads, one block
    at a time, so peak memory stays bounded by the block size whatever the file size (a
    memory map would count every page it touched as resident). Each block is a fresh
    array the caller may keep. bfloat16 values arrive widened to float32 (exact).
    Fortran-order ``.npy`` is sliced through a memory map; ``.npz`` and ``.pt`` have no
    random access and are loaded whole.
    """
    path = Path(path)
    raw = raw_tensor(path, key)
    if raw is not None and not raw.fortran_order:
        yield from _read_blocks(raw, max_bytes)
        return
    suffix = path.suffix.lower()  # the loaders check the file and its type
    if suffix == ".npy":
        array: Any = load_numpy(path, mmap=True)[0]
    elif suffix == ".npz":
        array = load_numpy(path, key)[0]
    else:
        import torch

        tensor, _ = load_tensor(path, key)
        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    yield from _blocks(array, max_bytes)


def _blocks(array: Any, max_bytes: int) -> Iterator[np.ndarray]:
    if array.ndim == 0:
        yield np.asarray(array)
        return
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    rows = max(1, max_bytes // row_bytes)
    for start in range(0, max(array.shape[0], 1), rows):
        yield np.asarray(array[start:start + rows])


@dataclass(frozen=True)
class RawTensor:
    """Where one tensor's bytes lie in a file with random access (.npy, .safetensors).

    Attributes:
        path: The file.
        offset: Byte offset of the first element.
        shape: The tensor's shape.
        dtype: The dtype as stored (``<u2`` for bfloat16, whose bits NumPy cannot name).
        bfloat16: The values are bfloat16 bits, widened to float32 when read.
        fortran_order: A column-major ``.npy``; rows along axis 0 are not contiguous.
    """

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    bfloat16: bool = False
    fortran_order: bool = False

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along axis 0 (the whole tensor for a scalar)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def raw_tensor(path: Path, key: str | None = None) -> RawTensor | None:
    """Locate a tensor's bytes in a ``.npy`` or ``.safetensors`` file, reading headers only.

    Returns:
        Where the data lies, or None for ``.npz``/``.pt`` (compressed or pickled
        containers without random access).

    Raises:
        InputError: The file is shorter than its header says (truncated), or holds a
            dtype bncli cannot read; plus everything :func:`peek` raises.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".safetensors"):
        # No random access; the loaders raise what peek would (missing, unsafe, bad key).
        # Returning before peek matters: peeking at a .pt loads the whole file.
        return None
    info = peek(path, key)
    if suffix == ".npy":
        with path.open("rb") as fh:
            shape, dtype, fortran, offset = _read_npy_header(fh, path)
        raw = RawTensor(path, offset, shape, dtype, fortran_order=fortran and len(shape) > 1)
    elif suffix == ".safetensors":
        header, base = read_header(path)
        meta = header[info.key or ""]
        tag = meta["dtype"]
        np_dtype, name = ST_DTYPES.get(tag, (None, tag))
        if tag == "BF16":
            np_dtype = "<u2"
        if np_dtype is None:
            raise InputError(f"{path}: tensor {info.key!r} has dtype {name}, which bncli cannot read.",
                             hint="Convert it to float32 first.")
        raw = RawTensor(path, base + int(meta["data_offsets"][0]), info.shape, np.dtype(np_dtype),
                        bfloat16=tag == "BF16")
    size = path.stat().st_size
    if raw.offset + raw.nbytes > size:
        raise InputError(f"{path}: truncated: its header promises {plural(raw.nbytes, 'byte')} of data "
                         f"for shape {raw.shape} {info.dtype}, but the file ends after "
                         f"{plural(max(size - raw.offset, 0), 'byte')}.",
                         hint="The copy or download was cut short; re-create the file.")
    return raw


def read_rows(raw: RawTensor, fh: BufferedIOBase | RawIOBase, start: int, stop: int) -> np.ndarray:
    """Read rows ``start:stop`` (along axis 0) of a C-order tensor from an open file.

    ``fh`` should be unbuffered (``open(path, "rb", buffering=0)``) so the bytes go
    straight from the page cache into the returned array, without a second copy.
    """
    rows = max(stop - start, 0)
    shape = (rows, *raw.shape[1:]) if raw.shape else ()
    out = np.empty(shape, dtype=raw.dtype)
    view = out.reshape(-1).view(np.uint8).data
    fh.seek(raw.offset + start * raw.row_bytes)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise InputError(f"{raw.path}: ended early while reading rows {start}:{stop}.",
                             hint="The file was truncated or is being rewritten; re-create it.")
        done += n
    if not out.dtype.isnative:  # a big-endian .npy: torch and the engine take native order only
        out = out.astype(out.dtype.newbyteorder("="))
    if raw.bfloat16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _read_blocks(raw: RawTensor, max_bytes: int) -> Iterator[np.ndarray]:
    rows = max(1, max_bytes // max(raw.row_bytes, 1))
    total = raw.shape[0] if raw.shape else 1
    with raw.path.open("rb", buffering=0) as fh:
        if not raw.shape:
            yield read_rows(raw, fh, 0, 1)
            return
        for start in range(0, max(total, 1), rows):
            yield read_rows(raw, fh, start, min(start + rows, total))


class NpyWriter:
    """Write a C-order ``.npy`` of known shape and dtype block by block, along axis 0.

    For outputs larger than memory: the header goes first, the file is allocated to its
    full size up front (a full disk fails before the work, not after), then each
    :meth:`write` appends the next rows. :meth:`close` checks that every byte was
    written and fsyncs. Use it on the temporary path of :func:`atomic_output`, so an
    interrupted write never leaves a partial file under the final name.

    Example:
        >>> with atomic_output(dest, force=False) as tmp, NpyWriter(tmp, shape, "<f4") as w:
        ...     for block in blocks:
        ...         w.write(block)
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.written = 0
        self._failed = False
        self._fh = self.path.open("wb", buffering=0)
        try:
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": self.shape}
            try:
                np.lib.format.write_array_header_1_0(self._fh, header)
            except ValueError:  # a header over 64 KiB: only the 2.0 format can hold it
                np.lib.format.write_array_header_2_0(self._fh, header)
            self.offset = self._fh.tell()
            _preallocate(self._fh, self.offset + self.nbytes, self.path)
        except BaseException:
            self._fh.close()
            raise

    def write(self, block: np.ndarray) -> None:
        """Append the next rows (a block of shape (rows, *shape[1:]) and this dtype)."""
        if block.dtype != self.dtype or tuple(block.shape[1:]) != self.shape[1:]:
            raise ValueError(f"block {block.shape} {block.dtype} does not fit {self.shape} {self.dtype}")
        if self._failed:
            raise OutputError(f"{self.path}: an earlier write failed; the file is incomplete.",
                              hint="Fix the first error reported.")
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8).data
        if self.written + len(data) > self.nbytes:
            raise ValueError("more rows written than the shape holds")
        try:
            while data:
                n = self._fh.write(data)
                data = data[n:]
                self.written += n
        except BaseException:
            self._failed = True  # rows are appended in order: nothing may follow a gap
            raise

    def close(self) -> None:
        """Check completeness, fsync and close (idempotent)."""
        if self._fh.closed:
            return
        try:
            if self.written != self.nbytes:
                raise OutputError(f"{self.path}: only {self.written:,} of {plural(self.nbytes, 'byte')} were written.",
                                  hint="This is a bug in bncli; please report it with --debug.")
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def _preallocate(fh: BinaryIO, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(fh.fileno(), 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            raise OutputError(f"{path.parent}: not enough disk space for the output: it needs "
                              f"{size / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free.",
                              hint="Free some space, or write elsewhere with -o.") from None
        fh.truncate(size)  # no fallocate on this filesystem: a sparse file of the right size
    except AttributeError:  # not on Linux
        fh.truncate(size)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping, if the OS says."""
    try:
        with Path("/proc/meminfo").open() as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


