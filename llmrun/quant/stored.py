"""The quantized-weight format on disk (issue 16): safetensors files of QuantWeights (quant/format.py)
and their metadata block.

Tensors are named after the float weight "<name>" they replace: "<name>.qweight", "<name>.scales",
"<name>.mins" (if any), scales/mins in float32 or float16 (only where float16 holds them exactly); or,
two-level (GGUF K-quants), "<name>.scale_codes" / "<name>.min_codes" uint8 [out, groups] with
"<name>.super_scales" / "<name>.super_mins" float16 [out, in // super_group]: scale = super_scales *
scale_codes and min = super_mins * min_codes (so a Q4_K min, -dmin * m, is stored with super_mins =
-dmin), expanded to float32 at load (exact: an fp16 times a 6-bit integer fits float32). The
safetensors `__metadata__` key "llmrun.quant" holds a JSON block (`QuantMetadata`) listing every
quantized tensor with its bits, group, super group and source, and the float tensors kept in 16 bits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from llmrun.errors import InvalidModelError
from llmrun.quant.format import QuantWeight
from llmrun.quant.spec import in_layer

FORMAT_VERSION = 1
METADATA_KEY = "llmrun.quant"
PARTS = ("qweight", "scales", "mins", "scale_codes", "min_codes", "super_scales", "super_mins")


@dataclass(frozen=True)
class TensorFormat:
    """How one stored weight is quantized (one entry of the metadata block)."""

    bits: int
    group_size: int
    out_features: int
    in_features: int
    super_group: int = 0  # 0: one-level scales; else the inputs one super scale covers (two-level form)
    source: str = "llmrun"  # "llmrun" (quantized here) or "gguf:Q4_K" etc. (kept from a GGUF type)

    def to_json(self) -> dict:
        return {"bits": self.bits, "group": self.group_size, "shape": [self.out_features, self.in_features],
                "super_group": self.super_group, "source": self.source}


@dataclass(frozen=True)
class QuantMetadata:
    """The metadata block of one quantized safetensors file, and the summary a store model's llmrun.json keeps."""

    tensors: Mapping[str, TensorFormat]  # float weight name -> its format
    kept_16bit: tuple[str, ...] = ()  # float tensors deliberately left unquantized
    source: str = "quantized by llmrun"
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "source": self.source, "kept_16bit": list(self.kept_16bit),
                           "tensors": {n: f.to_json() for n, f in sorted(self.tensors.items())}})

    def summary(self) -> dict:
        """A short description for llmrun.json and the run's notice: bits, groups and sources in use."""
        formats = list(self.tensors.values())
        return {"version": self.version, "source": self.source,
                "bits": sorted({f.bits for f in formats}), "groups": sorted({f.group_size for f in formats}),
                "num_quantized": len(formats), "kept_16bit": list(self.kept_16bit)}

    def describe(self) -> str:
        """One phrase for the notices, e.g. '210 layer matmuls in int4 g32, the head/embeddings in
        int8 g32 (quantized by llmrun)'."""
        inside = [f for name, f in self.tensors.items() if in_layer(name)]
        outside = [f for name, f in self.tensors.items() if not in_layer(name)]
        phrases = [f"{len(inside)} layer matmuls in {_formats(inside)}"] if inside else []
        phrases += [f"the head/embeddings in {_formats(outside)}"] if outside else []
        return f"{', '.join(phrases)} ({self.source})"

    @classmethod
    def from_json(cls, text: str | None, where: str) -> "QuantMetadata":
        """Parse and check a block; InvalidModelError naming `where` when absent, malformed or inconsistent."""
        if text is None:
            raise InvalidModelError(f"{where}: quantized tensors but no {METADATA_KEY!r} metadata block")
        try:
            raw = json.loads(text)
            version = raw["version"]
            if version != FORMAT_VERSION:
                raise InvalidModelError(f"{where}: quantized format version {version!r} is not supported "
                                        f"(this llmrun reads version {FORMAT_VERSION})")
            tensors = {name: _tensor_format(entry) for name, entry in raw["tensors"].items()}
            kept = tuple(str(n) for n in raw.get("kept_16bit", []))
            return cls(tensors, kept, str(raw.get("source", "")), version)
        except InvalidModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InvalidModelError(f"{where}: the {METADATA_KEY!r} metadata block is malformed ({err!s})") from None


