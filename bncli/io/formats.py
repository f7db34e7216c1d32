"""Reading: format detection, header peeks and safe loading of .npy/.npz/.pt/.safetensors.

Nothing here ever unpickles (see :mod:`bncli.io`). torch is imported lazily, only for
``.pt`` files and for returning torch tensors.
"""

from __future__ import annotations

import pickle
import re
import tokenize
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from bncli.errors import InputError, KeyChoiceError, UnsafeFileError
from bncli.io.oserrors import input_error
from bncli.io.safetensors_header import members as _safetensors_members
from bncli.io.safetensors_header import read_header as _safetensors_header
from bncli.io.source import MemoryFile, Source, as_source, load_target

if TYPE_CHECKING:
    import torch

# torch.save files: .pt/.pth, and Lightning's .ckpt (a torch.save of a dict holding
# "state_dict"). Read only: bncli writes .pt/.pth, never a .ckpt Lightning could not load.
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
TENSOR_SUFFIXES = (".npy", ".npz", *TORCH_SUFFIXES, ".safetensors")
STATE_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
OUTPUT_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
STATE_OUTPUT_SUFFIXES = (".pt", ".pth", ".safetensors")

# Keys under which checkpoints nest a model's state_dict ({"model": ...}, {"state_dict": ...},
# the tutorials' {"model_state_dict": ...}; Lightning's state_dict keys start with the
# LightningModule's attribute, most often "model"), and the attributes wrappers insert
# into every key: DataParallel/DDP "module", torch.compile "_orig_mod".
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "_orig_mod")
WRAPPER_ATTRS = ("module", "_orig_mod")

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


def suffix_of(path: Source, allowed: tuple[str, ...] = TENSOR_SUFFIXES) -> str:
    """The lower-case format suffix, or an InputError naming the supported ones."""
    suffix = path.suffix.lower()
    if suffix == ".pt2" and suffix not in allowed:
        # A whole exported model where a tensor is expected: say which commands take it.
        raise InputError(
            f"{path}: is an exported model (.pt2, torch.export.save), not a tensor file.",
            hint=f"Audit its BatchNorm layers with bncli inspect {path}, or run it over data with "
                 f"bncli compare {path} --data X.npy; tensor files are {', '.join(allowed)}.",
        )
    if suffix not in allowed:
        raise InputError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}.",
            hint=f"bncli reads {', '.join(allowed)} files.",
        )
    return suffix


def require_file(path: Source) -> None:
    """An existing, readable file, or the InputError that says which of these it is not.

    Opening it here, once, means a file this user may not read (or in a folder it may not
    search) is reported as such, whatever loader would have opened it next. Bytes in
    memory are always there.
    """
    if isinstance(path, MemoryFile):
        return
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file.", hint="Check the path (and the current directory).")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, not a tensor file.", hint="Pass a file inside it.")
        with path.open("rb"):
            pass
    except OSError as exc:
        raise input_error(path, exc) from None


def _unsafe(path: Source, why: str) -> UnsafeFileError:
    hint = ("Re-save the data as plain tensors (np.save of a numeric array, "
            "torch.save(tensor or state_dict), or .safetensors) from a trusted environment.")
    if path.suffix.lower() == ".ckpt":
        # Lightning checkpoints fail this way when hyper_parameters hold Python objects.
        hint = ("In a trusted environment, keep only the weights: torch.save(torch.load(CKPT, "
                "weights_only=False)['state_dict'], 'weights.pt'), then pass weights.pt.")
    return UnsafeFileError(
        f"{path}: refused to load: {why}. Loading it would need pickle, which can run "
        "arbitrary code, so bncli does not.", hint=hint)


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


# -- .npy / .npz headers -------------------------------------------------------------------
def _read_npy_header(fh: BinaryIO, path: Source) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of an open .npy stream."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, SyntaxError, tokenize.TokenError) as exc:  # numpy tokenizes the header
        if dtype_needs_pickle_message(str(exc)):
            raise _unsafe(path, "its array holds Python objects") from None
        raise InputError(f"{path}: not a valid .npy file ({exc}).",
                         hint="Was it written with numpy.save?") from None
    return tuple(int(s) for s in shape), dtype, bool(fortran), fh.tell()


def dtype_needs_pickle_message(text: str) -> bool:
    return "allow_pickle" in text or "pickle" in text.lower()


def _npy_info(path: Source) -> TensorInfo:
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
    return TensorInfo(Path(str(path)), None, shape, dtype.name, [("", shape, dtype.name)])


