"""Quantized tensors of a checkpoint (llmrun/quant/stored.py): each file's metadata block checked, the
decoder's layout rewritten so their packed parts load, stage and stream like any other tensor, and the
parts put back together as QuantWeights where a layer uses them.

A layout key whose tensors are compressed (`qkv`: q, k and v) becomes the key itself for the packed
values and companions `qkv_scales`, `qkv_mins` (or the two-level `qkv_scale_codes`, `qkv_super_scales`,
...), each stacking its tensors' parts along the outputs as the float weights are stacked. Scales and
minimums are read as raw bytes (the loader converts float tensors to the run dtype; these must stay
exact) and viewed as their float type when assembled; those of a streamed unit are staged as float32
(`QuantLayout.streamed`), so its QuantWeights are views of the staging slot. Tensors of one key in different formats (a
GGUF's Q4_K beside Q6_K) take keys of their own (`qkv`, `qkv_1`) and are stacked when assembled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from llmrun.errors import InvalidModelError
from llmrun.quant.format import QuantWeight, concat_quant
from llmrun.quant.stored import METADATA_KEY, QuantMetadata, TensorFormat, TwoLevel, check_consistent, split_parts
from llmrun.weights.index import DTYPE_BYTES, CheckpointIndex, read_header
from llmrun.weights.loader import PackedTensor

_FLOAT_PARTS = {"scales", "mins", "super_scales", "super_mins"}


def quant_metadata(index: CheckpointIndex) -> QuantMetadata:
    """The checkpoint's quantized tensors and their formats, from every file that holds a part;
    InvalidModelError (one line, naming the file) when a block is missing or disagrees with the file."""
    by_file: dict = {}
    for name, info in index.tensors.items():
        by_file.setdefault(info.file, set()).add(name)
    formats: dict[str, TensorFormat] = {}
    kept: list[str] = []
    sources: list[str] = []
    for file, names in sorted(by_file.items()):
        header, _ = read_header(file)
        text = (header.get("__metadata__") or {}).get(METADATA_KEY)
        quantized, _ = split_parts(names)
        if not quantized and text is None:
            continue
        meta = QuantMetadata.from_json(text, str(file))
        check_consistent(meta, names, str(file))
        formats.update(meta.tensors)
        kept += meta.kept_16bit
        sources.append(meta.source)
    return QuantMetadata(formats, tuple(kept), " + ".join(dict.fromkeys(sources)))


@dataclass(frozen=True)
class KeyFormat:
    """How the parts staged under one layout key make a QuantWeight."""

    fmt: TensorFormat  # the stacked weight's format (out_features summed over its tensors)
    parts: tuple[str, ...]  # which parts are staged: qweight, scales, mins | scale_codes, super_scales, ...
    float_tags: tuple[tuple[str, str], ...]  # part -> the float type its bytes hold (F16 or F32)


class QuantLayout:
    """A checkpoint's quantized formats: rewrites a unit's layout into staged parts (`unit`)."""

    def __init__(self, index: CheckpointIndex):
        self.meta = quant_metadata(index)
        self.formats = self.meta.tensors
        tensors = dict(index.tensors)
        for name in self.formats:
            for part in _FLOAT_PARTS:
                info = tensors.get(f"{name}.{part}")
                if info is not None:  # raw bytes: the loader leaves them as they are
                    tensors[info.name] = replace(info, dtype="U8",
                                                 shape=(info.shape[0], info.shape[1] * DTYPE_BYTES[info.dtype]))
        self.byte_index = CheckpointIndex(index.folder, tensors)
        self._tags = {n: index[n].dtype for n in index.tensors if n.rpartition(".")[2] in _FLOAT_PARTS}
        self._float_infos = {n: index[n] for n in self._tags}

    def streamed(self, packs: list[PackedTensor]) -> list[PackedTensor]:
        """A streamed unit's tensors as they are staged: scales and minimums (float16 or float32
        bytes) read as their float type and staged as float32, converted (exactly) by whoever fills
        the slot, so a step's QuantWeights are views of the slot, made once (PlacedWeights.layer).
        The plan counts these parts as float32 already (quant/spec.part_memory_bytes)."""
        out = []
        for packed in packs:
            infos = [self._float_infos.get(part.name) for part in packed.parts]
            if all(infos):
                packed = PackedTensor(packed.key, tuple(infos), (packed.shape[0], infos[0].shape[1]), "F32")
            out.append(packed)
        return out

    def __bool__(self) -> bool:
        return bool(self.formats)

    def unit(self, layout: dict[str, tuple[str, ...]]) -> tuple[dict[str, tuple[str, ...]], "UnitParts"]:
        """(the layout with each compressed key's tensors replaced by their parts, how to put them back)."""
        out: dict[str, tuple[str, ...]] = {}
        parts = UnitParts()
        for key, names in layout.items():
            quantized = [n in self.formats for n in names]
            if not any(quantized):
                out[key] = names
                continue
            if not all(quantized):
                raise InvalidModelError(f"{names[quantized.index(False)]} is stored in float beside quantized "
                                        f"tensors it is fused with ({', '.join(names)}); quantize all or none")
            runs = _runs(names, self._signature)
            staged = [key if i == 0 else f"{key}_{i}" for i in range(len(runs))]
            for sub, run in zip(staged, runs):
                out.update(self._parts(parts, sub, run))
            parts.merged[key] = tuple(staged)
        return out, parts

    def _signature(self, name: str) -> tuple:
        """What tensors must share to stack their parts: format (less the outputs) and each part's dtype."""
        fmt = self.formats[name]
        parts = tuple((p, self._tags.get(f"{name}.{p}", "")) for p in ("mins", "min_codes", *sorted(_FLOAT_PARTS))
                      if f"{name}.{p}" in self.byte_index)
        return fmt.bits, fmt.group_size, fmt.in_features, fmt.super_group, parts

    def _parts(self, unit: "UnitParts", key: str, names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        first = self.formats[names[0]]
        fmt = replace(first, out_features=sum(self.formats[n].out_features for n in names))
        if first.super_group:
            parts = ["qweight", "scale_codes", "super_scales"]
            parts += ["min_codes", "super_mins"] if f"{names[0]}.min_codes" in self.byte_index else []
        else:
            parts = ["qweight", "scales"] + (["mins"] if f"{names[0]}.mins" in self.byte_index else [])
        missing = [f"{n}.{p}" for n in names for p in parts if f"{n}.{p}" not in self.byte_index]
        if missing:
            raise InvalidModelError(f"{self.byte_index.folder} lacks tensor {missing[0]}")
        tags = tuple((p, self._tags[f"{names[0]}.{p}"]) for p in parts if p in _FLOAT_PARTS)
        unit.keys[key] = KeyFormat(fmt, tuple(parts), tags)
        staged = {_staged_name(key, p): tuple(f"{n}.{p}" for n in names) for p in parts}
        unit.staged.update(staged)
        return staged


class UnitParts:
    """One unit's compressed keys: which staged tensors make each QuantWeight."""

    def __init__(self):
        self.keys: dict[str, KeyFormat] = {}  # staged key -> its format
        self.merged: dict[str, tuple[str, ...]] = {}  # layout key -> staged keys stacked into it
        self.staged: dict[str, tuple[str, ...]] = {}  # every staged part's key

    def __bool__(self) -> bool:
        return bool(self.merged)

    def assemble(self, tensors: Mapping) -> dict:
        """A unit's staged tensors with each compressed key's parts made one QuantWeight."""
        out = {k: v for k, v in tensors.items() if k not in self.staged}
        for key in self.merged:
            if key in tensors:
                out[key] = self.weight(tensors, key)
        return out

    def weight(self, tensors: Mapping, key: str) -> QuantWeight:
        """The QuantWeight of layout key `key` from its staged parts in `tensors`."""
        return concat_quant([self._one(tensors, sub) for sub in self.merged[key]])

    def _one(self, tensors: Mapping, key: str) -> QuantWeight:
        kf = self.keys[key]
        fmt, tags = kf.fmt, dict(kf.float_tags)

        def part(name: str) -> torch.Tensor:
            value = tensors[_staged_name(key, name)]
            if name in tags and value.dtype == torch.uint8:  # raw bytes [rows, cols * size] -> the float type
                value = value.view(torch.float16 if tags[name] == "F16" else torch.float32)
            return value  # (a streamed unit's scales and mins arrive as float32: QuantLayout.streamed)

        if fmt.super_group:
            scales = TwoLevel(part("scale_codes"), part("super_scales")).expand(fmt.group_size, fmt.super_group)
            mins = None
            if "min_codes" in kf.parts:
                mins = TwoLevel(part("min_codes"), part("super_mins")).expand(fmt.group_size, fmt.super_group)
        else:
            scales = part("scales").to(torch.float32)
            mins = part("mins").to(torch.float32) if "mins" in kf.parts else None
        return QuantWeight(fmt.bits, fmt.group_size, fmt.out_features, fmt.in_features, part("qweight"),
                           scales, mins)


def _staged_name(key: str, part: str) -> str:
    return key if part == "qweight" else f"{key}_{part}"


def _runs(names: tuple[str, ...], signature) -> list[tuple[str, ...]]:
    """Consecutive tensors of one signature (their parts stack byte for byte), in layout order."""
    runs: list[list[str]] = []
    previous = None
    for name in names:
        if signature(name) != previous:
            runs.append([])
            previous = signature(name)
        runs[-1].append(name)
    return [tuple(run) for run in runs]


def quant_table(layout: QuantLayout, reader, name: str) -> QuantWeight:
    """A compressed tensor that is not a matmul (an embedding table) as one QuantWeight on the CPU:
    its rows are dequantized as they are looked up."""
    from llmrun.weights.loader import pack_layout, torch_dtype

    staged, parts = layout.unit({"table": (name,)})
    tensors = {p.key: reader.load_packed(p, torch_dtype(p.parts[0].dtype))
               for p in pack_layout(layout.byte_index, staged)}
    return parts.weight(tensors, "table")
