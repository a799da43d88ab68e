"""The weights of a GGUF import that keeps the file's quantization: each tensor under transformers'
name, quantized blocks in llmrun's format with their exact values, the rest dequantized and named.

Names and tensor processing (llama.cpp's q/k row order undone, ...) are transformers', exactly as
its GGUF loader applies them, so the result holds the weights `--dequantize` would write. A
quantized tensor is kept only where that processing is a reordering of whole rows and llmrun's
reference dequantize of the kept form equals gguf's own dequantize after it, value for value;
every other tensor is stored dequantized (float32) and reported with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmrun.errors import InvalidModelError
from llmrun.hub.gguf_blocks import KeptWeight, kept_types, read_blocks
from llmrun.hub.gguf_header import GgufTensor, tensor_layout
from llmrun.quant.format import dequantize
from llmrun.quant.stored import QuantMetadata, TensorFormat, save_quantized

# GGML float types stored as they are (numpy dtype of the stored copy); BF16 via gguf's reader.
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass
class KeptReport:
    """What a kept import did with each tensor."""

    kept: dict[str, str] = field(default_factory=dict)  # transformers name -> GGML type kept
    floats: dict[str, str] = field(default_factory=dict)  # name -> GGML float type (F32, F16, BF16)
    dequantized: dict[str, str] = field(default_factory=dict)  # name -> "GGML type: why"
    metadata: QuantMetadata = field(default_factory=lambda: QuantMetadata({}))  # the file's llmrun.quant block

    def summary(self) -> dict:
        """llmrun.json's record: the block's summary, how many tensors of each GGML type were kept,
        and what was dequantized."""
        return {**self.metadata.summary(), "kept": _counts(self.kept.values()),
                "float": _counts(self.floats.values()), "dequantized": dict(sorted(self.dequantized.items()))}

    def notes(self) -> list[str]:
        """What the import says: the types kept, and every tensor dequantized (with why)."""
        kept = ", ".join(f"{n} {t}" for t, n in _counts(self.kept.values()).items()) or "none"
        floats = ", ".join(f"{n} {t}" for t, n in _counts(self.floats.values()).items()) or "none"
        lines = [f"kept the GGUF's quantized tensors: {kept}; float tensors as they are: {floats}"]
        if self.dequantized:
            shown = "; ".join(f"{name} ({why})" for name, why in sorted(self.dequantized.items()))
            lines.append(f"dequantized to float32 ({len(self.dequantized)}): {shown}")
        return lines


def _counts(type_names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for type_name in type_names:
        counts[type_name] = counts.get(type_name, 0) + 1
    return dict(sorted(counts.items()))


def checked_layout(gguf_file: Path) -> list[GgufTensor]:
    """The file's tensors, each of a GGML type gguf can read; InvalidModelError (one line) otherwise."""
    from importlib.metadata import version

    import gguf

    try:
        layout = tensor_layout(gguf_file)
    except (ValueError, OSError) as err:
        raise InvalidModelError(f"cannot read {gguf_file.name}'s header: {err}") from None
    readable = {t.value for t in gguf.GGMLQuantizationType if _gguf_reads(t.name)}
    for tensor in layout:
        if tensor.ggml_type not in readable:
            known = {t.value: t.name for t in gguf.GGMLQuantizationType}
            what = known.get(tensor.ggml_type, f"number {tensor.ggml_type}, unknown to gguf {version('gguf')} "
                                               "(a newer llama.cpp format?)")
            raise InvalidModelError(f"{gguf_file.name}: tensor '{tensor.name}' has GGML type {what}, "
                                    "which llmrun cannot read")
    return layout


def _gguf_reads(type_name: str) -> bool:
    import gguf.quants

    return type_name in _FLOAT_TYPES or any(t.name == type_name for t in gguf.quants._type_traits)


