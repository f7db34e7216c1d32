"""The only module that opens files: safe loading, header peeks, chunked reads, atomic writes.

Security stance: nothing here ever unpickles. ``.pt`` files load with
``torch.load(weights_only=True)``, ``.npy``/``.npz`` with ``allow_pickle=False``, and
``.safetensors`` have no code path at all. A file that would need pickle raises
:class:`~bncli.errors.UnsafeFileError` and is never retried another way.

torch is imported lazily: peeking at a ``.npy``/``.npz``/``.safetensors`` header or
scanning its values with NumPy does not import it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from bncli.errors import InputError, KeyChoiceError, OutputError, UnsafeFileError

if TYPE_CHECKING:
    import torch

TENSOR_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
STATE_SUFFIXES = (".pt", ".pth", ".safetensors")

# safetensors dtype tag -> (numpy dtype or None, bncli dtype name)
_ST_DTYPES: dict[str, tuple[str | None, str]] = {
    "F64": ("<f8", "float64"), "F32": ("<f4", "float32"), "F16": ("<f2", "float16"),
    "BF16": (None, "bfloat16"), "I64": ("<i8", "int64"), "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"), "I8": ("i1", "int8"), "U8": ("u1", "uint8"),
    "U16": ("<u2", "uint16"), "U32": ("<u4", "uint32"), "U64": ("<u8", "uint64"),
    "BOOL": ("?", "bool"),
}


@dataclass(frozen=True)
class TensorInfo:
    """What a file holds, read from its header where the format allows.

    Attributes:
        path: The file.
        key: The chosen tensor's key inside a container (None for a bare tensor).
        shape: Its shape.
        dtype: Its dtype name (``float32``, ``bfloat16``, ``uint8`` ...).
        keys: Every tensor in the file as (key, shape, dtype), for listings.
    """

    path: Path
    key: str | None
    shape: tuple[int, ...]
    dtype: str
    keys: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)


def suffix_of(path: Path, allowed: tuple[str, ...] = TENSOR_SUFFIXES) -> str:
    """The lower-case format suffix, or an InputError naming the supported ones."""
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}.",
            hint=f"bncli reads {', '.join(allowed)} files.",
        )
    return suffix


def _require_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file.", hint="Check the path (and the current directory).")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a tensor file.", hint="Pass a file inside it.")


def _unsafe(path: Path, why: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: refused to load: {why}. Loading it would need pickle, which can run "
        "arbitrary code, so bncli does not.",
        hint="Re-save the data as plain tensors (np.save of a numeric array, "
             "torch.save(tensor or state_dict), or .safetensors) from a trusted environment.",
    )


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


# -- .npy / .npz headers -------------------------------------------------------------------
def _read_npy_header(fh: BinaryIO, path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy stream."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except ValueError as exc:
        if dtype_needs_pickle_message(str(exc)):
            raise _unsafe(path, "its array holds Python objects") from None
        raise InputError(f"{path}: not a valid .npy file ({exc}).",
                         hint="Was it written with numpy.save?") from None
    return tuple(int(s) for s in shape), dtype, bool(fortran), fh.tell()


def dtype_needs_pickle_message(text: str) -> bool:
    return "allow_pickle" in text or "pickle" in text.lower()


def _npy_info(path: Path) -> TensorInfo:
    with path.open("rb") as fh:
        head = fh.read(6)
        fh.seek(0)
        if head != b"\x93NUMPY":
            if head[:1] == b"\x80":
                raise _unsafe(path, "it is a Python pickle, not a .npy array")
            raise InputError(f"{path}: not a .npy file (bad magic bytes).",
                             hint="Was it written with numpy.save? Check the extension.")
        shape, dtype, _, _ = _read_npy_header(fh, path)
    if dtype.hasobject:
        raise _unsafe(path, "its array holds Python objects (dtype=object)")
    return TensorInfo(path, None, shape, dtype.name, [("", shape, dtype.name)])


def _npz_members(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with path.open("rb") as fh:
            if fh.read(1) == b"\x80":
                raise _unsafe(path, "it is a Python pickle, not an .npz archive") from None
        raise InputError(f"{path}: not a valid .npz (zip) archive.",
                         hint="Was it written with numpy.savez?") from None
    members = []
    with zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as fh:
                shape, dtype, _, _ = _read_npy_header(fh, path)  # type: ignore[arg-type]
            if dtype.hasobject:
                raise _unsafe(path, f"member {name[:-4]!r} holds Python objects (dtype=object)")
            members.append((name[:-4], shape, dtype.name))
    return members


# -- .safetensors header ------------------------------------------------------------------
def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: too short to be a .safetensors file.", hint="Check the file.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise InputError(f"{path}: not a valid .safetensors file (header length {n}).",
                             hint="Check the file and its extension.")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: not a valid .safetensors file (bad JSON header).",
                             hint="Check the file and its extension.") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _safetensors_members(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    header, _ = _safetensors_header(path)
    out = []
    for key, meta in header.items():
        tag = meta.get("dtype", "?")
        name = _ST_DTYPES.get(tag, (None, tag.lower()))[1]
        out.append((key, tuple(int(s) for s in meta.get("shape", ())), name))
    return out


# -- .pt -----------------------------------------------------------------------------------
def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}" if prefix else str(i), out)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .pt file under dotted keys ('' for a bare tensor)."""
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it does not expect; the refusal below says it all.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported" in ln or "GLOBAL" in ln), "")
        why = "it contains Python objects that only a full (unsafe) unpickle can rebuild"
        raise _unsafe(path, why + (f" [{detail}]" if detail else "")) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: cannot read this .pt file ({str(exc).splitlines()[0][:200]}).",
                         hint="Is it a file written by torch.save? It may be truncated.") from None
    out: dict[str, torch.Tensor] = {}
    _flatten(obj, "", out)
    return out


