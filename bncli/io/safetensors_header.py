"""The ``.safetensors`` header, read and validated by bncli itself (no torch, no data read).

``check-shape`` and ``stats`` work from this header alone, and ``stats`` reads a tensor's
bytes at the offsets it gives, so it is checked as strictly as the ``safetensors`` library
checks it before ``normalize`` loads the file: a JSON object of tensors, each with a known
dtype, a shape of non-negative sizes, and a byte range inside the data section whose
length is exactly what the shape and dtype need.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from bncli.errors import InputError
from bncli.io.source import Source, source_size

# safetensors dtype tag -> (numpy dtype or None, bncli dtype name)
ST_DTYPES: dict[str, tuple[str | None, str]] = {
    "F64": ("<f8", "float64"), "F32": ("<f4", "float32"), "F16": ("<f2", "float16"),
    "BF16": (None, "bfloat16"), "I64": ("<i8", "int64"), "I32": ("<i4", "int32"),
    "I16": ("<i2", "int16"), "I8": ("i1", "int8"), "U8": ("u1", "uint8"),
    "U16": ("<u2", "uint16"), "U32": ("<u4", "uint32"), "U64": ("<u8", "uint64"),
    "BOOL": ("?", "bool"), "F8_E4M3": (None, "float8_e4m3fn"), "F8_E5M2": (None, "float8_e5m2"),
}

# Bits per element of every dtype tag the safetensors format defines.
_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
         "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
         "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

_MAX_HEADER = 100_000_000


def _bad(path: Source, why: str) -> InputError:
    return InputError(f"{path}: not a valid .safetensors file: {why}.",
                      hint="The file may be truncated or corrupt, or not a .safetensors file; re-create it.")


def _check_member(path: Source, key: str, meta: Any, data_bytes: int) -> None:
    if not isinstance(meta, dict):
        raise _bad(path, f"tensor {key!r} is described by {type(meta).__name__}, not an object")
    tag, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(tag, str) or tag not in _BITS:
        raise _bad(path, f"tensor {key!r} has the unknown dtype {tag!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise _bad(path, f"tensor {key!r} has shape {shape!r}, not a list of sizes >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise _bad(path, f"tensor {key!r} has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes:
        raise _bad(path, f"tensor {key!r} lies at bytes {begin}..{end} of a {data_bytes}-byte data section")
    need = math.ceil(math.prod(shape) * _BITS[tag] / 8)
    if end - begin != need:
        raise _bad(path, f"tensor {key!r} has {end - begin} bytes, but shape {shape} of {tag} needs {need}")


def read_header(path: Source, *, keep_metadata: bool = False) -> tuple[dict[str, Any], int]:
    """The tensors' header entries (in file order) and the data section's offset.

    ``__metadata__`` is dropped unless ``keep_metadata``.

    Raises:
        InputError: Too short, a header length beyond the file, not JSON, or an entry
            that does not describe a tensor inside the file (see the module docs).
    """
    size = source_size(path)
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: too short to be a .safetensors file.", hint="Check the file.")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise InputError(f"{path}: not a valid .safetensors file (header length {n}).",
                             hint="Check the file and its extension.")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path}: not a valid .safetensors file (bad JSON header).",
                             hint="Check the file and its extension.") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    for key, meta in header.items():
        _check_member(path, key, meta, size - 8 - n)
    if keep_metadata and metadata is not None:
        header["__metadata__"] = metadata
    return header, 8 + n


def members(path: Source) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, bncli dtype name) of every tensor, from the validated header."""
    header, _ = read_header(path)
    return [(key, tuple(meta["shape"]), ST_DTYPES.get(meta["dtype"], (None, meta["dtype"].lower()))[1])
            for key, meta in header.items()]
