"""The offload cache's folders: keys, the sources each was made from, stale entries, listing, clearing.

Each entry is $LLMRUN_HOME/offload/<key>/ with unit-N.bin files and sources.json (the checkpoint
files it was converted from, with their sizes and mtimes). An entry whose sources are gone or changed
can never be used again (its key names the old files), so it is dropped before a new one is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llmrun.paths import llmrun_home
from llmrun.storage import atomic_write_bytes, process_alive, writing_under

SOURCES_FILE = "sources.json"
UNDESCRIBED_GRACE_SECONDS = 600  # an entry without sources.json younger than this may be being made


@dataclass(frozen=True)
class OffloadEntry:
    path: Path
    size_bytes: int
    sources: tuple[str, ...]  # the checkpoint files it was converted from
    stale: bool  # a source is gone or changed: the entry can never be used again


def offload_root() -> Path:
    return llmrun_home() / "offload"


def entry_folder(source_files: list[Path], dtype_name: str) -> Path:
    """The entry for these checkpoint files (path, size, mtime) converted to `dtype_name`."""
    digest = hashlib.sha256(dtype_name.encode())
    for record in _describe(source_files):
        digest.update(f"{record['path']}|{record['size']}|{record['mtime_ns']}".encode())
    return offload_root() / digest.hexdigest()[:24]


def prepare_entry(folder: Path, source_files: list[Path]) -> None:
    """Drop stale entries, then create `folder` with its sources.json (StorageError when unwritable)."""
    drop_stale_entries()
    with writing_under(folder.parent):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / SOURCES_FILE).is_file():
            text = json.dumps(_describe(source_files), indent=2) + "\n"
            atomic_write_bytes(folder / SOURCES_FILE, text.encode("utf-8"))
    _drop_dead_temp_files(folder)


def list_entries() -> list[OffloadEntry]:
    """Every entry of the offload cache, sorted by path (an absent or unreadable cache is empty)."""
    try:
        folders = sorted(p for p in offload_root().iterdir() if p.is_dir())
    except OSError:
        return []
    return [_entry(folder) for folder in folders]


def drop_stale_entries() -> None:
    """Remove entries whose sources are gone or changed (best effort, never raises)."""
    for entry in list_entries():
        if entry.stale:
            shutil.rmtree(entry.path, ignore_errors=True)


def clear() -> tuple[int, int]:
    """Remove every entry; (entries removed, bytes freed). They are rebuilt when next needed."""
    entries = list_entries()
    for entry in entries:
        shutil.rmtree(entry.path, ignore_errors=True)
    return len(entries), sum(entry.size_bytes for entry in entries)


def cache_report() -> str:
    """What `llmrun cache` prints: one line per entry (size, state, sources), then the total."""
    from llmrun.sizes import format_bytes

    entries = list_entries()
    lines = [f"{format_bytes(e.size_bytes):>10}  {'stale' if e.stale else 'current'}  {e.path.name}  "
             f"{', '.join(e.sources) or '(sources unknown)'}" for e in entries]
    total = sum(e.size_bytes for e in entries)
    lines.append(f"{format_bytes(total)} in {len(entries)} entries under {offload_root()} "
                 "(`llmrun cache --clear` removes them)")
    return "\n".join(lines)


def clear_report() -> str:
    """Empty the cache; what `llmrun cache --clear` prints."""
    from llmrun.sizes import format_bytes

    count, freed = clear()
    return f"removed {count} entries ({format_bytes(freed)}) from {offload_root()}"


def _entry(folder: Path) -> OffloadEntry:
    size = sum(_size(file) for file in folder.iterdir()) if folder.is_dir() else 0
    try:
        records = json.loads((folder / SOURCES_FILE).read_text(encoding="utf-8"))
        sources = tuple(str(record["path"]) for record in records)
        stale = any(not _unchanged(record) for record in records)
    except (OSError, ValueError, KeyError, TypeError):
        sources = ()
        stale = time.time() - _mtime(folder) > UNDESCRIBED_GRACE_SECONDS
    return OffloadEntry(folder, size, sources, stale)


def _describe(source_files: list[Path]) -> list[dict]:
    records = []
    for file in sorted(set(source_files)):
        stat = file.stat()
        records.append({"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return records


def _unchanged(record: dict) -> bool:
    try:
        stat = os.stat(record["path"])
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (record["size"], record["mtime_ns"])


def _drop_dead_temp_files(folder: Path) -> None:
    """Remove `.unit-N.bin.<pid>.tmp` files whose writing process is gone (killed mid-write)."""
    try:
        temps = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    except OSError:
        return
    for temp in temps:
        pid = temp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not process_alive(int(pid)):
            temp.unlink(missing_ok=True)


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