def _npz_members(path: Source) -> list[tuple[str, tuple[int, ...], str]]:
    try:
        zf = zipfile.ZipFile(load_target(path))
    except zipfile.BadZipFile:
        with path.open("rb") as fh:
            if fh.read(1) == b"\x80":
                raise _unsafe(path, "it is a Python pickle, not an .npz archive") from None
        raise InputError(f"{path}: not a valid .npz (zip) archive.",
                         hint="Was it written with numpy.savez?") from None
    except UnicodeDecodeError:  # a member name flagged UTF-8 that is not
        raise InputError(f"{path}: not a valid .npz (zip) archive: the archive is corrupt (a member "
                         "name is not valid UTF-8).",
                         hint="The copy or download may be damaged; re-create the file.") from None
    members = []
    try:
        with zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    shape, dtype, _, _ = _read_npy_header(fh, path)  # type: ignore[arg-type]
                if dtype.hasobject:
                    raise _unsafe(path, f"member {name[:-4]!r} holds Python objects (dtype=object)")
                members.append((name[:-4], shape, dtype.name))
    except (zipfile.BadZipFile, EOFError) as exc:  # a small member is read whole: its CRC is checked
        raise InputError(f"{path}: not a valid .npz (zip) archive: the archive is corrupt ({exc}).",
                         hint="The copy or download may be damaged; re-create the file.") from None
    return members


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


def split_container(prefix: str) -> tuple[str, str]:
    """Split a flat key prefix into its leading container keys and the rest.

    Example:
        ``split_container("state_dict.model.features.1") == ("state_dict.model", "features.1")``
    """
    parts = prefix.split(".") if prefix else []
    i = 0
    while i < len(parts) and parts[i] in CONTAINER_KEYS:
        i += 1
    return ".".join(parts[:i]), ".".join(parts[i:])


def layer_name(prefix: str) -> str:
    """A layer's name as the model spells it: container keys and wrapper attributes removed.

    ``state_dict.model.features.1``, ``module.features.1`` and ``features._orig_mod.1``
    all name ``features.1``; :func:`bncli.audit.find_layer` matches ``--prefix`` this way.
    """
    _, rest = split_container(prefix)
    return ".".join(p for p in rest.split(".") if p and p not in WRAPPER_ATTRS)


def _not_a_pickle(detail: str) -> bool:
    """Whether torch's weights-only unpickler stopped at a byte that is no pickle opcode at all.

    It says ``Unsupported operand N`` both for real opcodes it refuses (``INST``, ``OBJ``:
    an unsafe pickle) and for bytes no pickler writes (random data, a corrupt file).
    """
    import pickletools

    m = re.search(r"Unsupported operand (\d+)", detail)
    if m is None or int(m.group(1)) > 255:
        return False
    return chr(int(m.group(1))) not in {op.code for op in pickletools.opcodes}


def _torch_load(path: Source) -> dict[str, torch.Tensor]:
    """Every tensor of a .pt file under dotted keys ('' for a bare tensor)."""
    out: dict[str, torch.Tensor] = {}
    _flatten(torch_tree(path), "", out)
    return out


def _densified(obj: Any) -> Any:
    """``obj`` with every sparse tensor replaced by its dense values, containers kept.

    weights_only loads sparse tensors too; every consumer (BatchNorm2d, NumPy, the audit,
    a container written back) needs the dense values, which are exactly what the file stores.
    """
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to_dense() if obj.layout != torch.strided else obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _densified(v)
    elif isinstance(obj, list):
        obj[:] = [_densified(v) for v in obj]
    elif isinstance(obj, tuple):
        return type(obj)(_densified(v) for v in obj) if type(obj) is tuple else obj
    return obj


def torch_tree(path: Source) -> Any:
    """The object a .pt file holds (tensors in dicts, lists ...), loaded with ``weights_only=True``.

    Raises:
        UnsafeFileError: It needs a full unpickle. InputError: It is no torch.save file.
    """
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it does not expect; the refusal below says it all.
            warnings.simplefilter("ignore", UserWarning)
            return _densified(torch.load(load_target(path), map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "Unsupported" in ln or "GLOBAL" in ln), "")
        if _not_a_pickle(detail):
            raise InputError(f"{path}: cannot read this .pt file: it is neither a torch.save zip "
                             f"archive nor a pickle ({detail}).",
                             hint="Is it a file written by torch.save? It may be corrupt or truncated, "
                                  "or have the wrong extension.") from None
        why = "it contains Python objects that only a full (unsafe) unpickle can rebuild"
        raise _unsafe(path, why + (f" [{detail}]" if detail else "")) from None
    except MemoryError:
        raise  # reported as such by the CLI, not as a bad file
    except Exception as exc:  # a parser of untrusted bytes: any failure means a bad file
        detail = (str(exc).strip().splitlines() or ["the file ends early" if isinstance(exc, EOFError)
                                                     else type(exc).__name__])[0][:200]
        raise InputError(f"{path}: cannot read this .pt file ({detail}).",
                         hint="Is it a file written by torch.save? It may be truncated.") from None


