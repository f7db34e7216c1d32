"""Whole files: every tensor of an input, and writing it back with some tensors replaced.

``normalize multi.pt --key images`` replaces ``images`` and writes every other tensor
through unchanged: same keys, dtypes and order, bit for bit. What each output format can
hold decides what is kept:

* the input's own format: everything (a ``.pt`` keeps its whole object, non-tensor
  entries such as ``{"epoch": 3}`` included; a ``.safetensors`` keeps its metadata);
* another container format (``.npz``, ``.safetensors``, ``.pt``): every tensor, under
  its flat key (nested ``.pt`` keys become ``a.b.c``), and no non-tensor entries;
* ``.npy``: one array, the normalized one.

:func:`plan_output` says what will be kept and dropped (and refuses what cannot be
written) before any work; :func:`container_writer` writes it. Loading follows the rules
of :mod:`bncli.io.formats` (nothing unpickled).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from bncli.errors import InputError, KeyChoiceError, OutputError
from bncli.io.formats import (
    TORCH_SUFFIXES,
    _safetensors_header,
    choose_key,
    load_npz,
    load_numpy,
    require_file,
    suffix_of,
    torch_tree,
)
from bncli.io.source import MemoryFile, Source, as_source
from bncli.io.write import Writer, write_npz_members

if TYPE_CHECKING:
    import torch

#: The name a bare tensor gets inside a container output (as ``tensor_writer`` names it).
BARE_NAME = "output"


@dataclass
class Container:
    """Every tensor of one input file, in file order, and what else it holds.

    Attributes:
        source: The file (or bytes from standard input).
        suffix: Its format: ``.npy``, ``.npz``, ``.pt``/``.pth``/``.ckpt`` or ``.safetensors``.
        tensors: The tensors under flat keys (``""`` for a bare tensor).
        tree: For ``.pt``: the object ``torch.load`` returned, written back as it is.
        metadata: For ``.safetensors``: its ``__metadata__``.
        others: For ``.pt``: the dotted keys of non-tensor entries (``epoch``).
    """

    source: Source
    suffix: str
    tensors: dict[str, torch.Tensor]
    tree: Any = None
    metadata: dict[str, str] | None = None
    others: list[str] = field(default_factory=list)

    @property
    def members(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(key, shape, dtype) of every tensor, for listings."""
        return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in self.tensors.items()]

    @property
    def is_torch(self) -> bool:
        return self.suffix in TORCH_SUFFIXES

    def choose(self, keys: Sequence[str | None]) -> list[str]:
        """The keys to normalize, checked: ``[None]`` means the only tensor.

        A ``.npy`` holds one array, taken whatever one ``--key`` says (as ``stats`` does
        for a folder of mixed shards).

        Raises:
            KeyChoiceError: No such key, several tensors and no key, a key named twice,
                or several keys for a ``.npy``.
        """
        if self.suffix == ".npy":
            if len(keys) > 1:
                raise KeyChoiceError(f"{self.source}: a .npy file holds one array; "
                                     f"{len(keys)} --key options do not apply.", hint="Drop --key.")
            return [""]
        chosen = [choose_key(self.source, self.members, k) for k in keys]
        twice = next((k for i, k in enumerate(chosen) if k in chosen[:i]), None)
        if twice is not None:
            raise KeyChoiceError(f"--key {twice!r} is given twice.", hint="Name each tensor once.")
        return chosen


def load_container(src: Source | str) -> Container:
    """Every tensor of a file, safely (see :mod:`bncli.io.formats`).

    Raises:
        InputError, UnsafeFileError: As the loaders do.
    """
    import torch

    src = as_source(src)
    require_file(src)
    suffix = suffix_of(src)
    if suffix == ".npy":
        array, _ = load_numpy(src)
        return Container(src, suffix, {"": torch.from_numpy(np.ascontiguousarray(array))})
    if suffix == ".npz":
        return Container(src, suffix, {n: torch.from_numpy(np.ascontiguousarray(a))
                                       for n, a in load_npz(src).items()})
    if suffix == ".safetensors":
        return _load_safetensors(src)
    tree = torch_tree(src)
    tensors: dict[str, torch.Tensor] = {}
    others: list[str] = []
    _walk(tree, "", tensors, others)
    return Container(src, suffix, tensors, tree=tree, others=others)


def _load_safetensors(src: Source) -> Container:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    header, _ = _safetensors_header(src, keep_metadata=True)
    metadata = header.pop("__metadata__", None)
    try:
        loaded = load(src.data) if isinstance(src, MemoryFile) else load_file(str(src))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{src}: cannot read ({exc}).", hint="The file may be truncated or corrupt.") from None
    # The header's order is the file's (safetensors' own: by dtype, then name).
    tensors = {k: loaded[k] for k in header if k in loaded}
    return Container(src, ".safetensors", tensors, metadata=metadata if isinstance(metadata, dict) else None)


