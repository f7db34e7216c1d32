"""Permission, read-only and full-disk failures (issue 12): one Error + Fix line, exit 1, all or nothing.

The test suite may run as root, for whom file permissions do not apply: those cases run
bncli in a subprocess as the user ``nobody`` (and skip when there is none), or as the
current user when it is not root. The read-only mount needs root and ``mount``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bncli import io
from bncli.cli import app
from bncli.errors import OutputError

TINY_BENCH = ["bench", "--shape", "2,3,4,4", "--dtype", "float32", "--reps", "3", "--warmup", "1"]


def flat(text: str) -> str:
    return " ".join(text.split())


def _nobody() -> tuple[int, int] | None:
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        return None
    return entry.pw_uid, entry.pw_gid


@pytest.fixture
def world() -> Iterator[Path]:
    """A temp folder the unprivileged user can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="bncli-perm-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for path in [base, *base.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(0o700 if path.is_dir() else 0o600)
        shutil.rmtree(base, ignore_errors=True)


def as_user(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run bncli as an ordinary user: ``nobody`` when we are root, else ourselves."""
    command = [sys.executable, "-m", "bncli", *args]
    kwargs: dict[str, Any] = {}
    if os.geteuid() == 0:
        ids = _nobody()
        if ids is None:
            pytest.skip("running as root, and there is no user 'nobody' to drop privileges to")
        if shutil.which("setpriv"):  # util-linux: drops uid, gid and groups, then execs
            command = ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", *command]
        else:
            kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []}
    env = {**os.environ, "HOME": str(cwd), "COLUMNS": "200", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, **kwargs)
    except PermissionError as exc:
        pytest.skip(f"the unprivileged user cannot run this Python ({exc})")
    if "ModuleNotFoundError" in proc.stderr or "Permission denied: '" + sys.executable in proc.stderr:
        pytest.skip(f"the unprivileged user cannot run this Python: {proc.stderr[-200:]}")
    return proc


def permissions_apply(path: Path) -> None:
    """Skip when the acting user can read a mode-000 file anyway (e.g. a non-root user with capabilities)."""
    if os.geteuid() != 0 and os.access(path, os.R_OK):
        pytest.skip("file permissions do not apply to this user")


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p == root)


@pytest.fixture
def tree(world: Path) -> Path:
    """x.npy / x.pt readable; unread.* mode 000; ro/ (r-x), rw/ (rwx), locked/ (rwx------) with x.npy, roin/x.npy."""
    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)
    np.save(world / "x.npy", x)
    torch.save(torch.from_numpy(x), world / "x.pt")
    for name in ("x.npy", "x.pt"):
        shutil.copy(world / name, world / f"unread{Path(name).suffix}")
        (world / name).chmod(0o644)
        (world / f"unread{Path(name).suffix}").chmod(0)
    for folder, mode in (("ro", 0o555), ("rw", 0o777), ("locked", 0o700), ("roin", 0o555)):
        (world / folder).mkdir()
        if folder in ("locked", "roin"):
            shutil.copy(world / "x.npy", world / folder / "x.npy")
            (world / folder / "x.npy").chmod(0o644)
        (world / folder).chmod(mode)
    permissions_apply(world / "unread.npy")
    return world


def assert_one_error(proc: subprocess.CompletedProcess[str], *needles: str, where: str = "stderr") -> None:
    text = flat(getattr(proc, where))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    if where == "stderr":
        assert proc.stderr.startswith("Error: ") and "\nFix: " in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in text, text


# -- defect 1: an unreadable input is exit 1, not a usage error --------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".pt"])
@pytest.mark.parametrize("command", ["normalize", "check-shape", "stats", "compare", "inspect"])
def test_unreadable_input_is_an_expected_failure(tree: Path, command: str, suffix: str) -> None:
    before = snapshot(tree)
    proc = as_user([command, f"unread{suffix}"], tree)
    where = "stdout" if command == "check-shape" else "stderr"  # check-shape reports it as a finding
    assert_one_error(proc, f"unread{suffix}: permission denied: this user may not read the file",
                     "mode ----------", "chmod u+r", where=where)
    if command == "check-shape":
        assert "error[unreadable]" in proc.stdout and "fix:" in proc.stdout
    assert snapshot(tree) == before


@pytest.mark.parametrize("command", [["inspect"], ["compare", "--data", "x.npy"], ["fold", "-o", "rw/f.pt2"],
                                     ["recalibrate", "x.npy", "-o", "rw/r.pt2"]])
def test_unreadable_model_is_an_expected_failure(tree: Path, command: list[str]) -> None:
    """The .pt2 reader opened the file itself: "Permission denied [EACCES]" and a vague fix."""
    shutil.copy(Path(__file__).resolve().parent.parent / "sample_data" / "model.pt2", tree / "unread.pt2")
    (tree / "unread.pt2").chmod(0)
    proc = as_user([command[0], "unread.pt2", *command[1:]], tree)
    assert_one_error(proc, "unread.pt2: permission denied: this user may not read the file", "mode ----------",
                     "chmod u+r unread.pt2")
    assert not list((tree / "rw").iterdir())


@pytest.mark.parametrize("command", ["stats", "check-shape"])
def test_input_folder_not_listable(tree: Path, command: str) -> None:
    (tree / "shards").mkdir()
    shutil.copy(tree / "x.npy", tree / "shards" / "a.npy")
    (tree / "shards").chmod(0o311)  # searchable, not readable: its names cannot be listed
    proc = as_user([command, "shards"], tree)
    assert_one_error(proc, "shards: permission denied: this user may not list the folder", "chmod u+rx shards")


@pytest.mark.parametrize("command", ["normalize", "check-shape", "stats", "compare"])
def test_input_folder_not_searchable(tree: Path, command: str) -> None:
    args = [command, "locked/x.npy"] + (["-o", "rw/o.npy"] if command == "normalize" else [])
    proc = as_user(args, tree)
    where = "stdout" if command == "check-shape" else "stderr"
    assert_one_error(proc, "locked/x.npy: permission denied: folder", "locked cannot be searched", where=where)
    assert not list((tree / "rw").iterdir())


# -- defect 2: outputs that cannot be written ---------------------------------------------------
@pytest.mark.parametrize(("args", "needle"), [
    (["normalize", "x.npy", "-o", "ro/out.npy"], "ro/out.npy: permission denied: this user may not write in folder"),
    (["normalize", "x.npy", "-o", "ro/out.npy", "--out-of-core"], "ro/out.npy: permission denied"),
    (["normalize", "roin/x.npy"], "roin/x.bn.npy: permission denied: this user may not write in folder"),
    (["normalize", "roin/x.npy", "--force"], "roin/x.bn.npy: permission denied"),
    (["normalize", "x.npy", "-o", "rw/out.npy", "--save-state", "ro/state.pt"],
     "ro/state.pt: permission denied"),
    (["normalize", "x.npy", "-o", "rw/out.npy", "--save-state", "ro/state.pt", "--out-of-core"],
     "ro/state.pt: permission denied"),
    (["stats", "x.npy", "--save-state", "ro/state.pt"], "ro/state.pt: permission denied"),
    ([*TINY_BENCH, "-o", "ro/bench.json"], "ro/bench.json: permission denied"),
])
def test_unwritable_destination_fails_before_any_work(tree: Path, args: list[str], needle: str) -> None:
    before = snapshot(tree)
    proc = as_user(args, tree)
    assert_one_error(proc, needle)
    option = "--save-state" if "state.pt" in needle else "-o"
    assert f"(e.g. {option} /tmp/" in flat(proc.stderr)
    assert proc.stdout == ""  # nothing done, nothing reported: the check came first
    assert snapshot(tree) == before  # all or nothing: rw/out.npy was not written either


# -- defect 3: several outputs are committed together ------------------------------------------
def _failing_state_writer(*_: Any) -> Any:
    def writer(fh: BinaryIO) -> None:
        fh.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return writer


@pytest.mark.parametrize("execution", ["--in-memory", "--out-of-core"])
@pytest.mark.parametrize("existing", [False, True])
def test_a_late_failure_leaves_neither_output(runner: CliRunner, batch: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, execution: str,
                                              existing: bool) -> None:
    out, state = tmp_path / "out.npy", tmp_path / "state.pt"
    if existing:
        out.write_bytes(b"old output")
        state.write_bytes(b"old state")
    monkeypatch.setattr(io, "state_writer", _failing_state_writer)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["normalize", str(batch), "-o", str(out), "--save-state", str(state),
                                 execution, "--force"])
    assert result.exit_code == 1
    assert "no space left" in flat(result.stderr) and "Traceback" not in result.output
    assert snapshot(tmp_path) == before  # no output, no temp file
    if existing:
        assert out.read_bytes() == b"old output" and state.read_bytes() == b"old state"


@pytest.mark.parametrize("existing", ["first", "second"])
def test_commit_rolls_back_what_it_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: str) -> None:
    """The second rename fails: the first output is undone (removed, or restored if it replaced a file)."""
    first, second = tmp_path / "a.npy", tmp_path / "b.pt"
    old = first if existing == "first" else second
    old.write_bytes(b"previous")
    real_replace = Path.replace
    calls: list[Path] = []

    def flaky_replace(self: Path, target: Any) -> Path:
        calls.append(Path(target))
        if len(calls) == 2:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", flaky_replace)
    with pytest.raises(OutputError, match="b.pt: permission denied"):
        with io.AtomicGroup(force=True) as group:
            group.write(first, lambda fh: fh.write(b"new a") and None)
            group.write(second, lambda fh: fh.write(b"new b") and None, allowed=io.STATE_SUFFIXES)
    monkeypatch.setattr(Path, "replace", real_replace)
    assert old.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == [old.name]  # nothing new, no temp or backup file


def test_group_discards_on_error_and_refuses_duplicates(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), io.AtomicGroup(force=False) as group:
        group.write(tmp_path / "a.npy", lambda fh: fh.write(b"x") and None)
        raise RuntimeError("work failed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="given twice"), io.AtomicGroup(force=False) as group:
        group.path(tmp_path / "a.npy")
        group.path(tmp_path / "a.npy", option="--save-state")
    assert list(tmp_path.iterdir()) == []


def test_committed_files_get_the_usual_permissions(tmp_path: Path) -> None:
    with io.AtomicGroup(force=False) as group:
        group.write(tmp_path / "a.npy", lambda fh: fh.write(b"x") and None)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o666 & ~umask


# -- a read-only mount, with and without --force ------------------------------------------------
@pytest.fixture
def ro_mount(world: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("simulating a read-only mount needs root and mount")
    point = world / "mnt"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(point)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        for name in ("x.npy", "y.npy"):
            np.save(point / name, np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32))
        (point / "x.bn.npy").write_bytes(b"old output")  # y.npy has no output yet
        assert subprocess.run(["mount", "-o", "remount,ro", str(point)], capture_output=True).returncode == 0
        yield point
    finally:
        subprocess.run(["umount", str(point)], capture_output=True)


@pytest.mark.parametrize(("name", "extra"), [
    ("y.npy", []), ("x.npy", ["--force"]), ("x.npy", ["-o", "{m}/new.npy"]), ("x.npy", ["--force", "--out-of-core"]),
    ("y.npy", ["--save-state", "{m}/s.pt"]), ("x.npy", ["-o", "{m}/new.npy", "--save-state", "{m}/s.pt", "--force"]),
])
def test_read_only_mount(runner: CliRunner, ro_mount: Path, name: str, extra: list[str]) -> None:
    before = {p.name: p.read_bytes() for p in ro_mount.iterdir()}
    result = runner.invoke(app, ["normalize", str(ro_mount / name), *[a.format(m=ro_mount) for a in extra]])
    assert result.exit_code == 1
    text = flat(result.stderr)
    assert "is on a read-only file system" in text and result.stderr.startswith("Error: ") and "Fix:" in text
    assert "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in ro_mount.iterdir()} == before


def test_read_only_mount_stats_and_bench(runner: CliRunner, ro_mount: Path) -> None:
    for args in (["stats", str(ro_mount / "x.npy"), "--save-state", str(ro_mount / "s.pt")],
                 [*TINY_BENCH, "-o", str(ro_mount / "b.json")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "read-only file system" in flat(result.stderr), result.output
        assert result.stdout == ""
