"""Where tensors are read from: a file, or a file's bytes held in memory (standard input)."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, TypeAlias


@dataclass(frozen=True, eq=False)
class MemoryFile:
    """A tensor file's bytes held in memory (standard input, ``-``), read like a file.

    The loaders take it wherever they take a path, with the same safety rules; messages
    name it by :attr:`name`.

    Attributes:
        data: The bytes.
        suffix: The format they hold (``.npy``, ``.npz``, ``.pt``, ``.safetensors``), as
            detected from the content (:func:`bncli.io.stdio.detect_format`).
        name: How messages name it.
    """

    data: bytes
    suffix: str
    name: str = "<stdin>"

    def __str__(self) -> str:
        return self.name

    def open(self, mode: str = "rb") -> BytesIO:
        return BytesIO(self.data)


#: Where tensors are read from: a file, or bytes in memory.
Source: TypeAlias = Path | MemoryFile


def source_size(src: Source) -> int:
    """Bytes of the file, or of the bytes in memory."""
    return len(src.data) if isinstance(src, MemoryFile) else src.stat().st_size


def load_target(src: Source) -> Any:
    """What np.load/torch.load/zipfile open: the path, or a fresh stream over the bytes."""
    return src.open() if isinstance(src, MemoryFile) else src


def as_source(path: Source | str) -> Source:
    """A path argument as a :data:`Source` (a str becomes a Path; bytes in memory stay)."""
    return path if isinstance(path, MemoryFile) else Path(path)