def _walk(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], others: list[str]) -> None:
    """Tensors and other leaves of a torch.load tree under dotted keys (as formats._flatten)."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _walk(v, f"{prefix}.{k}" if prefix else str(k), tensors, others)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}.{i}" if prefix else str(i), tensors, others)
    else:
        others.append(prefix)


def _replace(obj: Any, prefix: str, replaced: Mapping[str, torch.Tensor]) -> Any:
    """The tree with the tensors at ``replaced``'s keys swapped in; dicts and lists in place
    (their type and attributes, such as a state_dict's ``_metadata``, stay), tuples rebuilt."""
    import torch

    if isinstance(obj, torch.Tensor):
        return replaced.get(prefix, obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _replace(v, f"{prefix}.{k}" if prefix else str(k), replaced)
        return obj
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = _replace(v, f"{prefix}.{i}" if prefix else str(i), replaced)
        return obj
    if isinstance(obj, tuple):
        return type(obj)(_replace(v, f"{prefix}.{i}" if prefix else str(i), replaced) for i, v in enumerate(obj))
    return obj


@dataclass(frozen=True)
class OutputPlan:
    """What an output will hold besides the normalized tensors.

    Attributes:
        passed_through: Tensors written unchanged (flat keys, in order).
        dropped: Tensors and non-tensor entries the output format cannot hold.
        reason: Why they are dropped (for a note), ``""`` when nothing is.
    """

    passed_through: list[str]
    dropped: list[str]
    reason: str = ""


def _format(dest_suffix: str) -> str:
    return ".pt" if dest_suffix in TORCH_SUFFIXES else dest_suffix


def plan_output(c: Container, keys: Sequence[str], dest_suffix: str, dest: str) -> OutputPlan:
    """What writing ``c`` with ``keys`` replaced into a ``dest_suffix`` file keeps and drops.

    Raises:
        OutputError: Several normalized tensors into a ``.npy``, or bfloat16 tensors into
            ``.npy``/``.npz`` (NumPy has no bfloat16).
    """
    import torch

    fmt = _format(dest_suffix)
    rest = [k for k in c.tensors if k not in keys]
    if fmt == ".npy":
        if len(keys) > 1:
            raise OutputError(f"{dest}: a .npy file holds one array, and {len(keys)} tensors are normalized.",
                              hint="Write a container (.npz, .pt or .safetensors), or pass one --key.")
        written = list(keys)
        plan = OutputPlan([], rest + c.others, "a .npy file holds one array")
    elif fmt == ".pt" and c.is_torch:
        written, plan = list(c.tensors), OutputPlan(rest, [])
    else:
        written = list(c.tensors)
        plan = OutputPlan(rest, list(c.others), f"{dest_suffix} holds tensors only")
    if fmt in (".npy", ".npz"):
        bf16 = [k or BARE_NAME for k in written if c.tensors[k].dtype == torch.bfloat16]
        if bf16:
            raise OutputError(f"{dest}: NumPy has no bfloat16, so {fmt} cannot hold "
                              f"{', '.join(repr(k) for k in bf16[:3])} (bfloat16).",
                              hint="Write .pt or .safetensors instead (-o out.pt), which keep bfloat16.")
    return plan


def container_writer(c: Container, replaced: Mapping[str, torch.Tensor], dest_suffix: str) -> Writer:
    """A writer of ``c`` with ``replaced`` swapped in, in the ``dest_suffix`` format (see the
    module docstring; :func:`plan_output` first)."""
    import torch

    fmt = _format(dest_suffix)
    if fmt == ".npy":
        (tensor,) = replaced.values()
        array = tensor.detach().cpu().contiguous().numpy()

        def write_npy(fh: BinaryIO) -> None:
            np.save(fh, array, allow_pickle=False)
        return write_npy
    if fmt == ".pt" and c.is_torch:
        tree = _replace(c.tree, "", replaced)

        def write_tree(fh: BinaryIO) -> None:
            torch.save(tree, fh)
        return write_tree
    flat = {(k or BARE_NAME): replaced.get(k, v).detach().cpu() for k, v in c.tensors.items()}
    if fmt == ".pt":
        # A bare tensor stays bare, as tensor_writer writes it.
        obj: Any = flat[BARE_NAME] if list(c.tensors) == [""] else flat

        def write_pt(fh: BinaryIO) -> None:
            torch.save(obj, fh)
        return write_pt
    if fmt == ".npz":
        def write_npz(fh: BinaryIO) -> None:
            write_npz_members(fh, {k: v.contiguous().numpy() for k, v in flat.items()})
        return write_npz
    from safetensors.torch import save

    # Tensors of a .pt may share storage (tied weights), which safetensors refuses: copy them.
    plain = {k: v.contiguous().clone() if c.is_torch else v.contiguous() for k, v in flat.items()}
    metadata = c.metadata if c.suffix == ".safetensors" else None

    def write_st(fh: BinaryIO) -> None:
        fh.write(save(plain, metadata=metadata))
    return write_st