# -- public API ----------------------------------------------------------------------------
def _choose(path: Path, members: list[tuple[str, tuple[int, ...], str]], key: str | None) -> str:
    if not members:
        raise InputError(f"{path}: holds no tensors.", hint="Check that this is the right file.")
    names = [m[0] for m in members]
    if key is not None:
        if key not in names:
            raise KeyChoiceError(f"{path}: has no tensor named {key!r}.",
                                 hint="Choose with --key, one of: " + _listing(members))
        return key
    if len(members) == 1:
        return names[0]
    raise KeyChoiceError(f"{path}: holds {len(members)} tensors; which one?",
                         hint="Choose with --key, one of: " + _listing(members))


def _listing(members: list[tuple[str, tuple[int, ...], str]], limit: int = 12) -> str:
    shown = [f"{k} {tuple(s)} {d}" for k, s, d in members[:limit]]
    more = f" ... and {len(members) - limit} more" if len(members) > limit else ""
    return "; ".join(shown) + more


def peek(path: Path, key: str | None = None) -> TensorInfo:
    """Shape and dtype of the tensor a file holds, reading only headers where possible.

    ``.npy``, ``.npz`` and ``.safetensors`` are read without torch and without their
    data; ``.pt`` has no header, so it is loaded (safely) with torch.

    Raises:
        InputError, UnsafeFileError, KeyChoiceError: see the messages.
    """
    path = Path(path)
    _require_file(path)
    suffix = suffix_of(path)
    if suffix == ".npy":
        info = _npy_info(path)
        if key not in (None, ""):
            raise KeyChoiceError(f"{path}: a .npy file holds one array; --key {key!r} does not apply.",
                                 hint="Drop --key.")
        return info
    if suffix == ".npz":
        members = _npz_members(path)
    elif suffix == ".safetensors":
        members = _safetensors_members(path)
    else:
        tensors = _torch_load(path)
        members = [(k, tuple(v.shape), _torch_dtype_name(v.dtype)) for k, v in tensors.items()]
    chosen = _choose(path, members, key)
    _, shape, dtype = next(m for m in members if m[0] == chosen)
    return TensorInfo(path, chosen or None, shape, dtype, members)


def load_tensor(path: Path, key: str | None = None) -> tuple[torch.Tensor, str | None]:
    """Load one tensor as a CPU ``torch.Tensor`` (dtype kept), safely.

    Returns:
        The tensor and its key inside the file (None for a bare tensor / .npy).
    """
    import torch

    path = Path(path)
    _require_file(path)
    suffix = suffix_of(path)
    if suffix == ".pt" or suffix == ".pth":
        tensors = _torch_load(path)
        members = [(k, tuple(v.shape), _torch_dtype_name(v.dtype)) for k, v in tensors.items()]
        chosen = _choose(path, members, key)
        return tensors[chosen], chosen or None
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        chosen = _choose(path, _safetensors_members(path), key)
        try:
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(chosen), chosen
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: cannot read tensor {chosen!r} ({exc}).",
                             hint="The file may be truncated or corrupt.") from None
    array, chosen_key = load_numpy(path, key)
    return torch.from_numpy(np.ascontiguousarray(array)), chosen_key