def write_kept_weights(gguf_file: Path, target: Path, model, gguf_config: dict, architecture: str) -> KeptReport:
    """Write `target` (one safetensors file with the llmrun.quant block) from `gguf_file`'s tensors.

    `model` is the transformers model on the meta device the names are mapped with; `gguf_config` the
    config dict transformers' GGUF loader hands its tensor processor for `architecture`.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=gguf_config)
    name_map = get_gguf_hf_weights_map(model, processor)
    data = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    report, tensors, formats = KeptReport(), {}, {}
    for tensor in checked_layout(gguf_file):
        type_name = gguf.GGMLQuantizationType(tensor.ggml_type).name
        raw = _raw_bytes(data, tensor, type_name)
        expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(tensor.ggml_type))
        processed = processor.process(weights=expected, name=tensor.name, tensor_key_mapping=name_map,
                                      parsed_parameters={"tensors": {}, "config": dict(gguf_config)})
        if processed.name not in name_map:
            continue  # transformers' loader skips it too (e.g. rope_freqs)
        name = name_map[processed.name]
        values = torch.from_numpy(np.array(processed.weights, dtype=np.float32))
        if type_name in _FLOAT_TYPES:
            tensors[name] = _float_copy(values, _FLOAT_TYPES[type_name])
            report.floats[name] = type_name
            continue
        kept, reason = _kept_form(processor, tensor, type_name, raw, values, name_map)
        if kept is None:
            tensors[name] = values
            report.dequantized[name] = f"{type_name}: {reason}"
            continue
        tensors.update(kept.stored(name))
        out_features, in_features = kept.values.shape
        formats[name] = TensorFormat(kept.bits, kept.group_size, out_features, in_features,
                                     kept.super_group, f"gguf:{type_name}")
        report.kept[name] = type_name
    _check_complete(model, set(report.kept) | set(report.floats) | set(report.dequantized), gguf_file)
    report.metadata = QuantMetadata(formats, tuple(sorted(report.floats)), f"kept from GGUF {gguf_file.name}")
    save_quantized(target, tensors, report.metadata)
    return report


def _raw_bytes(data: np.ndarray, tensor: GgufTensor, type_name: str) -> np.ndarray:
    """The tensor's bytes as gguf's dequantize takes them: [..., bytes a row]."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor.ggml_type)]
    row = tensor.dims[0]
    num_bytes = int(np.prod(tensor.dims)) // block * size
    if row % block or tensor.start + num_bytes > data.shape[0]:
        raise InvalidModelError(f"{tensor.name} ({type_name}, {list(tensor.shape)}) does not fit the file "
                                "(the file may be truncated or corrupt)")
    raw = data[tensor.start:tensor.start + num_bytes]
    if type_name == "F32":
        return raw.view(np.float32).reshape(tensor.shape)
    if type_name == "F16":
        return raw.view(np.float16).reshape(tensor.shape)
    return raw.reshape(*tensor.shape[:-1], row // block * size)


def _float_copy(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The processed float tensor in its GGUF dtype where that holds it exactly, else float32."""
    narrow = values.to(dtype)
    return narrow if torch.equal(narrow.to(torch.float32), values) else values


def _kept_form(processor, tensor: GgufTensor, type_name: str, raw: np.ndarray, expected: torch.Tensor,
               name_map: dict) -> tuple[KeptWeight | None, str]:
    """(the tensor in llmrun's format, "") when it can be kept exactly, else (None, the reason)."""
    if type_name not in kept_types():
        return None, "no exact llmrun form"
    if len(tensor.shape) != 2:
        return None, f"{len(tensor.shape)}-dimensional"
    out_features, in_features = tensor.shape
    order = _row_order(processor, tensor, name_map)
    if order is None or tuple(expected.shape) != (out_features, in_features):
        return None, "transformers reshapes it beyond a reordering of rows"
    kept = read_blocks(type_name, raw, out_features, in_features).rows(order)
    if not torch.equal(dequantize(kept.quant_weight()), expected):
        return None, "its kept form does not dequantize to gguf's values"
    return kept, ""


def _row_order(processor, tensor: GgufTensor, name_map: dict) -> torch.Tensor | None:
    """Which source row each output row is, found by processing the row numbers; None if not a reordering."""
    rows = tensor.shape[0]
    numbers = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    result = processor.process(weights=numbers, name=tensor.name, tensor_key_mapping=name_map,
                               parsed_parameters={"tensors": {}, "config": {}})
    moved = np.asarray(result.weights)
    if moved.shape != (rows, 1) or sorted(moved[:, 0].tolist()) != list(range(rows)):
        return None
    return torch.from_numpy(moved[:, 0].astype(np.int64))


def _check_complete(model, written: set[str], gguf_file: Path) -> None:
    """Every weight the model has (a tied head aside) came from the file; InvalidModelError otherwise."""
    wanted = set(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        wanted.discard("lm_head.weight")
    missing = sorted(wanted - written)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InvalidModelError(f"{gguf_file.name} has no tensor for {missing[0]}{more}")
