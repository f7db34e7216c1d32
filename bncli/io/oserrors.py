"""OS errors (permissions, read-only or full disks) as bncli errors: what failed, why, the fix.

Every file bncli opens goes through :mod:`bncli.io`, which turns an ``OSError`` into an
:class:`~bncli.errors.InputError` (reading) or :class:`~bncli.errors.OutputError` (writing)
with these messages, so the CLI prints one ``Error:`` and one ``Fix:`` line, exit 1.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from bncli.errors import InputError, OutputError

_PERMISSION = (errno.EACCES, errno.EPERM)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc}" + (f" [{name}]" if name else "")


def _mode(path: Path) -> str:
    """``mode drwxr-xr-x, owner root`` (or nothing when even stat is refused)."""
    try:
        st = path.stat()
    except OSError:
        return ""
    try:
        import pwd

        owner = pwd.getpwuid(st.st_uid).pw_name
    except (ImportError, KeyError):
        owner = str(st.st_uid)
    return f"mode {stat.filemode(st.st_mode)}, owner {owner}"


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def blocked_folder(path: Path) -> Path | None:
    """The first folder above ``path`` that this user may not search (enter), if any."""
    for parent in reversed(Path(path).absolute().parents):
        try:
            if parent.is_dir() and not os.access(parent, os.X_OK):
                return parent
        except OSError:
            return parent
    return None


def input_error(path: Path, exc: OSError) -> InputError:
    """The file ``path`` (an input) cannot be opened or read."""
    path = Path(path)
    if exc.errno in _PERMISSION:
        folder = blocked_folder(path)
        if folder is not None:
            mode = _mode(folder)
            return InputError(f"{path}: permission denied: folder {folder} cannot be searched"
                              + (f" ({mode})." if mode else "."),
                              hint=f"Ask for (or grant) search permission on {folder} (chmod +x), "
                                   "or copy the file somewhere you may read.")
        mode = _mode(path)
        if _is_dir(path):  # a folder input (stats shards/) this user may not list
            return InputError(f"{path}: permission denied: this user may not list the folder"
                              + (f" ({mode})." if mode else "."),
                              hint=f"Grant read permission (chmod u+rx {path}, or ask its owner), "
                                   "or pass the files inside it if you may read them.")
        return InputError(f"{path}: permission denied: this user may not read the file"
                          + (f" ({mode})." if mode else "."),
                          hint=f"Grant read permission (chmod u+r {path}, or ask its owner), "
                               "or run bncli as a user who may read it.")
    return InputError(f"{path}: cannot read ({_reason(exc)}).",
                      hint="Check the file and the device it is on.")


def output_error(dest: Path, exc: OSError, *, option: str = "-o") -> OutputError:
    """The output ``dest`` cannot be created, written or renamed into place."""
    dest = Path(dest)
    folder = dest.absolute().parent  # "folder ." would not say much
    if exc.errno == errno.EROFS:
        return OutputError(f"{dest}: cannot write: {folder} is on a read-only file system.",
                           hint=f"Write somewhere writable with {option} (e.g. {option} /tmp/{dest.name}).")
    if exc.errno in _PERMISSION:
        blocked = blocked_folder(dest)
        where = blocked or folder
        mode = _mode(where)
        return OutputError(f"{dest}: permission denied: this user may not write in folder {where}"
                           + (f" ({mode})." if mode else "."),
                           hint=f"Write somewhere you may (e.g. {option} /tmp/{dest.name}), "
                                f"or ask for write permission on {where}.")
    if exc.errno in _NO_SPACE:
        return OutputError(f"{dest}: cannot write: no space left on the device of {folder} "
                           f"({_reason(exc)}).",
                           hint=f"Free some space, or write elsewhere with {option}.")
    return OutputError(f"{dest}: cannot write ({_reason(exc)}).",
                       hint=f"Check the folder {folder}, or write elsewhere with {option}.")
