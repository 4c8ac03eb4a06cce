"""Disk writes that fail in one line: what could not be written, where, and why.

A full disk surfaces differently depending on the writer: an ``OSError`` from Python's file
objects, a ``RuntimeError`` from torch.save's zip writer ("unexpected pos ..."), a
``SafetensorError`` ("os error 28"), or any of these wrapped in DCP's ``CheckpointException``.
``io_failure`` finds the reason in any of them, so every writer reports the same clear line
and a real bug (anything else) still shows its traceback.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; pick a folder you can write to",
    errno.EACCES: "no permission; pick a folder you can write to",
    errno.EPERM: "no permission; pick a folder you can write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder; pick another path",
    errno.EISDIR: "it is a folder; pick a file path",
    errno.ENAMETOOLONG: "shorten the path",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written; str(e) is one line naming the folder and the fix.
    Defined here, not in vitboost.checkpoint, so the CLI catches it without importing DCP."""


class WriteError(Exception):
    """Something could not be written; str(e) is one line naming the path, the reason and what to do."""


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path, the system's reason, and what to do about it."""
    where = f" {e.filename}" if e.filename else ""
    hint = _HINTS.get(e.errno or 0)
    return f"cannot use{where}: {e.strerror or e}" + (f"; {hint}" if hint else "")


def io_failure(exc: BaseException, path: Path) -> str | None:
    """Why writing under ``path`` failed, if ``exc`` is a storage failure; None if it is something else
    (a bug keeps its traceback)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            return e.strerror or os.strerror(e.errno)
        code = re.search(r"os error (\d+)", str(e))
        if code:
            return os.strerror(int(code.group(1)))
        if isinstance(e, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter", str(e)):
            # torch.save's zip writer hides the errno: say what the disk says
            return "No space left on device" if _nearly_full(path) else "the write failed (I/O error)"
    return None


def _chain(exc: BaseException):
    """exc, what caused it, and what DCP wrapped (CheckpointException.failures: rank -> (exc, trace))."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(existing_ancestor(path)).free < 1 << 20
    except OSError:
        return False


def existing_ancestor(path: Path) -> Path:
    """path itself, or its nearest parent that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def uncreatable(folder: Path) -> str | None:
    """Why ``folder`` cannot be created or written (checked before any work), or None if it can."""
    folder = Path(folder).expanduser()
    base = existing_ancestor(folder)
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            readonly = False
        return f"{base} is on a read-only file system" if readonly else f"{base} is not writable"
    return None


def write_synced(data: bytes, path: Path) -> None:
    """Write a small file with Python's file object (a full disk raises OSError with its errno, unlike
    torch.save's writer) and fsync it, so a rename never exposes a partial file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