def _formats(formats: list[TensorFormat]) -> str:
    """e.g. 'int4 g32', 'int8 per channel', 'int8/int4 g32 + per channel'."""
    bits = "/".join(f"int{b}" for b in sorted({f.bits for f in formats}, reverse=True))
    grouped = sorted({f.group_size for f in formats if f.group_size != f.in_features})
    per_channel = any(f.group_size == f.in_features and f.group_size not in grouped for f in formats)
    groups = ([f"g{'/'.join(map(str, grouped))}"] if grouped else []) + (["per channel"] if per_channel else [])
    return f"{bits} {' + '.join(groups)}"


def _tensor_format(entry: dict) -> TensorFormat:
    out_features, in_features = (int(v) for v in entry["shape"])
    return TensorFormat(int(entry["bits"]), int(entry["group"]), out_features, in_features,
                        int(entry.get("super_group", 0)), str(entry.get("source", "llmrun")))


@dataclass(frozen=True, eq=False)
class TwoLevel:
    """Group scales (or mins) as fp16 super values times uint8 codes: a GGUF K-quant's own form."""

    codes: torch.Tensor  # uint8 [out, in // group]
    supers: torch.Tensor  # float16 [out, in // super_group]

    def expand(self, group_size: int, super_group: int) -> torch.Tensor:
        """float32 [out, groups]: super * code, exact in float32."""
        per_super = super_group // group_size
        supers = self.supers.to(torch.float32).repeat_interleave(per_super, dim=1)  # [out, groups]
        return supers * self.codes.to(torch.float32)


def stored_tensors(name: str, qw: QuantWeight) -> dict[str, torch.Tensor]:
    """The on-disk tensors of `qw`: scales and mins as float16 where that is exact, else float32."""
    out = {f"{name}.qweight": qw.qweight.contiguous(), f"{name}.scales": _compact(qw.scales)}
    if qw.mins is not None:
        out[f"{name}.mins"] = _compact(qw.mins)
    return out


def stored_two_level(name: str, qweight: torch.Tensor, scales: TwoLevel,
                     mins: TwoLevel | None) -> dict[str, torch.Tensor]:
    """The on-disk tensors of a two-level weight (GGUF K-quants), kept in their compact form."""
    out = {f"{name}.qweight": qweight.contiguous(), f"{name}.scale_codes": scales.codes.to(torch.uint8),
           f"{name}.super_scales": scales.supers.to(torch.float16)}
    if mins is not None:
        out[f"{name}.min_codes"] = mins.codes.to(torch.uint8)
        out[f"{name}.super_mins"] = mins.supers.to(torch.float16)
    return out


def _compact(values: torch.Tensor) -> torch.Tensor:
    half = values.to(torch.float16)
    exact = torch.equal(half.to(torch.float32), values.to(torch.float32))
    return (half if exact else values.to(torch.float32)).contiguous()


def quant_weight(name: str, fmt: TensorFormat, get: Callable[[str], torch.Tensor],
                 has: Callable[[str], bool], where: str) -> QuantWeight:
    """Build `name`'s QuantWeight from its stored parts (read through `get`), two-level forms expanded."""
    try:
        qweight = get(f"{name}.qweight")
        if fmt.super_group:
            if fmt.super_group % fmt.group_size or fmt.in_features % fmt.super_group:
                raise ValueError(f"super group {fmt.super_group} does not fit group {fmt.group_size} "
                                 f"and {fmt.in_features} inputs")
            scales = TwoLevel(get(f"{name}.scale_codes"), get(f"{name}.super_scales"))
            scales = _checked_expand(scales, fmt)
            mins = None
            if has(f"{name}.min_codes"):
                mins = _checked_expand(TwoLevel(get(f"{name}.min_codes"), get(f"{name}.super_mins")), fmt)
        else:
            scales = get(f"{name}.scales").to(torch.float32)
            mins = get(f"{name}.mins").to(torch.float32) if has(f"{name}.mins") else None
        return QuantWeight(fmt.bits, fmt.group_size, fmt.out_features, fmt.in_features, qweight, scales, mins)
    except KeyError as err:
        raise InvalidModelError(f"{where}: {name} is listed as quantized but {err.args[0]} is missing") from None
    except ValueError as err:
        raise InvalidModelError(f"{where}: {name} does not match its metadata entry ({err!s})") from None