def load_numpy(path: Path, key: str | None = None, *, mmap: bool = False) -> tuple[np.ndarray, str | None]:
    """Load a ``.npy``/``.npz`` array with ``allow_pickle=False`` (``mmap`` for .npy)."""
    path = Path(path)
    _require_file(path)
    suffix = suffix_of(path, (".npy", ".npz"))
    if suffix == ".npy":
        _npy_info(path)  # refuses pickles and object arrays with a clear reason
        try:
            return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None), None
        except ValueError as exc:
            if dtype_needs_pickle_message(str(exc)):
                raise _unsafe(path, "it needs pickle") from None
            raise InputError(f"{path}: cannot read ({exc}).", hint="The file may be truncated.") from None
    chosen = _choose(path, _npz_members(path), key)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[chosen], chosen
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if dtype_needs_pickle_message(str(exc)):
            raise _unsafe(path, f"member {chosen!r} needs pickle") from None
        raise InputError(f"{path}: cannot read member {chosen!r} ({exc}).",
                         hint="The archive may be truncated.") from None


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
    suffix = suffix_of(path)
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
    info = peek(path, key)
    suffix = suffix_of(path)
    if suffix == ".npy":
        with path.open("rb") as fh:
            shape, dtype, fortran, offset = _read_npy_header(fh, path)
        raw = RawTensor(path, offset, shape, dtype, fortran_order=fortran and len(shape) > 1)
    elif suffix == ".safetensors":
        header, base = _safetensors_header(path)
        meta = header[info.key or ""]
        tag = meta["dtype"]
        np_dtype, name = _ST_DTYPES.get(tag, (None, tag))
        if tag == "BF16":
            np_dtype = "<u2"
        if np_dtype is None:
            raise InputError(f"{path}: tensor {info.key!r} has dtype {name}, which bncli cannot read.",
                             hint="Convert it to float32 first.")
        raw = RawTensor(path, base + int(meta["data_offsets"][0]), info.shape, np.dtype(np_dtype),
                        bfloat16=tag == "BF16")
    else:
        return None
    size = path.stat().st_size
    if raw.offset + raw.nbytes > size:
        raise InputError(f"{path}: truncated: its header promises {raw.nbytes} bytes of data "
                         f"for shape {raw.shape} {info.dtype}, but the file ends after "
                         f"{max(size - raw.offset, 0)}.",
                         hint="The copy or download was cut short; re-create the file.")
    return raw


