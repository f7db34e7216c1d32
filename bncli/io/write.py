"""Writing: output checks and atomic writes (temp file in the target folder, fsync, rename).

An input is never overwritten, an existing output only with ``force``, and a failure or
Ctrl-C leaves no partial file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from bncli.errors import OutputError

if TYPE_CHECKING:
    import torch


from bncli.io.formats import OUTPUT_SUFFIXES, STATE_OUTPUT_SUFFIXES


# -- writing -------------------------------------------------------------------------------
def default_output(input_path: Path, suffix: str | None = None) -> Path:
    """``data/batch.npy`` -> ``data/batch.bn.npy`` (beside the input, same format)."""
    input_path = Path(input_path)
    return input_path.with_name(f"{input_path.stem}.bn{suffix or input_path.suffix}")


def check_output(dest: Path, *, force: bool, protect: Iterable[Path] = (),
                 allowed: tuple[str, ...] = OUTPUT_SUFFIXES) -> None:
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
                  allowed: tuple[str, ...] = OUTPUT_SUFFIXES) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success rename it over ``dest`` atomically.

    Any exception, Ctrl-C included, removes the temp file, so no partial output can
    appear under the final name.
    """
    dest = Path(dest)
    protect = list(protect)
    check_output(dest, force=force, protect=protect, allowed=allowed)
    tmp = _temp_beside(dest)
    try:
        yield tmp
        _publish([(dest, tmp, allowed)], force=force, protect=protect)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _temp_beside(dest: Path) -> Path:
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    return Path(tmp_name)


def _publish(pairs: list[tuple[Path, Path, tuple[str, ...]]], *, force: bool, protect: list[Path]) -> None:
    """Rename finished temp files over their destinations, after re-checking every one."""
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    for dest, tmp, allowed in pairs:
        tmp.chmod(0o666 & ~umask)
        # Re-check: the output may have appeared while we were working.
        check_output(dest, force=force, protect=protect, allowed=allowed)
    for dest, tmp, _ in pairs:
        tmp.replace(dest)


@dataclass(frozen=True)
class PendingWrite:
    """One output of an all-or-nothing write (:func:`write_atomic_all`).

    Attributes:
        dest: The final path.
        writer: Writes the content into an open binary file.
        allowed: Extensions ``dest`` may have.
        check: Optional check of the finished temp file (e.g. read it back) before any rename.
    """

    dest: Path
    writer: Callable[[BinaryIO], None]
    allowed: tuple[str, ...] = OUTPUT_SUFFIXES
    check: Callable[[Path], None] | None = None


def write_atomic_all(items: Iterable[PendingWrite], *, force: bool, protect: Iterable[Path] = ()) -> None:
    """Write several outputs, all or nothing: each goes to a temp file beside its destination
    (written, fsynced, checked), and only when all are done are they renamed into place.

    A failure or Ctrl-C before the renames leaves no output at all.
    """
    items = list(items)
    protect = list(protect)
    for item in items:
        check_output(item.dest, force=force, protect=protect, allowed=item.allowed)
    tmps: list[Path] = []
    try:
        for item in items:
            tmps.append(_temp_beside(item.dest))
            with tmps[-1].open("wb") as fh:
                item.writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
            if item.check is not None:
                item.check(tmps[-1])
        _publish([(i.dest, t, i.allowed) for i, t in zip(items, tmps, strict=True)], force=force, protect=protect)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(dest: Path, writer: Callable[[BinaryIO], None], *, force: bool,
                 protect: Iterable[Path] = (), allowed: tuple[str, ...] = OUTPUT_SUFFIXES) -> None:
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
            # numpy's stub types **kwds against savez's allow_pickle flag; the key is a str.
            np.savez(fh, **{name: tensor.numpy()})  # type: ignore[arg-type]
    elif suffix == ".safetensors":
        from safetensors.torch import save

        def writer(fh: BinaryIO) -> None:
            fh.write(save({name: tensor}))
    else:
        def writer(fh: BinaryIO) -> None:
            torch.save(tensor if key is None else {key: tensor}, fh)
    write_atomic(dest, writer, force=force, protect=protect)


def state_dict_writer(state: Mapping[str, torch.Tensor], suffix: str) -> Callable[[BinaryIO], None]:
    """A writer of ``state`` as ``.safetensors`` or (any other suffix) ``torch.save``."""
    import torch

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if suffix.lower() == ".safetensors":
        from safetensors.torch import save

        def writer(fh: BinaryIO) -> None:
            fh.write(save(dict(state)))
    else:
        def writer(fh: BinaryIO) -> None:
            torch.save(dict(state), fh)
    return writer


def save_state_dict(state: Mapping[str, torch.Tensor], dest: Path, *, force: bool = False,
                    protect: Iterable[Path] = ()) -> None:
    """Write a state_dict as ``.pt`` (torch.save) or ``.safetensors``, atomically."""
    dest = Path(dest)
    write_atomic(dest, state_dict_writer(state, dest.suffix), force=force, protect=protect,
                 allowed=STATE_OUTPUT_SUFFIXES)
