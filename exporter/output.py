"""Where a package may be written, and how it replaces what was there.

`--output` never destroys a user's folder: a folder that is not a package (or a package holding
files the package does not have) is refused unless the user passes `--force`, and the checkpoint
being exported, and every other input of the export, is never replaced, even with `--force`. The
finished package is moved into place by one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`),
under a lock on the parent folder, so the output path always holds a whole package (the old one or
the new one) and two exports to one path end with the later one's package. Partial folders of
exports that died (SIGKILL, power loss) are removed by the next export to the same place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from engines.core.errors import DyVTEError
from engines.core.manifest import FORMAT, MANIFEST

# top-level entries a package folder has (exporter, validation report, TensorRT builds)
PACKAGE_ENTRIES = frozenset({MANIFEST, "graphs", "processor", "report", "engines"})
_HIDDEN_OWN = re.compile(r"^\.(manifest\.json\.\d+|.+\.partial-\d+)$")  # the tool's own temporaries


def partial_name(output: Path, pid: int | None = None) -> Path:
    return output.parent / f".{output.name}.partial-{os.getpid() if pid is None else pid}"


def os_error(action: str, path: Path, exc: OSError) -> DyVTEError:
    """One line for a filesystem failure the user's environment caused (full disk, read-only, ...)."""
    reason = exc.strerror or exc.__class__.__name__
    hint = {errno.ENOSPC: "free some space or choose another --output",
            errno.EDQUOT: "free some space or choose another --output",
            errno.EROFS: "the filesystem is read-only; choose another --output",
            errno.EACCES: "no permission; choose another --output",
            errno.EPERM: "not permitted; choose another --output"}.get(exc.errno, "choose another --output")
    return DyVTEError(f"cannot {action} {path}: {reason} ({hint})")


def _within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output(output: str | Path, force: bool = False, protect: Iterable[str | Path | None] = ()) -> Path:
    """The resolved output path, or a one-line `DyVTEError` saying why it may not be written.

    Refused: an output that is, contains or lies inside a protected path (the checkpoint, routers,
    images, ... of the export: never, even with `force`); an existing file or a folder that is not
    a package, or a package holding other files (unless `force`); a place that cannot be written
    (a parent that is a file, /proc, a read-only filesystem, no permission)."""
    output = Path(output).expanduser().resolve()
    for p in protect:
        if p is None:
            continue
        p = Path(p).expanduser().resolve()
        if _within(output, p) or _within(p, output):
            raise DyVTEError(f"--output {output} would overwrite {p}, an input of this export; "
                             "choose another --output (never allowed, even with --force)")
    if output == Path(output.anchor) or _within(Path.cwd().resolve(), output) and output != Path.cwd().resolve():
        raise DyVTEError(f"--output {output} holds the current folder; choose another --output")
    if os.path.ismount(output):  # a mount point cannot be renamed: found out now, not after the export
        raise DyVTEError(f"--output {output} is a mount point, which cannot be replaced; export into a folder "
                         "inside it")
    if os.path.lexists(output):
        what = _not_a_package(output)
        if what and not force:
            raise DyVTEError(f"--output {output} {what}; it would be replaced by the package: choose another "
                             "--output, or pass --force to replace it")
    _check_writable_parent(output)
    return output


def _not_a_package(path: Path) -> str | None:
    """Why the existing `path` is not a package that an export may replace, or None when it is one."""
    if path.is_symlink():
        return "is a symbolic link"
    if not path.is_dir():
        return "is a file, not a package folder"
    entries = [e.name for e in path.iterdir()]
    if not entries:
        return None  # an empty folder holds nothing to lose
    manifest = path / MANIFEST
    try:
        fmt = json.loads(manifest.read_text()).get("format") if manifest.is_file() else None
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        return "is a folder that is not an export package (it has no DyVTE manifest.json)"
    others = sorted(e for e in entries if e not in PACKAGE_ENTRIES and not _HIDDEN_OWN.match(e))
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        return f"is a package that also holds files of yours ({', '.join(others[:3])}{more})"
    return None


def _check_writable_parent(output: Path) -> None:
    """The nearest existing folder above `output` must be a folder we can create entries in."""
    parent = output.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise DyVTEError(f"cannot write --output {output}: {parent} is a file, not a folder")
    probe = parent / f".{output.name}.partial-{os.getpid()}-probe"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise os_error("write --output", output, exc) from None


def remove_stale_partials(output: Path) -> list[Path]:
    """Delete `.NAME.partial-PID` / `.NAME.old-PID` folders beside `output` whose process is gone."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(partial|old)-(\d+)$")
    try:
        siblings = list(output.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        m = pattern.match(path.name)
        if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def folder_lock(folder: Path):
    """An exclusive advisory lock on `folder` (flock on the folder itself: no lock file left behind)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) through libc; False where the system or filesystem does not offer it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def swap_into_place(tmp: Path, output: Path, force: bool = False, protect: Iterable = ()) -> None:
    """Move the finished package `tmp` to `output` atomically; what was at `output` ends at `tmp`
    and is deleted. The output rules are checked again under the lock (another process may have
    put something there meanwhile)."""
    with folder_lock(output.parent):
        check_output(output, force, protect)
        if os.path.lexists(output):
            if not _renameat2(tmp, output, _RENAME_EXCHANGE):
                _two_step_replace(tmp, output)
                return
        elif not _renameat2(tmp, output, _RENAME_NOREPLACE):
            os.rename(tmp, output)
            return
        else:
            return
    # exchanged: the previous content now lies at `tmp`
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _two_step_replace(tmp: Path, output: Path) -> None:
    """Fallback without RENAME_EXCHANGE (held under the folder lock): old aside, new in, old deleted;
    a crash in between leaves `.NAME.old-PID`, which `restore_interrupted_swap` puts back."""
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def restore_interrupted_swap(output: Path) -> None:
    """A fallback swap that died between its renames left no package at `output` and the old one
    as `.NAME.old-PID`: put it back."""
    if os.path.lexists(output):
        return
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.old-(\d+)$")
    for path in output.parent.iterdir() if output.parent.is_dir() else ():
        m = pattern.match(path.name)
        if m and not _alive(int(m.group(1))):
            os.rename(path, output)
            return


def check_writable_folder(folder: str | Path, flag: str) -> Path:
    """`folder` (created if missing) when files can be written into it, else one line naming `flag`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise DyVTEError(f"cannot write into {folder}: {reason}; {flag}") from None
    return folder
