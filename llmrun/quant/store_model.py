"""`llmrun quantize`: a float model written to llmrun's store with its matmul weights compressed.

The entry is staged in a temporary folder and renamed into place (hub/store.py), so an interrupted
quantize leaves no entry and no half-written file; an existing name is replaced only with --force.
Kept tensors (embeddings, norms) are stored in 16 bits: float32 ones become bfloat16.
"""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmrun.errors import StoreConflictError, UsageError
from llmrun.quant.spec import QuantSpec, check_groups, is_quantized

_NOT_COPIED = {"model.safetensors.index.json", "llmrun.json"}


@dataclass(frozen=True)
class QuantizedModel:
    name: str
    path: Path
    source_name: str
    description: str  # QuantMetadata.describe(): "21 layer matmuls in int4 g64, the head/embeddings in ..."
    size_bytes: int
    source_bytes: int


def quantize_to_store(model: str, spec: QuantSpec, name: str | None, force: bool,
                      on_tensor: Callable[[int, int], None] = lambda done, total: None,
                      calibration_text: tuple[str, str] | None = None,
                      on_calibrating: Callable[[int, int], None] = lambda done, total: None) -> QuantizedModel:
    """Quantize `model` (resolved, or pulled, as `run` does) into the store entry `name`. With
    `calibration_text` (file name, text; int4 only) the float model first runs the text for each
    input's importance (quant/calibrate.py), its tokens reported by `on_calibrating(done, total)`."""
    from llmrun.hub.store import StoreMetadata, entry_path, staged_entry, write_metadata
    from llmrun.plan.inputs import folder_inputs
    from llmrun.quant.quantize import quantize_index
    from llmrun.runtime import present_or_pulled

    source = present_or_pulled(model)
    inputs = folder_inputs(source.path, source.name)
    if is_quantized(inputs.index):
        raise UsageError(f"{source.name} is already quantized; quantize its float original instead")
    check_groups(inputs.index, spec)
    target = name if name is not None else f"{source.name}-{spec.label}"
    final = entry_path(target)
    if final.exists() and not force:
        raise StoreConflictError(f"the store already has a model called '{final.name}'; "
                                 f"pass --force to replace it, or --name to choose another name")
    calibration = None
    if calibration_text is not None:
        from llmrun.quant.calibrate import calibrate
        from llmrun.quant.spec import compressed, in_layer

        if spec.bits != 4:
            raise UsageError("--calibrate weighs int4 fits; int8 is quantized without it")
        layer_names = [n for n, s in compressed(inputs.index, spec).items() if in_layer(n) and s.bits == 4]
        file_name, text = calibration_text
        calibration = calibrate(Path(source.path), text, file_name, layer_names, on_calibrating)
    with staged_entry(target) as staging:
        for file in sorted(Path(source.path).iterdir()):
            if file.is_file() and file.suffix != ".safetensors" and file.name not in _NOT_COPIED:
                shutil.copy2(file, staging / file.name)
        meta = quantize_index(inputs.index, spec, staging / "model.safetensors", keep_floats=True,
                              on_tensor=on_tensor, calibration=calibration)
        created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
        write_metadata(staging, StoreMetadata(source="quantize", original_file=str(Path(source.path).resolve()),
                                              sha256="", created=created, quant=meta.summary()))
    size = sum(f.stat().st_size for f in final.iterdir() if f.suffix == ".safetensors")
    return QuantizedModel(final.name, final, source.name, meta.describe(), size,
                          inputs.index.total_bytes)
