"""Input lists: files, folders and wildcard patterns -> one ordered, de-duplicated file list.

Every command that takes several inputs (``stats``, ``check-shape``; ``normalize`` and
``compare`` too) expands its arguments here, so ``bncli stats shards/`` and
``bncli stats shards/*.npy`` mean the same thing everywhere.

Only names are looked at: no file is opened (the loaders check each file later and
say what is wrong with it).
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from bncli.errors import InputError
from bncli.io.oserrors import input_error
from bncli.wording import plural

DEFAULT_GLOB = "*.npy,*.npz,*.pt,*.pth,*.safetensors"
STDIN = "-"

_DIGITS = re.compile(r"(\d+)")
_WILDCARDS = re.compile(r"[*?\[]")


def parse_glob(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"*.npy,*.pt"`` -> ``("*.npy", "*.pt")`` (a sequence passes through, stripped).

    ``None`` means :data:`DEFAULT_GLOB`.

    Raises:
        ValueError: No pattern at all (``""`` or ``","``).
    """
    if spec is None:
        spec = DEFAULT_GLOB
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    patterns = tuple(p.strip() for p in parts if p.strip())
    if not patterns:
        raise ValueError(f"no file pattern in {spec!r}; use e.g. '*.npy' or '{DEFAULT_GLOB}'")
    return patterns


def natural_key(path: str | os.PathLike[str]) -> tuple[tuple[tuple[int, str, int], ...], str]:
    """Sort key in which digit runs compare as numbers: ``shard_2`` < ``shard_10``.

    Case-insensitive; ties (``a01`` against ``a1``, ``A`` against ``a``) fall back to the
    exact text, so the order is total and the same on every machine.
    """
    text = os.fspath(path)
    parts = _DIGITS.split(text.lower())
    # re.split with a group alternates text, digits, text ...: even positions are text.
    key = tuple((0, part, 0) if i % 2 == 0 else (1, "", int(part)) for i, part in enumerate(parts))
    return key, text


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Whether a file name matches any pattern, case-insensitively (``X.NPY`` is a .npy)."""
    lower = name.lower()
    return any(fnmatchcase(lower, p.lower()) for p in patterns)


def _folder_files(folder: Path, patterns: Sequence[str], exclude: Sequence[str] = ()) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise input_error(folder, exc) from None
    # Hidden names are skipped: bncli's own in-progress outputs are ".NAME.part" files.
    names = [e.name for e in entries if not e.name.startswith(".")]
    found = [folder / e.name for e in entries
             if not e.name.startswith(".") and e.is_file() and matches(e.name, patterns)
             and not matches(e.name, exclude)]
    if not found:
        shown = ", ".join(sorted(names, key=natural_key)[:5]) + (" ..." if len(names) > 5 else "")
        holds = f"it holds {plural(len(names), 'other entry', 'other entries')} ({shown})" if names else "it is empty"
        skipped = [n for n in names if matches(n, exclude)]
        if skipped:
            holds += f", of which {len(skipped)} skipped as named {','.join(exclude)}"
        raise InputError(f"{folder}: no file in this folder matches {','.join(patterns)}; {holds}.",
                         hint="Pass --glob with the pattern of your files (e.g. --glob '*.bin.npy'), "
                              "or the files themselves. Sub-folders are not searched.")
    return sorted(found, key=lambda p: natural_key(p.name))


def _pattern_files(pattern: str) -> list[Path]:
    # glob.glob, not Path.glob: the pattern may be absolute or hold wildcards in folder names.
    found = [Path(p) for p in globlib.glob(pattern) if Path(p).is_file()]  # noqa: PTH207
    if not found:
        raise InputError(f"{pattern}: no file matches this pattern.",
                         hint="Check the pattern (it is expanded by bncli when the shell did not).")
    return sorted(found, key=natural_key)


def expand_inputs(paths: Iterable[str | os.PathLike[str]], *,
                  glob: str | Sequence[str] | None = None, allow_stdin: bool = False,
                  exclude: Sequence[str] = ()) -> list[Path]:
    """Turn files, folders and wildcard patterns into an ordered, de-duplicated file list.

    * A file is kept as given, whatever its name (``--glob`` does not filter it); a path
      that does not exist is kept too, so the loader reports it with its own message.
    * A folder contributes the files directly inside it whose names match one of the
      ``glob`` patterns (case-insensitive), in natural order (``shard_2`` before
      ``shard_10``). Sub-folders are not searched, hidden files (``.name``) are skipped.
      A folder with no matching file is an error. Names matching an ``exclude``
      pattern are skipped there (``normalize`` skips its own ``*.bn.*`` outputs).
    * A path that does not exist but holds ``*``, ``?`` or ``[`` is a pattern (for shells
      that pass it through, and for quoted arguments): expanded, natural order; no match is
      an error.
    * ``-`` (stdin) is kept as ``Path("-")`` when ``allow_stdin``, else refused.

    The order is the order of the arguments; a file named twice (also through a folder
    or another spelling of its path) is kept at its first place only, so no data is
    counted twice.

    Args:
        paths: The command-line arguments (or any paths).
        glob: Patterns for folders, comma-separated or a sequence; None for
            :data:`DEFAULT_GLOB` (every format bncli reads).
        allow_stdin: Whether ``-`` is accepted.
        exclude: Patterns of names a folder does not contribute.

    Returns:
        The files, in order. Empty only when ``paths`` is empty.

    Raises:
        InputError: A folder holds no matching file, a pattern matches nothing, or ``-``
            where stdin is not supported.
        ValueError: ``glob`` holds no pattern (see :func:`parse_glob`).

    Example:
        >>> expand_inputs(["shards/", "extra.pt"])   # doctest: +SKIP
        [PosixPath('shards/shard_2.npy'), PosixPath('shards/shard_10.npy'), PosixPath('extra.pt')]
    """
    patterns = parse_glob(glob)
    out: list[Path] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        ident = os.path.realpath(path)
        if ident not in seen:
            seen.add(ident)
            out.append(path)

    for item in paths:
        text = os.fspath(item)
        if text == STDIN:
            if not allow_stdin:
                raise InputError("'-' (standard input) is not supported by this command.",
                                 hint="Pass the file itself.")
            if STDIN not in seen:
                seen.add(STDIN)
                out.append(Path(STDIN))
            continue
        path = Path(text)
        try:
            is_dir, exists = path.is_dir(), path.exists()
        except OSError:
            # A folder above it cannot be searched: the loader names that folder and the fix.
            add(path)
            continue
        if is_dir:
            for found in _folder_files(path, patterns, exclude):
                add(found)
        elif not exists and _WILDCARDS.search(text):
            for found in _pattern_files(text):
                add(found)
        else:
            add(path)
    return out