def _checked_expand(two: TwoLevel, fmt: TensorFormat) -> torch.Tensor:
    groups = (fmt.out_features, fmt.in_features // fmt.group_size)
    supers = (fmt.out_features, fmt.in_features // fmt.super_group)
    if two.codes.dtype != torch.uint8 or tuple(two.codes.shape) != groups:
        raise ValueError(f"codes are {two.codes.dtype} {list(two.codes.shape)}, want uint8 {list(groups)}")
    if two.supers.dtype != torch.float16 or tuple(two.supers.shape) != supers:
        raise ValueError(f"super values are {two.supers.dtype} {list(two.supers.shape)}, "
                         f"want float16 {list(supers)}")
    return two.expand(fmt.group_size, fmt.super_group)


def split_parts(tensor_names: list[str] | set[str] | Mapping) -> tuple[set[str], set[str]]:
    """(float weight names that have quantized parts, names of the tensors that are such parts)."""
    quantized, parts = set(), set()
    for name in tensor_names:
        base, _, part = name.rpartition(".")
        if part in PARTS and base:
            parts.add(name)
            if part == "qweight":
                quantized.add(base)
    return quantized, parts


def check_consistent(meta: QuantMetadata, tensor_names: set[str], where: str) -> None:
    """Every listed weight has a qweight in the file and every qweight is listed; InvalidModelError if not."""
    quantized, _ = split_parts(tensor_names)
    unlisted = sorted(quantized - set(meta.tensors))
    missing = sorted(set(meta.tensors) - quantized)
    if unlisted:
        raise InvalidModelError(f"{where}: {unlisted[0]} is quantized but not in the {METADATA_KEY!r} block")
    if missing:
        raise InvalidModelError(f"{where}: the {METADATA_KEY!r} block lists {missing[0]}, which has no qweight")


def save_quantized(path: Path, tensors: Mapping[str, torch.Tensor], meta: QuantMetadata) -> None:
    """Write one safetensors file (float tensors and stored quantized parts) atomically, with its block."""
    from safetensors.torch import save_file

    path = Path(path)
    check_consistent(meta, set(tensors), str(path))
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a dead writer's leftover is recognised by its pid
    try:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(temp), metadata={METADATA_KEY: meta.to_json()})
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


@dataclass
class LoadedFile:
    """A quantized safetensors file read whole: its float tensors, its QuantWeights and its block."""

    floats: dict[str, torch.Tensor] = field(default_factory=dict)
    quantized: dict[str, QuantWeight] = field(default_factory=dict)
    meta: QuantMetadata = field(default_factory=lambda: QuantMetadata({}))


def read_metadata(path: Path) -> QuantMetadata | None:
    """The block of a safetensors file, checked against its tensor names; None for a file with no quantized part."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        text = (handle.metadata() or {}).get(METADATA_KEY)
    quantized, _ = split_parts(names)
    if not quantized and text is None:
        return None
    meta = QuantMetadata.from_json(text, str(path))
    check_consistent(meta, names, str(path))
    return meta


def load_quantized(path: Path) -> LoadedFile:
    """Read a file written by `save_quantized` (or the GGUF import): InvalidModelError on any inconsistency."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_metadata(path) or QuantMetadata({})
    loaded = LoadedFile(meta=meta)
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
        _, parts = split_parts(names)

        def get(part: str) -> torch.Tensor:
            if part not in names:
                raise KeyError(part)
            return handle.get_tensor(part)

        for name, fmt in meta.tensors.items():
            loaded.quantized[name] = quant_weight(name, fmt, get, names.__contains__, str(path))
        for name in sorted(names - parts):
            loaded.floats[name] = handle.get_tensor(name)
    return loaded