# -- public API ----------------------------------------------------------------------------
def choose_key(path: Source, members: list[tuple[str, tuple[int, ...], str]], key: str | None) -> str:
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


def peek(path: Source, key: str | None = None) -> TensorInfo:
    """Shape and dtype of the tensor a file holds, reading only headers where possible.

    ``.npy``, ``.npz`` and ``.safetensors`` are read without torch and without their
    data; ``.pt`` has no header, so it is loaded (safely) with torch.

    Raises:
        InputError, UnsafeFileError, KeyChoiceError: see the messages.
    """
    path = as_source(path)
    require_file(path)
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
    chosen = choose_key(path, members, key)
    _, shape, dtype = next(m for m in members if m[0] == chosen)
    return TensorInfo(Path(str(path)), chosen or None, shape, dtype, members)


def load_tensor(path: Source, key: str | None = None) -> tuple[torch.Tensor, str | None]:
    """Load one tensor as a CPU ``torch.Tensor`` (dtype kept), safely.

    Returns:
        The tensor and its key inside the file (None for a bare tensor / .npy).
    """
    import torch

    path = as_source(path)
    require_file(path)
    suffix = suffix_of(path)
    if suffix in TORCH_SUFFIXES:
        tensors = _torch_load(path)
        members = [(k, tuple(v.shape), _torch_dtype_name(v.dtype)) for k, v in tensors.items()]
        chosen = choose_key(path, members, key)
        return tensors[chosen], chosen or None
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        chosen = choose_key(path, _safetensors_members(path), key)
        try:
            if isinstance(path, MemoryFile):
                from safetensors.torch import load

                return load(path.data)[chosen], chosen
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(chosen), chosen
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{path}: cannot read tensor {chosen!r} ({exc}).",
                             hint="The file may be truncated or corrupt.") from None
    array, chosen_key = load_numpy(path, key)
    return torch.from_numpy(np.ascontiguousarray(array)), chosen_key


def _native(array: np.ndarray) -> np.ndarray:
    """The array in native byte order: torch.from_numpy refuses big-endian ('>f4') data."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def load_numpy(path: Source, key: str | None = None, *, mmap: bool = False) -> tuple[np.ndarray, str | None]:
    """Load a ``.npy``/``.npz`` array with ``allow_pickle=False`` (``mmap`` for a .npy file).

    Loaded arrays come in native byte order; a memory map keeps the file's.
    """
    path = as_source(path)
    mmap = mmap and not isinstance(path, MemoryFile)
    require_file(path)
    suffix = suffix_of(path, (".npy", ".npz"))
    if suffix == ".npy":
        _npy_info(path)  # refuses pickles and object arrays with a clear reason
        try:
            array = np.load(load_target(path), allow_pickle=False, mmap_mode="r" if mmap else None)
        except ValueError as exc:
            if dtype_needs_pickle_message(str(exc)):
                raise _unsafe(path, "it needs pickle") from None
            raise InputError(f"{path}: cannot read ({exc}).", hint="The file may be truncated.") from None
        return (array if mmap else _native(array)), None
    chosen = choose_key(path, _npz_members(path), key)
    return load_npz(path, [chosen])[chosen], chosen


def load_npz(path: Source, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Members of an ``.npz`` (all, in archive order, by default) with ``allow_pickle=False``."""
    if names is None:
        names = [m[0] for m in _npz_members(path)]  # refuses object members with the reason
    name = ""
    try:
        with np.load(load_target(path), allow_pickle=False) as npz:
            out = {}
            for name in names:
                out[name] = _native(npz[name])
            return out
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        if dtype_needs_pickle_message(str(exc)):
            raise _unsafe(path, f"member {name!r} needs pickle") from None
        raise InputError(f"{path}: cannot read member {name!r} ({exc}).",
                         hint="The archive may be truncated.") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{dotted.key: tensor}`` view of a state_dict or checkpoint.

    Reads ``.pt``/``.pth``, Lightning ``.ckpt`` and ``.safetensors``. Nested checkpoints
    (``{"model": state_dict, "epoch": 3}``, Lightning's ``{"state_dict": {"model.x": ...},
    ...}``) flatten to ``model.layer1.0.bn1.weight`` style keys; non-tensor values (epoch,
    hyper-parameters) are dropped. Keys are kept as stored: :func:`layer_name` gives the
    name without containers and wrappers (``module.``, ``_orig_mod.``).
    """
    path = Path(path)
    require_file(path)
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
