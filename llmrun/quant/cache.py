"""The quantize-on-load cache: a float checkpoint's compressed tensors, quantized once per `--quant`.

Entries live in the offload cache's folders ($LLMRUN_HOME/offload/<key>/, weights/offload_cache.py):
the key names the source files (path, size, mtime) and the spec, so a changed checkpoint gets a new
entry and the old one is dropped as stale; `llmrun cache` lists them and `--clear` removes them. The
file is written to a temporary name and renamed: an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from llmrun.quant.spec import QuantSpec, check_groups, compressed
from llmrun.storage import writing_under
from llmrun.weights import offload_cache
from llmrun.weights.index import CheckpointIndex, index_file

CACHE_FILE = "quantized.safetensors"


def entry_file(index: CheckpointIndex, spec: QuantSpec) -> Path:
    files = sorted({info.file for info in index.tensors.values()})
    from llmrun.quant.quantize import QUANTIZER_VERSION
    from llmrun.quant.spec import HEAD_SPEC  # (as it is now: scripts/quant_choices.py changes it)

    # the key names the quantizer and the head's format too: a changed fit never reuses values of the old one
    head = HEAD_SPEC.label if HEAD_SPEC is not None else "16-bit"
    return offload_cache.entry_folder(files, f"quant:{spec.label}:head-{head}:v{QUANTIZER_VERSION}") / CACHE_FILE


def quantized_on_load(index: CheckpointIndex, spec: QuantSpec,
                      on_tensor: Callable[[int, int], None] = lambda done, total: None) -> CheckpointIndex:
    """The index to load from: the float tensors kept, the compressed ones from the cache entry (made
    now when absent, reporting `on_tensor(done, total)`)."""
    from llmrun.quant.quantize import quantize_index

    check_groups(index, spec)
    file = entry_file(index, spec)
    if not file.is_file():
        files = sorted({info.file for info in index.tensors.values()})
        offload_cache.prepare_entry(file.parent, files)
        with writing_under(file.parent):
            quantize_index(index, spec, file, keep_floats=False, on_tensor=on_tensor)
    replaced = compressed(index, spec)
    tensors = {n: info for n, info in index.tensors.items() if n not in replaced}
    tensors.update(index_file(file))
    return CheckpointIndex(index.folder, tensors)