def read_rows(raw: RawTensor, fh: BinaryIO, start: int, stop: int) -> np.ndarray:
    """Read rows ``start:stop`` (along axis 0) of a C-order tensor from an open file.

    ``fh`` should be unbuffered (``open(path, "rb", buffering=0)``) so the bytes go
    straight from the page cache into the returned array, without a second copy.
    """
    rows = max(stop - start, 0)
    shape = (rows, *raw.shape[1:]) if raw.shape else ()
    out = np.empty(shape, dtype=raw.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fh.seek(raw.offset + start * raw.row_bytes)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise InputError(f"{raw.path}: ended early while reading rows {start}:{stop}.",
                             hint="The file was truncated or is being rewritten; re-create it.")
        done += n
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
        self._fh: BinaryIO = self.path.open("wb", buffering=0)  # type: ignore[assignment]
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
        data = memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
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
                raise OutputError(f"{self.path}: only {self.written} of {self.nbytes} bytes were written.",
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


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{dotted.key: tensor}`` view of a state_dict or checkpoint (.pt/.safetensors).

    Nested checkpoints (``{"model": state_dict, "epoch": 3}``) flatten to
    ``model.layer1.0.bn1.weight`` style keys.
    """
    path = Path(path)
    _require_file(path)
    suffix = suffix_of(path, STATE_SUFFIXES)
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _safetensors_header(path)
        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: cannot read ({exc}).", hint="The file may be corrupt.") from None
    return _torch_load(path)


# -- writing -------------------------------------------------------------------------------
def default_output(input_path: Path, suffix: str | None = None) -> Path:
    """``data/batch.npy`` -> ``data/batch.bn.npy`` (beside the input, same format)."""
    input_path = Path(input_path)
    return input_path.with_name(f"{input_path.stem}.bn{suffix or input_path.suffix}")


def check_output(dest: Path, *, force: bool, protect: Iterable[Path] = (),
                 allowed: tuple[str, ...] = TENSOR_SUFFIXES) -> None:
    """Refuse to write over an input (ever) or an existing file (unless ``force``)."""
    suffix = dest.suffix.lower()
    if suffix not in allowed:
        raise OutputError(f"{dest}: cannot write {suffix or 'a file without extension'!r}.",
                          hint=f"Give the output one of these extensions: {', '.join(allowed)}.")
    for src in protect:
        if Path(src).exists() and dest.exists() and Path(src).samefile(dest):
            raise OutputError(f"{dest}: is an input file; bncli never overwrites its input.",
                              hint="Choose another output path with -o.")
    if dest.is_dir():
        raise OutputError(f"{dest}: is a directory.", hint="Give a file name with -o.")
    if dest.exists() and not force:
        raise OutputError(f"{dest}: already exists; kept as it is.",
                          hint="Pass --force to replace it, or choose another path with -o.")
    if not dest.parent.is_dir():
        raise OutputError(f"{dest}: folder {dest.parent} does not exist.",
                          hint=f"Create it first (mkdir -p {dest.parent}).")


@contextlib.contextmanager
def atomic_output(dest: Path, *, force: bool, protect: Iterable[Path] = (),
                  allowed: tuple[str, ...] = TENSOR_SUFFIXES) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success rename it over ``dest`` atomically.

    Any exception, Ctrl-C included, removes the temp file, so no partial output can
    appear under the final name.
    """
    dest = Path(dest)
    protect = list(protect)
    check_output(dest, force=force, protect=protect, allowed=allowed)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        # Re-check: the output may have appeared while we were working.
        check_output(dest, force=force, protect=protect, allowed=allowed)
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(dest: Path, writer: Callable[[BinaryIO], None], *, force: bool,
                 protect: Iterable[Path] = (), allowed: tuple[str, ...] = TENSOR_SUFFIXES) -> None:
    """Run ``writer(fileobj)`` into a temp file, fsync it and rename it to ``dest``."""
    with atomic_output(dest, force=force, protect=protect, allowed=allowed) as tmp:
        with tmp.open("wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())


def save_tensor(tensor: torch.Tensor, dest: Path, *, key: str | None = None, force: bool = False,
                protect: Iterable[Path] = ()) -> None:
    """Write one tensor in the format of ``dest``'s extension, dtype kept, atomically.

    Raises:
        OutputError: The output exists (without ``force``), is an input, or the format
            cannot hold the dtype (bfloat16 in .npy/.npz).
    """
    import torch

    dest = Path(dest)
    suffix = dest.suffix.lower()
    tensor = tensor.detach().cpu().contiguous()
    name = key or "output"
    if suffix in (".npy", ".npz") and tensor.dtype == torch.bfloat16:
        raise OutputError(f"{dest}: NumPy has no bfloat16, so {suffix} cannot hold this output.",
                          hint="Write .pt or .safetensors instead (-o out.pt), which keep bfloat16.")
    writer: Callable[[BinaryIO], None]
    if suffix == ".npy":
        def writer(fh: BinaryIO) -> None:
            np.save(fh, tensor.numpy(), allow_pickle=False)
    elif suffix == ".npz":
        def writer(fh: BinaryIO) -> None:
            np.savez(fh, **{name: tensor.numpy()})
    elif suffix == ".safetensors":
        from safetensors.torch import save

        def writer(fh: BinaryIO) -> None:
            fh.write(save({name: tensor}))
    else:
        def writer(fh: BinaryIO) -> None:
            torch.save(tensor if key is None else {key: tensor}, fh)
    write_atomic(dest, writer, force=force, protect=protect)


def save_state_dict(state: Mapping[str, torch.Tensor], dest: Path, *, force: bool = False,
                    protect: Iterable[Path] = ()) -> None:
    """Write a state_dict as ``.pt`` (torch.save) or ``.safetensors``, atomically."""
    import torch

    dest = Path(dest)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if dest.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        def writer(fh: BinaryIO) -> None:
            fh.write(save(dict(state)))
    else:
        def writer(fh: BinaryIO) -> None:
            torch.save(dict(state), fh)
    write_atomic(dest, writer, force=force, protect=protect, allowed=STATE_SUFFIXES)


def parse_vector(spec: str, what: str) -> np.ndarray:
    """``--weight 1,2,3`` or ``--weight w.npy`` -> a float64 vector.

    Raises:
        InputError: Neither a comma list of numbers nor a readable 1D tensor file.
    """
    path = Path(spec)
    if path.suffix.lower() in TENSOR_SUFFIXES:
        if path.suffix.lower() in (".npy", ".npz"):
            array, _ = load_numpy(path)
        else:
            tensor, _ = load_tensor(path)
            array = tensor.double().numpy()
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 1:
            raise InputError(f"--{what} {spec}: expected a 1D vector, got shape {array.shape}.",
                             hint=f"Save one value per channel, e.g. np.save('{what}.npy', np.ones(C)).")
        return array
    try:
        return np.array([float(v) for v in spec.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        raise InputError(f"--{what} {spec!r}: not a comma-separated list of numbers nor a tensor file.",
                         hint=f"Example: --{what} 1.0,0.5,2.0 (one value per channel) "
                              f"or --{what} {what}.npy.") from None
