"""Which bytes of a file the page cache holds now: mincore over a read-only mapping (no page is read).

Where mincore cannot be asked (no libc mmap/mincore, a file that cannot be mapped), the answer is
None and the estimate falls back on free memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value
_LOW_BIT = bytes(b & 1 for b in range(256))


@lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


def _resident_pages(fd: int, first_page: int, num_pages: int) -> Optional[int]:
    """How many of the file's pages [first_page, first_page + num_pages) are in the page cache."""
    libc = _libc()
    if libc is None:
        return None
    length = num_pages * _PAGE
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, first_page * _PAGE)
    if address in (None, _MAP_FAILED):
        return None
    try:
        vector = (ctypes.c_ubyte * num_pages)()
        if libc.mincore(ctypes.c_void_p(address), length, vector) != 0:
            return None
        return bytes(vector).translate(_LOW_BIT).count(1)  # only bit 0 has a meaning
    finally:
        libc.munmap(ctypes.c_void_p(address), length)


def resident_fraction(ranges: list[tuple[Path, int, int]]) -> Optional[float]:
    """The fraction of the bytes in `ranges` ([start, end) of each file) that the page cache holds.

    Bytes past a file's end (header-only checkpoints) count as not held. None: cannot be told."""
    total = held = 0
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for file, start, end in ranges:
        if end > start:
            by_file.setdefault(Path(file), []).append((start, end))
            total += end - start
    if not total:
        return 1.0
    for file, spans in by_file.items():
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            for start, end in spans:
                end = min(end, size)
                if end <= start:
                    continue
                first, last = start // _PAGE, (end - 1) // _PAGE
                pages = _resident_pages(fd, first, last - first + 1)
                if pages is None:
                    return None
                held += min(pages * _PAGE, end - start)
        finally:
            os.close(fd)
    return held / total


def drop_from_page_cache(fd: int) -> None:
    """Ask the kernel to forget a (written back) file's cached pages; a no-op where it cannot."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
