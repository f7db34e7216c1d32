"""A safe reader (and an atomic writer) for ``torch.export`` archives (``.pt2``).

``torch.export.load`` runs code from the file it loads (torch 2.13): sample inputs are
retried with ``torch.load(weights_only=False)``; ``use_pickle`` weights and constants are
unpickled; a graph's ``expr_str`` reaches ``sympy.sympify`` (an ``eval``); ``guards_code``
is ``exec``'d by ``ExportedProgram.module()``; names are pasted into the source torch.fx
generates and runs; an ``aotinductor`` folder is loaded as a shared library. bncli never
calls it on a user's file. Instead :func:`load_program`:

1. opens the zip itself and accepts only the members ``torch.export.save`` writes for one
   program (no compiled code, no pickles, no legacy formats), uncompressed, within the file;
2. validates the program and payload JSON with :mod:`bncli.io.pt2_schema` (aten-only
   targets, identifier names, a small grammar for symbolic expressions, no guards_code,
   no custom objects) and keeps only what it checked;
3. never reads ``data/sample_inputs/`` (a pickle);
4. builds every weight and constant from raw bytes: dtype, shape, strides and offset from
   the JSON, checked against the member's size;
5. hands the validated program to torch's own deserializer
   (``torch._export.serde.serialize.ExportedProgramDeserializer``, a private API, pinned by
   ``constraints.txt`` to torch 2.13 and tested there) with the tensors built in step 4
   and no sample inputs, so that nothing of the file reaches pickle, eval or exec.

A refusal raises :class:`~bncli.errors.UnsafeFileError`; it is never retried another way.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from bncli.errors import InputError, UnsafeFileError
from bncli.io import pt2_schema as schema
from bncli.io.formats import require_file
from bncli.io.oserrors import input_error
from bncli.io.write import AtomicGroup

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

PT2_SUFFIXES = (".pt2",)
MODEL = "model"
_SKIPPED = ("data/sample_inputs/", "extra/")
_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
          f"models/{MODEL}.json", f"data/weights/{MODEL}_weights_config.json",
          f"data/constants/{MODEL}_constants_config.json"}
_DANGEROUS = {
    "data/aotinductor/": "compiled AOTInductor code, which torch.export.load loads as a shared library",
    "data/executorch/": "an ExecuTorch program",
    "data/mtia": "MTIA device code",
    "xl_model_weights/": "externally stored weights loaded with torch.load",
    "data/constants/custom_obj_": "a TorchScript object, which only pickle can rebuild",
    "data/constants/opaque_obj_": "an opaque Python object, which torch.export.load unpickles",
}
_HINT = ("Re-export the model from a trusted environment with torch.export.export (plain aten "
         "ops, no custom objects; ep._guards_code = [] if it has guards) and save it with "
         "torch.export.save; or load it yourself with torch.export.load if you trust its source.")


@dataclass
class Pt2Contents:
    """What :func:`read_archive` found, validated, before torch builds anything.

    Attributes:
        path: The archive.
        program: The validated, rebuilt ``models/model.json``.
        state_dict: Parameters and persistent buffers, built from raw bytes.
        constants: Tensor constants and non-persistent buffers, built from raw bytes.
        skipped: Members that were present but never read (sample inputs, extra files).
    """

    path: Path
    program: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]
    skipped: list[str]


def _unsafe(path: Path, why: str) -> UnsafeFileError:
    return UnsafeFileError(f"{path}: refused to load: {why}. bncli never runs code from a model file.",
                           hint=_HINT)


def _bad(path: Path, why: str) -> InputError:
    return InputError(f"{path}: not a torch.export archive bncli can read: {why}.",
                      hint="Save the model with torch.export.save(ep, 'model.pt2') (torch 2.13).")


def _members(path: Path, zf: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The archive's root folder and its members under relative names, structure checked."""
    size = path.stat().st_size
    infos = zf.infolist()
    if not infos:
        raise _bad(path, "the archive is empty")
    root = infos[0].filename.split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        head, _, rel = info.filename.partition("/")
        if head != root or not rel or "\\" in rel or ".." in rel.split("/"):
            if info.filename.endswith((".pt", ".pkl")) or "serialized_" in info.filename:
                raise _unsafe(path, f"it is an old torch.export zip (member {info.filename!r} "
                                    "is a pickle that torch.export.load would retry unsafely)")
            raise _bad(path, f"member {info.filename!r} lies outside the archive folder {root!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _bad(path, f"member {rel!r} is compressed (torch.export.save stores members uncompressed)")
        if info.file_size > size or info.header_offset + info.file_size > size:
            raise _bad(path, f"member {rel!r} claims {info.file_size} bytes, beyond the file's {size}")
        members[rel] = info
    for rel in members:
        for prefix, why in _DANGEROUS.items():
            if rel.startswith(prefix):
                raise _unsafe(path, f"member {rel!r} is {why}")
        if rel in (f"data/weights/{MODEL}.pt", f"data/constants/{MODEL}.pt"):
            raise _unsafe(path, f"member {rel!r} is a legacy pickled payload, which torch.export.load "
                                "unpickles with torch.load(weights_only=False)")
        if rel.startswith("models/") and rel != f"models/{MODEL}.json":
            raise _bad(path, f"it holds several programs ({rel!r}); bncli reads archives with one "
                             f"program named {MODEL!r}, as torch.export.save writes")
    return root, members


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytearray:
    buf = bytearray(info.file_size)
    with zf.open(info) as fh:  # checks the CRC when it reaches the end
        got = fh.readinto(buf)  # type: ignore[attr-defined]
        if got != info.file_size or fh.read(1):
            raise zipfile.BadZipFile(f"member {info.filename} is truncated")
    return buf


def _json(path: Path, zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], rel: str,
          limit: int = 256 << 20) -> Any:
    info = members.get(rel)
    if info is None:
        raise _bad(path, f"member {rel!r} is missing")
    if info.file_size > limit:
        raise _bad(path, f"member {rel!r} is {info.file_size} bytes, more than a program needs")
    try:
        return json.loads(bytes(_read(zf, info)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(path, f"member {rel!r} is not valid JSON") from None


def _tensors(path: Path, zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], kind: str,
             config: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Tensors from raw bytes, one storage per payload file (so aliases stay aliases)."""
    import torch

    from bncli.io.formats import _torch_dtype_name

    dtypes = {code: getattr(torch, name) for code, name in schema.SCALAR_TYPES.items()}
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, entry in config.items():
        meta = entry["tensor_meta"]
        dtype = dtypes[meta["dtype"]]
        rel = f"data/{kind}/{entry['path_name']}"
        info = members.get(rel)
        if info is None:
            raise _bad(path, f"{key!r} refers to member {rel!r}, which is missing")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if info.file_size % itemsize:
            raise _bad(path, f"member {rel!r} has {info.file_size} bytes, not a whole number of "
                             f"{_torch_dtype_name(dtype)} values ({itemsize} bytes each)")
        sizes = [s["as_int"] for s in meta["sizes"]]
        strides = [s["as_int"] for s in meta["strides"]]
        offset = meta["storage_offset"]["as_int"]
        numel = 1
        for s in sizes:
            numel *= s
        needed = 0 if numel == 0 else offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True))
        if needed * itemsize > info.file_size:
            raise _bad(path, f"{key!r} (shape {tuple(sizes)}, strides {tuple(strides)}, offset {offset}, "
                             f"{_torch_dtype_name(dtype)}) needs {needed * itemsize} bytes, but member "
                             f"{rel!r} has {info.file_size}")
        if rel not in storages:
            raw = _read(zf, info)
            storages[rel] = (torch.frombuffer(raw, dtype=dtype) if raw
                             else torch.empty(0, dtype=dtype))
        base = storages[rel]
        if base.dtype != dtype:
            raise _bad(path, f"member {rel!r} is shared by tensors of different dtypes")
        tensor = torch.as_strided(base, sizes, strides, offset) if numel else torch.empty(sizes, dtype=dtype)
        if entry["is_param"]:
            tensor = torch.nn.Parameter(tensor, requires_grad=meta["requires_grad"] and tensor.is_floating_point())
        out[key] = tensor
    return out


def read_archive(path: Path) -> Pt2Contents:
    """Open and validate a ``.pt2`` archive; build its tensors from raw bytes.

    Raises:
        UnsafeFileError: Anything that would run code under torch.export.load.
        InputError: Not a torch.export archive, truncated, or inconsistent.
    """
    from torch._export.serde.schema import SCHEMA_VERSION

    path = Path(path)
    require_file(path)  # missing, a folder, or not readable by this user: said as such, exit 1
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with path.open("rb") as fh:
            if fh.read(1) == b"\x80":
                raise _unsafe(path, "it is a Python pickle, not a torch.export archive") from None
        raise _bad(path, "it is not a zip archive, or the archive is truncated") from None
    except UnicodeDecodeError:  # a member name flagged UTF-8 that is not
        raise _bad(path, "the zip is corrupt (a member name is not valid UTF-8)") from None
    except OSError as exc:
        raise input_error(path, exc) from None
    try:
        with zf:
            _, members = _members(path, zf)
            fmt = members.get("archive_format")
            if fmt is None:
                if any(rel.endswith(".pt") for rel in members):
                    raise _unsafe(path, "it is an old torch.export zip whose state is a pickle")
                raise _bad(path, "it has no archive_format member")
            if bytes(_read(zf, fmt)).strip() != b"pt2":
                raise _bad(path, "archive_format is not 'pt2'")
            version = members.get("archive_version")
            if version is None or bytes(_read(zf, version)).strip() != b"0":
                raise _bad(path, "archive_version is not 0 (written by another torch version?)")
            order = members.get("byteorder")
            if order is not None and bytes(_read(zf, order)).strip() not in (b"little", b""):
                raise _bad(path, "its tensors are big-endian")
            try:
                program = schema.program(_json(path, zf, members, f"models/{MODEL}.json"), SCHEMA_VERSION[0])
                configs = {kind: schema.payload_config(
                    _json(path, zf, members, f"data/{kind}/{MODEL}_{kind}_config.json"), kind)
                    for kind in ("weights", "constants")}
            except schema.Refusal as exc:
                raise _unsafe(path, str(exc)) from None
            except (schema.Malformed, RecursionError) as exc:
                raise _bad(path, str(exc) or "the program nests too deeply") from None
            referenced = {f"data/{kind}/{e['path_name']}" for kind, c in configs.items() for e in c.values()}
            for rel in members:
                if rel not in _FIXED and rel not in referenced and not rel.startswith(_SKIPPED):
                    raise _bad(path, f"unexpected member {rel!r}")
            state = _tensors(path, zf, members, "weights", configs["weights"])
            constants = _tensors(path, zf, members, "constants", configs["constants"])
    except zipfile.BadZipFile as exc:
        raise _bad(path, f"the zip is corrupt ({exc})") from None
    skipped = sorted(rel for rel in members if rel.startswith(_SKIPPED))
    _check_signature(path, program, state, constants)
    return Pt2Contents(path, program, state, constants, skipped)


def _check_signature(path: Path, program: Mapping[str, Any], state: Mapping[str, Any],
                     constants: Mapping[str, Any]) -> None:
    """Every parameter/buffer/constant input has its tensor, with the graph's shape."""
    graph = program["graph_module"]["graph"]
    for spec in program["graph_module"]["signature"]["input_specs"]:
        ((kind, body),) = spec.items()
        key = {"parameter": "parameter_name", "buffer": "buffer_name",
               "tensor_constant": "tensor_constant_name"}.get(kind)
        if key is None:
            continue
        fqn, arg = body[key], body["arg"]["name"]
        store = state if kind == "parameter" or (kind == "buffer" and body["persistent"]) else constants
        if fqn not in store:
            raise _bad(path, f"the graph reads {kind} {fqn!r}, which the archive does not hold")
        meta = graph["tensor_values"].get(arg)
        if meta is None:
            raise _bad(path, f"the graph has no tensor metadata for input {arg!r}")
        sizes = tuple(s.get("as_int") for s in meta["sizes"])
        if None not in sizes and tuple(store[fqn].shape) != sizes:
            raise _bad(path, f"{fqn!r} has shape {tuple(store[fqn].shape)} but the graph expects {sizes}")


def load_program(path: Path) -> ExportedProgram:
    """A ``torch.export.ExportedProgram`` from an untrusted ``.pt2``, without running its code.

    See the module docs for what is checked. The program has no example inputs, so
    ``.module()`` builds no guard function.

    Raises:
        UnsafeFileError, InputError: see :func:`read_archive`.
    """
    from torch._export.serde.schema import ExportedProgram as SerializedProgram
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    contents = read_archive(path)
    try:
        serialized = _dict_to_dataclass(SerializedProgram, contents.program)
        return ExportedProgramDeserializer().deserialize(
            serialized, contents.state_dict, contents.constants, None)
    except Exception as exc:  # torch's own checks on a graph that passed ours
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise _bad(Path(path), f"torch could not rebuild the program ({first})") from None


def stage_program(group: AtomicGroup, ep: ExportedProgram, dest: Path, *, option: str = "-o") -> None:
    """Stage ``ep`` in ``group`` (written by torch.export.save, committed with the group's other files).

    The finished temp file is read back with :func:`read_archive` before anything is
    renamed, so a written model is one bncli (and torch.export.load) can read.
    """
    import torch

    def writer(fh: BinaryIO) -> None:
        ep._guards_code = []  # nothing bncli writes runs through exec when it is loaded
        torch.export.save(ep, fh)

    def check(tmp: Path) -> None:
        read_archive(tmp)

    group.write(Path(dest), writer, allowed=PT2_SUFFIXES, option=option, check=check)


def save_program(ep: ExportedProgram, dest: Path, *, force: bool, protect: tuple[Path, ...] = ()) -> None:
    """Write ``ep`` atomically (no partial file on failure), checked by reading it back."""
    with AtomicGroup(force=force, protect=protect) as group:
        stage_program(group, ep, dest)
