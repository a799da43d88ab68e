"""The quantized-weight format (issue 16): QuantWeight in memory, its reference dequantize, its safetensors form.

Format version 1. In memory every kernel consumes a `QuantWeight`:
  int8: qweight int8 [out, in], signed; int4: qweight uint8 [out, in // 2], column 2j in the low nibble and
  2j + 1 in the high nibble, unsigned 0..15. scales (and mins, required for int4) float32 [out, in // group].
  `dequantize` is THE definition every kernel is checked against: w = q * scale + min, per group.
On disk (safetensors; tensors named after the float weight "<name>" they replace):
  "<name>.qweight", "<name>.scales", "<name>.mins" (if any), scales/mins in float32 or float16 (only where
  float16 holds them exactly); or, two-level (GGUF K-quants), "<name>.scale_codes" / "<name>.min_codes" uint8
  [out, groups] with "<name>.super_scales" / "<name>.super_mins" float16 [out, in // super_group]:
  scale = super_scales * scale_codes and min = super_mins * min_codes (so a Q4_K min, -dmin * m, is stored with
  super_mins = -dmin), expanded to float32 at load (exact: an fp16 times a 6-bit integer fits float32).
  The safetensors `__metadata__` key "llmrun.quant" holds a JSON block (`QuantMetadata`) listing every
  quantized tensor with its bits, group, super group and source, and the float tensors kept in 16 bits.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from llmrun.errors import InvalidModelError
from llmrun.quant.spec import INT4_GROUPS

FORMAT_VERSION = 1
METADATA_KEY = "llmrun.quant"
PARTS = ("qweight", "scales", "mins", "scale_codes", "min_codes", "super_scales", "super_mins")


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """One linear layer's weight in compressed form: what every quantized matmul kernel consumes."""

    bits: int  # 8 or 4
    group_size: int  # along the input dim; == in_features for int8 per output channel
    out_features: int
    in_features: int
    qweight: torch.Tensor  # int8 [out, in] | uint8 [out, in // 2] (two int4 values a byte)
    scales: torch.Tensor  # float32 [out, in // group_size]
    mins: torch.Tensor | None = None  # float32 [out, in // group_size]; required for int4

    def __post_init__(self) -> None:
        problem = layout_problem(self.bits, self.group_size, self.out_features, self.in_features,
                                 self.qweight, self.scales, self.mins)
        if problem:
            raise ValueError(f"QuantWeight: {problem}")

    @property
    def num_groups(self) -> int:
        return self.in_features // self.group_size

    @property
    def num_bytes(self) -> int:
        """Bytes held in memory (packed values, float32 scales and mins)."""
        parts = [self.qweight, self.scales] + ([self.mins] if self.mins is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantWeight":
        """The same weight with its tensors on `device` (packed: the bytes moved are the compressed ones)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantWeight(self.bits, self.group_size, self.out_features, self.in_features,
                           move(self.qweight), move(self.scales), move(self.mins))


def layout_problem(bits: int, group_size: int, out_features: int, in_features: int,
                   qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> str:
    """What is wrong with these parts as a QuantWeight, or '' when they fit the format."""
    if bits not in (4, 8):
        return f"bits must be 4 or 8, not {bits}"
    if group_size <= 0 or in_features % group_size:
        return f"group {group_size} does not divide the {in_features} inputs"
    if bits == 4 and group_size not in INT4_GROUPS:
        return f"int4 groups are {', '.join(map(str, INT4_GROUPS))}, not {group_size}"
    if bits == 8 and group_size != in_features and group_size % 16:
        return f"int8 groups are multiples of 16 or the whole input ({in_features}), not {group_size}"
    if bits == 4 and mins is None:
        return "int4 needs mins (the format is asymmetric)"
    packed = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
    want_dtype = torch.uint8 if bits == 4 else torch.int8
    if qweight.dtype != want_dtype or tuple(qweight.shape) != packed:
        return (f"qweight is {qweight.dtype} {list(qweight.shape)}, "
                f"int{bits} wants {want_dtype} {list(packed)}")
    grouped = (out_features, in_features // group_size)
    for part, tensor in (("scales", scales), ("mins", mins)):
        if tensor is not None and (tensor.dtype != torch.float32 or tuple(tensor.shape) != grouped):
            return f"{part} is {tensor.dtype} {list(tensor.shape)}, wants torch.float32 {list(grouped)}"
    return ""


def concat_quant(weights: list[QuantWeight]) -> QuantWeight:
    """Weights of the same inputs stacked along the outputs (q/k/v into one qkv). Alike formats are
    concatenated as they are; mixed ones (a GGUF's Q4_K beside Q6_K) become int8 with the common
    group and zero mins where one had none: every q * scale + min is unchanged, so nothing is lost."""
    first = weights[0]
    if len({w.in_features for w in weights}) != 1:
        raise ValueError("stacked weights must share their inputs")
    if len(weights) == 1:
        return first
    alike = all((w.bits, w.group_size, w.mins is None) == (first.bits, first.group_size, first.mins is None)
                for w in weights)
    if not alike:
        group = math.gcd(*(w.group_size for w in weights))
        with_mins = any(w.mins is not None for w in weights)
        weights = [_as_int8(w, group, with_mins) for w in weights]
        first = weights[0]
    mins = None if first.mins is None else torch.cat([w.mins for w in weights])
    return QuantWeight(first.bits, first.group_size, sum(w.out_features for w in weights), first.in_features,
                       torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]), mins)


def _as_int8(qw: QuantWeight, group: int, with_mins: bool) -> QuantWeight:
    """The same values as int8 in groups of `group` (which divides qw's group): exact."""
    q = unpack_int4(qw.qweight).to(torch.int8) if qw.bits == 4 else qw.qweight
    repeat = qw.group_size // group
    scales = qw.scales.repeat_interleave(repeat, dim=1)
    mins = qw.mins.repeat_interleave(repeat, dim=1) if qw.mins is not None else None
    if with_mins and mins is None:
        mins = torch.zeros_like(scales)
    return QuantWeight(8, group, qw.out_features, qw.in_features, q, scales, mins)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in // 2] -> uint8 [out, in], values 0..15 (low nibble first)."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] with values 0..15 -> uint8 [out, in // 2] (column 2j low nibble, 2j + 1 high)."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of inputs, not {values.shape[-1]}")
    pairs = values.to(torch.uint8).reshape(values.shape[0], -1, 2)  # [out, in // 2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """The reference: float32 [out, in] with w = q * scale + min per group (the definition kernels match)."""
    q = unpack_int4(qw.qweight) if qw.bits == 4 else qw.qweight
    q = q.to(torch.float32).reshape(qw.out_features, qw.num_groups, qw.group_size)  # [out, groups, group]
    w = q * qw.scales.unsqueeze(-1)
    if qw.mins is not None:
        w = w + qw.mins.unsqueeze(-1)
    return w.reshape(qw.out_features, qw.in_features)


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
        """One phrase for the run's notice, e.g. 'int4 g64 (quantized by llmrun)'."""
        formats = list(self.tensors.values())
        bits = "/".join(f"int{b}" for b in sorted({f.bits for f in formats}, reverse=True))
        grouped = sorted({f.group_size for f in formats if f.group_size != f.in_features})
        per_channel = any(f.group_size == f.in_features and f.group_size not in grouped for f in formats)
        groups = ([f"g{'/'.join(map(str, grouped))}"] if grouped else []) + (["per channel"] if per_channel else [])
        return f"{bits} {' + '.join(groups)} ({self.source})"

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
