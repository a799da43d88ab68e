"""llmrun's own files on disk: filesystem failures under its folders as one-line StorageErrors, atomic writes."""

from __future__ import annotations

import errno
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmrun.errors import StorageError

_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
_IN_THE_WAY = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
_OS_ERROR_RE = re.compile(r"os error (\d+)")


@contextmanager
def writing_under(folder: Path, setting: str = "LLMRUN_HOME") -> Iterator[None]:
    """Turn an OSError raised while writing under `folder` into a StorageError naming the path.

    `setting` is the environment variable that moves the folder, named in the advice.
    """
    try:
        yield
    except OSError as err:
        raise storage_error(err, Path(folder), setting) from None


def storage_error(err: OSError, folder: Path, setting: str = "LLMRUN_HOME") -> StorageError:
    """One line: the path that failed, what happened, and what to do about it."""
    path = Path(err.filename) if isinstance(err.filename, (str, os.PathLike)) else Path(folder)
    if err.errno in _IN_THE_WAY:
        blocker = _file_in_the_way(path)
        if blocker is not None:
            return StorageError(f"cannot write {path}: {blocker} is a file, not a folder; "
                                f"move it away or set {setting} to another folder")
    reason = (err.strerror or str(err)).lower()
    if err.errno in _FULL:
        advice = f"free some disk space, or set {setting} to a folder on a disk with room"
    elif err.errno in _DENIED:
        advice = f"make it writable, or set {setting} to a folder you can write"
    else:
        advice = f"check the folder, or set {setting} to another folder"
    return StorageError(f"cannot write {path}: {reason}; {advice}")


def os_error_of(err: Exception, path: Path) -> OSError | None:
    """The OSError inside a library's error text ('... (os error 28)'), e.g. safetensors' writer's."""
    found = _OS_ERROR_RE.search(str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs: a temporary file named after a dead one is a leftover."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it runs, under another user
    return True


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor (or `path` itself) that is not a folder, if any."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return None if candidate.is_dir() else candidate
        except OSError:
            return None
    return None
