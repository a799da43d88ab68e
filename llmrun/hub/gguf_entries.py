"""Which store entry a GGUF file made, and whether it can serve again: the name a GGUF run by path
gets, the entry's record of its file (size, mtime, sha256) against the file as it is now."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from llmrun.errors import InvalidModelError
from llmrun.hub.source import ModelSource, validate_model_folder
from llmrun.hub.store import entry_path, read_metadata, store_name, write_metadata

_SHA256_SEEN: dict[tuple[str, int, int], str] = {}


def path_entry_name(gguf_file: Path) -> str:
    """The store name for a GGUF run by path: `stem-<8 hex digits of the resolved path's sha256>`."""
    resolved = Path(gguf_file).resolve()
    return store_name(f"{resolved.stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}")


def reusable_entry(gguf_file: Path, entry_name: str, keep_quant: bool = False) -> ModelSource | None:
    """The complete store entry `entry_name` when it was imported from this very file, with its
    quantization kept (`keep_quant`) or dequantized as asked, else None."""
    folder = entry_path(entry_name)
    if not imported_from(gguf_file, entry_name):
        return None
    metadata = read_metadata(folder)
    if metadata is None or (metadata.quant is not None) != keep_quant:
        return None
    try:
        validate_model_folder(folder)
    except InvalidModelError:
        return None  # damaged since: import it again
    return ModelSource(name=entry_name, path=folder, source="store")


def imported_from(gguf_file: Path, entry_name: str) -> bool:
    """Whether the entry `entry_name` was made from this file's contents (complete or not).

    Size and mtime decide without reading the file; a new mtime with the same size costs one
    sha256, after which the entry's llmrun.json records the new mtime so the next check is free.
    """
    folder = entry_path(entry_name)
    metadata = read_metadata(folder)
    if metadata is None or metadata.source != "gguf-import":
        return False
    stat = gguf_file.stat()
    if stat.st_size != metadata.original_size_bytes:
        return False
    if (metadata.original_file, metadata.original_mtime_ns) == (str(gguf_file), stat.st_mtime_ns):
        return True
    if file_sha256(gguf_file) != metadata.sha256:
        return False
    if not metadata.original_file.startswith("pypi:"):
        try:  # an optimisation only: a read-only store (plan, run) costs a hash next time, no error
            write_metadata(folder, replace(metadata, original_file=str(gguf_file),
                                           original_mtime_ns=stat.st_mtime_ns))
        except OSError:
            pass
    return True


def made_from(entry_name: str) -> str:
    """' (imported from FILE)' for the entry's message, or '' where it has no llmrun.json."""
    metadata = read_metadata(entry_path(entry_name))
    return f" (imported from {metadata.original_file})" if metadata is not None else ""


def file_sha256(path: Path) -> str:
    """The file's sha256, read once per (path, size, mtime) in this process."""
    stat = Path(path).stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_SEEN:
        _SHA256_SEEN[key] = _read_sha256(path)
    return _SHA256_SEEN[key]


def _read_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
