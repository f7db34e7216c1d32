"""Standard input and output as tensor files: ``-`` as an input, ``-o -`` as the output.

``bncli normalize - -o - --format npy < a.npy > b.npy``. Standard input is read whole
into memory, up to a cap (:func:`stdin_limit`), and its format is told from its first
bytes (:func:`detect_format`); it is then loaded by the same safe loaders as a file
(:class:`bncli.io.source.MemoryFile`): ``.pt`` through ``torch.load(weights_only=True)``
on the bytes, ``.npy``/``.npz`` with ``allow_pickle=False``, nothing ever unpickled.
Output to stdout is serialized in memory first and written in one go, so a failure
before the end writes nothing there.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zipfile
from typing import BinaryIO

from bncli.errors import InputError, OutputError
from bncli.io.source import MemoryFile
from bncli.io.write import Writer

#: How ``-`` is spelled on the command line, for input and output alike.
STDIO = "-"
#: Standard input is buffered in memory up to this many bytes ...
DEFAULT_STDIN_LIMIT = 2 << 30
#: ... or what this environment variable says (a size: 512M, 8G).
STDIN_LIMIT_ENV = "BNCLI_STDIN_LIMIT"
#: ``--format`` names -> file suffixes.
FORMATS = {"npy": ".npy", "npz": ".npz", "pt": ".pt", "safetensors": ".safetensors"}

_READ_BYTES = 1 << 20


def is_stdio(path: object) -> bool:
    """Whether a path argument is ``-`` (standard input or output)."""
    return os.fspath(path) == STDIO if isinstance(path, (str, os.PathLike)) else False


def _size_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} bytes"


def stdin_limit() -> int:
    """The cap on standard input: ``$BNCLI_STDIN_LIMIT`` if set, else :data:`DEFAULT_STDIN_LIMIT`.

    Raises:
        InputError: The variable is not a size.
    """
    value = os.environ.get(STDIN_LIMIT_ENV, "").strip()
    if not value:
        return DEFAULT_STDIN_LIMIT
    from bncli.outofcore import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise InputError(f"{STDIN_LIMIT_ENV}={value!r}: {exc}", hint=f"E.g. {STDIN_LIMIT_ENV}=4G, or unset it "
                         f"for the default ({_size_text(DEFAULT_STDIN_LIMIT)}).") from None


def _could_be_tensor_file(head: bytes) -> bool:
    """Whether bytes starting with ``head`` (at least 9 of them) may be a format bncli reads.

    Only the first bytes are looked at, so that garbage on standard input is refused at
    once instead of after buffering it up to the cap.
    """
    if head.startswith((b"\x93NUMPY", b"PK", b"\x80")):
        return True
    (n,) = struct.unpack("<Q", head[:8])
    return n >= 2 and head[8:9] == b"{"


def _is_exported_model(names: list[str]) -> bool:
    return any(n.split("/", 1)[-1] == "archive_format" for n in names) and \
        any("/models/" in n or n.startswith("models/") for n in names)


def detect_format(data: bytes, name: str = "<stdin>") -> str:
    """The tensor format these bytes hold, from their first bytes: ``.npy`` (``\\x93NUMPY``),
    ``.npz`` or ``.pt`` (a zip; torch.save's holds ``data.pkl``), ``.pt`` (torch's legacy
    format, a pickle: it is loaded with ``weights_only=True``) or ``.safetensors`` (a
    length and a JSON header).

    Raises:
        InputError: None of these (an exported model, ``.pt2``, is named as one: bncli
            reads those from a file only).
    """
    if data.startswith(b"\x93NUMPY"):
        return ".npy"
    if data.startswith(b"PK"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            names = []
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return ".pt"
        if names and all(n.endswith(".npy") for n in names):
            return ".npz"
        if _is_exported_model(names):
            raise InputError(f"{name}: holds an exported model (.pt2, torch.export.save), not a tensor file; "
                             "bncli reads exported models from a file only.",
                             hint="Save it to a file, then audit it with bncli inspect model.pt2 or run it "
                                  "over data with bncli compare model.pt2 --data batch.npy.")
    elif data.startswith(b"\x80"):
        return ".pt"
    elif len(data) >= 10:
        (n,) = struct.unpack("<Q", data[:8])
        if 2 <= n <= len(data) - 8 and data[8:9] == b"{":
            try:
                if isinstance(json.loads(data[8:8 + n]), dict):
                    return ".safetensors"
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
    raise _not_a_tensor_file(data, name)


def _not_a_tensor_file(data: bytes, name: str) -> InputError:
    return InputError(f"{name}: not a tensor file bncli reads (it starts with {data[:8]!r}).",
                      hint="Send a .npy, .npz, .pt or .safetensors file's bytes, e.g. "
                           "bncli normalize - -o out.npy < batch.npy.")


def read_stdin(stream: BinaryIO | None = None, *, limit: int | None = None, name: str = "<stdin>") -> MemoryFile:
    """Standard input, read whole (up to ``limit`` bytes), as a file in memory.

    Raises:
        InputError: stdin is a terminal, empty, larger than the cap, or no tensor file.
    """
    if stream is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("'-' reads a tensor file from standard input, which is a terminal here.",
                             hint="Redirect or pipe a file into it: bncli normalize - -o out.npy < batch.npy.")
        stream = sys.stdin.buffer
    limit = stdin_limit() if limit is None else limit
    parts: list[bytes] = []
    total = 0
    sniffed = False
    while total <= limit:
        chunk = stream.read(min(_READ_BYTES, limit + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        if not sniffed and total >= 9:  # refused now, not after buffering garbage up to the cap
            sniffed = True
            head = b"".join(parts)
            if not _could_be_tensor_file(head):
                raise _not_a_tensor_file(head, name)
    if total > limit:
        raise InputError(f"Standard input holds more than {_size_text(limit)}, the most bncli "
                         "buffers in memory.",
                         hint=f"Pass the file itself (a large .npy is then streamed), or raise the cap, "
                              f"e.g. {STDIN_LIMIT_ENV}=8G.")
    data = b"".join(parts)
    if not data:
        raise InputError("Standard input is empty.",
                         hint="Redirect or pipe a tensor file into it: bncli normalize - -o out.npy < batch.npy.")
    return MemoryFile(data, detect_format(data, name), name)


def check_stdout() -> None:
    """Refuse ``-o -`` before any work when stdout is a terminal (binary data would garble it).

    Raises:
        OutputError: It is.
    """
    if sys.stdout is not None and sys.stdout.isatty():
        raise OutputError("-o - writes binary tensor data to standard output, which is a terminal here.",
                          hint="Redirect it (> out.npy) or pipe it into the next command, or write a file "
                               "with -o FILE.")


def write_stdout(writer: Writer) -> int:
    """Serialize with ``writer`` into memory, then write it all to stdout; returns the bytes written."""
    buffer = io.BytesIO()
    writer(buffer)
    data = buffer.getvalue()
    sys.stdout.flush()  # nothing else goes to stdout with -o -; this keeps any text in order anyway
    out = sys.stdout.buffer
    out.write(data)
    out.flush()
    return len(data)
