"""Writing: output checks and atomic writes, of one file or of several together.

Every output is first written to a temporary file in its target folder and fsynced; only
then is it renamed over the target. An input is never overwritten, an existing output only
with ``force``, and a failure or Ctrl-C leaves no partial file under a final name.

A command that writes several files (``normalize -o OUT --save-state STATE``) stages them
all in one :class:`AtomicGroup` and commits them together: either every file is written,
or none is (and any file they would have replaced is left as it was).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from bncli.errors import OutputError
from bncli.io.formats import OUTPUT_SUFFIXES, STATE_OUTPUT_SUFFIXES
from bncli.io.oserrors import output_error

if TYPE_CHECKING:
    import torch

Writer = Callable[[BinaryIO], None]


def default_output(input_path: Path, suffix: str | None = None) -> Path:
    """``data/batch.npy`` -> ``data/batch.bn.npy`` (beside the input, same format)."""
    input_path = Path(input_path)
    return input_path.with_name(f"{input_path.stem}.bn{suffix or input_path.suffix}")


def _probe_folder(dest: Path, option: str) -> None:
    """Create and remove a temp file beside ``dest``: the test of writability that cannot lie.

    ``os.access`` can be wrong (NFS root squashing, ACLs, setuid); creating a file answers
    for the folder's permissions, the mount and the user at once, before any work.
    """
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".probe")
    except OSError as exc:
        raise output_error(dest, exc, option=option) from None
    os.close(fd)
    Path(name).unlink()


def check_output(dest: Path, *, force: bool, protect: Iterable[Path] = (),
                 allowed: tuple[str, ...] = OUTPUT_SUFFIXES, option: str = "-o", probe: bool = True) -> None:
    """Refuse a destination before any work: a bad extension, an input (ever), an existing file
    (unless ``force``), a missing folder, or (with ``probe``) a folder this user cannot write to.

    Raises:
        OutputError: Which of these it is, and the fix (``option`` names the flag to change).
    """
    dest = Path(dest)
    suffix = dest.suffix.lower()
    if suffix not in allowed:
        raise OutputError(f"{dest}: cannot write {suffix or 'a file without extension'!r}.",
                          hint=f"Give the {option} file one of these extensions: {', '.join(allowed)}.")
    try:
        for src in protect:
            if _same_file(Path(src), dest):
                raise OutputError(f"{dest}: is an input file; bncli never overwrites its input.",
                                  hint=f"Choose another path with {option}.")
        if dest.is_dir():
            raise OutputError(f"{dest}: is a directory.", hint=f"Give a file name with {option}.")
        if dest.exists() and not force:
            raise OutputError(f"{dest}: already exists; kept as it is.",
                              hint=f"Pass --force to replace it, or choose another path with {option}.")
        if not dest.parent.is_dir():
            raise OutputError(f"{dest}: folder {dest.parent} does not exist.",
                              hint=f"Create it first (mkdir -p {dest.parent}).")
    except OSError as exc:  # e.g. a folder on the way that this user may not search
        raise output_error(dest, exc, option=option) from None
    if probe:
        _probe_folder(dest, option)


def _same_file(src: Path, dest: Path) -> bool:
    """Whether ``dest`` is ``src`` (also through a link); an input we cannot stat is reported
    by the reader, not here as an output error."""
    try:
        if not src.exists():
            return False
    except OSError:
        return False
    return dest.exists() and src.samefile(dest)


def _default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (mkstemp creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class AtomicGroup:
    """Stage several outputs beside their targets, then rename them all into place, or none.

    Every destination is checked when it is added (before the caller does the work), the
    temp files are written and fsynced while the group is open, and leaving the ``with``
    block commits them: each destination is re-checked, then renamed into place one after
    the other. If any step fails, the files already renamed are rolled back (a replaced
    file is restored from a hard link made just before), so the group never leaves half
    its results; an exception inside the block discards every temp file.

    Example:
        >>> with AtomicGroup(force=False, protect=[src]) as group:
        ...     out = group.path(Path("out.npy"))          # write it yourself, e.g. NpyWriter
        ...     group.write(Path("state.pt"), writer, allowed=STATE_OUTPUT_SUFFIXES, option="--save-state")
    """

    def __init__(self, *, force: bool, protect: Iterable[Path] = ()) -> None:
        self.force = force
        self.protect = [Path(p) for p in protect]
        self._staged: list[tuple[Path, Path, tuple[str, ...], str]] = []

    def check(self, dest: Path, *, allowed: tuple[str, ...] = OUTPUT_SUFFIXES, option: str = "-o") -> None:
        """Check one destination now (see :func:`check_output`), also against the others staged."""
        dest = Path(dest)
        check_output(dest, force=self.force, protect=self.protect, allowed=allowed, option=option)
        for other, _, _, other_option in self._staged:
            if other.resolve() == dest.resolve():
                raise OutputError(f"{dest}: given twice ({other_option} and {option}).",
                                  hint="Give each output its own file name.")

    def path(self, dest: Path, *, allowed: tuple[str, ...] = OUTPUT_SUFFIXES, option: str = "-o") -> Path:
        """Check ``dest`` and return the temp path to write it into (renamed over ``dest`` at commit)."""
        dest = Path(dest)
        self.check(dest, allowed=allowed, option=option)
        try:
            fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        except OSError as exc:
            raise output_error(dest, exc, option=option) from None
        os.close(fd)
        tmp = Path(name)
        self._staged.append((dest, tmp, allowed, option))
        return tmp

    def write(self, dest: Path, writer: Writer, *, allowed: tuple[str, ...] = OUTPUT_SUFFIXES,
              option: str = "-o", check: Callable[[Path], None] | None = None) -> None:
        """Stage ``dest``: run ``writer(fileobj)`` into its temp file and fsync it.

        ``check(temp_path)``, if given, then inspects the finished file (e.g. reads it back)
        and may raise to abandon the whole group before anything is renamed.
        """
        tmp = self.path(dest, allowed=allowed, option=option)
        try:
            with tmp.open("wb") as fh:
                writer(fh)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise output_error(dest, exc, option=option) from None
        if check is not None:
            check(tmp)

    def commit(self) -> None:
        """Rename every staged file into place, all or none (see the class docstring)."""
        for dest, _, allowed, option in self._staged:
            # An output may have appeared while we worked: without --force it stops them all.
            check_output(dest, force=self.force, protect=self.protect, allowed=allowed, option=option,
                         probe=False)
        mode = _default_mode()
        done: list[tuple[Path, Path | None]] = []
        try:
            for dest, tmp, _, option in self._staged:
                backup = None
                try:
                    tmp.chmod(mode)
                    backup = _hard_link_backup(dest)
                    tmp.replace(dest)
                except OSError as exc:
                    if backup is not None:  # dest was not replaced: its second name is not needed
                        backup.unlink(missing_ok=True)
                    raise output_error(dest, exc, option=option) from None
                done.append((dest, backup))
        except BaseException:
            for dest, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is not None:
                        backup.replace(dest)
                    else:
                        dest.unlink()
            raise
        finally:
            for _, backup in done:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        backup.unlink()
            self.discard()

    def discard(self) -> None:
        """Remove every temp file not renamed into place."""
        for _, tmp, _, _ in self._staged:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicGroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and self._staged:
            # Writing into a temp file failed (full disk, quota, a mount gone read-only).
            dest, _, _, option = next((s for s in self._staged if exc.filename and str(s[1]) == exc.filename),
                                      self._staged[-1])
            raise output_error(dest, exc, option=option) from None


def _hard_link_backup(dest: Path) -> Path | None:
    """A second name for the file ``dest`` holds now, so a rollback can put it back."""
    if not dest.exists():
        return None
    backup = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.bak")
    try:
        os.link(dest, backup)
    except OSError:  # no hard links here (e.g. FAT, some network file systems): no rollback for it
        return None
    return backup


@contextlib.contextmanager
def atomic_output(dest: Path, *, force: bool, protect: Iterable[Path] = (),
                  allowed: tuple[str, ...] = OUTPUT_SUFFIXES, option: str = "-o") -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success rename it over ``dest`` atomically.

    Any exception, Ctrl-C included, removes the temp file, so no partial output can
    appear under the final name. A one-file :class:`AtomicGroup`.
    """
    with AtomicGroup(force=force, protect=protect) as group:
        yield group.path(dest, allowed=allowed, option=option)


