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
import json
import os
import pickle
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
    """Yield the tensor as NumPy blocks along axis 0, about ``max_bytes`` each.

    ``.npy`` and ``.safetensors`` are memory-mapped, so peak memory stays bounded by the
    block size whatever the file size; bfloat16 values arrive widened to float32 (exact).
    ``.npz`` and ``.pt`` have no random access and are loaded whole.
    """
    path = Path(path)
    info = peek(path, key)
    suffix = suffix_of(path)
    if suffix == ".npy":
        array: Any = load_numpy(path, mmap=True)[0]
    elif suffix == ".npz":
        array = load_numpy(path, key)[0]
    elif suffix == ".safetensors":
        array = _safetensors_memmap(path, info.key or "")
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
        block = np.asarray(array[start:start + rows])
        if block.dtype == np.uint16 and getattr(array, "_bncli_bf16", False):
            block = (block.astype(np.uint32) << 16).view(np.float32)
        yield block


class _BF16Memmap(np.memmap):
    """A uint16 memmap marked as bfloat16 bits (NumPy has no bfloat16)."""

    _bncli_bf16 = True


def _safetensors_memmap(path: Path, key: str) -> np.ndarray:
    header, base = _safetensors_header(path)
    meta = header[key]
    tag = meta["dtype"]
    np_dtype, name = _ST_DTYPES.get(tag, (None, tag))
    shape = tuple(int(s) for s in meta["shape"])
    start, end = (int(v) for v in meta["data_offsets"])
    if tag == "BF16":
        arr = np.memmap(path, dtype="<u2", mode="r", offset=base + start, shape=shape)
        return arr.view(_BF16Memmap)
    if np_dtype is None:
        raise InputError(f"{path}: tensor {key!r} has dtype {name}, which bncli cannot read.",
                         hint="Convert it to float32 first.")
    if end == start:
        return np.zeros(shape, dtype=np_dtype)
    return np.memmap(path, dtype=np_dtype, mode="r", offset=base + start, shape=shape)


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