def write_atomic(dest: Path, writer: Writer, *, force: bool, protect: Iterable[Path] = (),
                 allowed: tuple[str, ...] = OUTPUT_SUFFIXES, option: str = "-o") -> None:
    """Run ``writer(fileobj)`` into a temp file, fsync it and rename it to ``dest``."""
    with AtomicGroup(force=force, protect=protect) as group:
        group.write(dest, writer, allowed=allowed, option=option)


@contextlib.contextmanager
def output_folder(folder: Path | None, *, create: bool = True, option: str = "--output-dir") -> Iterator[None]:
    """Make ``folder`` (if missing; its parent must exist) for the block, and remove it again
    if the block wrote nothing into it. ``None``, or ``create=False``: nothing to do.

    Raises:
        OutputError: It exists as a file, its parent is missing, or it cannot be made.
    """
    made = False
    if folder is not None and create and not folder.is_dir():
        if folder.exists():
            raise OutputError(f"{folder}: exists and is not a folder.", hint=f"Give {option} a folder.")
        if not folder.parent.is_dir():
            raise OutputError(f"{folder}: folder {folder.parent} does not exist.",
                              hint=f"Create it first (mkdir -p {folder}).")
        try:
            folder.mkdir()
        except OSError as exc:
            raise output_error(folder, exc, option=option) from None
        made = True
    try:
        yield
    finally:
        if made and folder is not None:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: what this run wrote there stays


def tensor_writer(tensor: torch.Tensor, dest: Path, *, key: str | None = None) -> Writer:
    """A writer of one tensor in the format of ``dest``'s extension, dtype kept.

    Raises:
        OutputError: The format cannot hold the dtype (bfloat16 in .npy/.npz).
    """
    import torch

    dest = Path(dest)
    suffix = dest.suffix.lower()
    tensor = tensor.detach().cpu().contiguous()
    name = key or "output"
    if suffix in (".npy", ".npz") and tensor.dtype == torch.bfloat16:
        raise OutputError(f"{dest}: NumPy has no bfloat16, so {suffix} cannot hold this output.",
                          hint="Write .pt or .safetensors instead (-o out.pt), which keep bfloat16.")
    writer: Writer
    if suffix == ".npy":
        def writer(fh: BinaryIO) -> None:
            np.save(fh, tensor.numpy(), allow_pickle=False)
    elif suffix == ".npz":
        def writer(fh: BinaryIO) -> None:
            write_npz_members(fh, {name: tensor.numpy()})
    elif suffix == ".safetensors":
        from safetensors.torch import save

        def writer(fh: BinaryIO) -> None:
            fh.write(save({name: tensor}))
    else:
        def writer(fh: BinaryIO) -> None:
            torch.save(tensor if key is None else {key: tensor}, fh)
    return writer


def state_writer(state: Mapping[str, torch.Tensor], dest: Path) -> Writer:
    """A writer of a state_dict as ``.pt`` (torch.save) or ``.safetensors``."""
    import torch

    plain = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    writer: Writer
    if Path(dest).suffix.lower() == ".safetensors":
        from safetensors.torch import save

        def writer(fh: BinaryIO) -> None:
            fh.write(save(plain))
    else:
        def writer(fh: BinaryIO) -> None:
            torch.save(plain, fh)
    return writer


def save_tensor(tensor: torch.Tensor, dest: Path, *, key: str | None = None, force: bool = False,
                protect: Iterable[Path] = ()) -> None:
    """Write one tensor in the format of ``dest``'s extension, dtype kept, atomically.

    Raises:
        OutputError: The output exists (without ``force``), is an input, cannot be written
            there, or the format cannot hold the dtype (bfloat16 in .npy/.npz).
    """
    write_atomic(dest, tensor_writer(tensor, dest, key=key), force=force, protect=protect)


def save_state_dict(state: Mapping[str, torch.Tensor], dest: Path, *, force: bool = False,
                    protect: Iterable[Path] = ()) -> None:
    """Write a state_dict as ``.pt`` (torch.save) or ``.safetensors``, atomically."""
    write_atomic(dest, state_writer(state, dest), force=force, protect=protect, allowed=STATE_OUTPUT_SUFFIXES,
                 option="--save-state")


def write_npz_members(fh: BinaryIO, members: Mapping[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` with the members in this order (what ``np.savez`` writes,
    without its keyword arguments, so a member may be called ``file`` or ``allow_pickle``)."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
