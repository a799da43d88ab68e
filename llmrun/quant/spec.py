"""What a quantization asks for (QuantSpec) and which tensors it compresses, by name and shape alone.

torch-free: `llmrun plan --quant` sizes a model from headers with it. The rule of what is compressed
(decided by measurement, docs/quantization.md): the 2-D matmul weights inside the decoder layers, in
the format asked for, and the output head (SmolLM2's is the embedding table, tied) in int8 groups of
32 (Q8_0's grid), whatever was asked: int4 there cost SmolLM2 6.5 % of perplexity, one int8 scale a
row changed a greedy answer, groups of 32 neither; and the head is read for every token (in bf16,
45 % of an int4 SmolLM2's bytes).
Untied input embeddings (only looked up, a row a token), norms and biases stay 16-bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmrun.errors import UsageError
from llmrun.weights.index import DTYPE_BYTES, CheckpointIndex, TensorInfo

QUANT_CHOICES = ("none", "int8", "int4")
INT4_GROUPS = (32, 64, 128)
DEFAULT_INT4_GROUP = 32
CPU_DECODE_ROWS = 16  # rows the CPU's quantized matmul reads packed; more dequantize the weight for a GEMM
# decode rows from which, by bits, those sums come from AMX int8 tiles where the CPU has them (int4 weights are
# unpacked for the tiles, int8 ones read as they lie; below, the VNNI kernel was faster: docs/performance.md)
CPU_AMX_ROWS = {4: 8, 8: 8}
# ...and int8 weights of this many bytes or more (no cache holds them: an output head, a 7B model's layers) from
# this many rows (measured on SmolLM2's head and 7B-shaped weights, docs/performance.md)
CPU_AMX_LARGE_BYTES, CPU_AMX_LARGE_ROWS = 8 << 20, 4


def cpu_amx_rows(bits: int, out_features: int, in_features: int) -> int:
    """Decode rows from which a weight's integer sums come from AMX int8 tiles, where the CPU has them."""
    large = bits == 8 and out_features * in_features >= CPU_AMX_LARGE_BYTES
    return CPU_AMX_LARGE_ROWS if large else CPU_AMX_ROWS[bits]


PER_CHANNEL = 0  # QuantSpec.group_size for int8 with one scale per output channel
# the output head's names: lm_head, else (tied) the embedding table, which is then the head
HEAD_NAMES = ("lm_head.weight", "model.embed_tokens.weight")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# In-memory bytes per stored element of each part: qweight keeps its bytes, scales and mins are float32,
# a two-level code becomes a float32 scale (or min), and the super values are folded into those.
_PART_BYTES = {"scales": 4, "mins": 4, "scale_codes": 4, "min_codes": 4, "super_scales": 0, "super_mins": 0}


@dataclass(frozen=True)
class QuantSpec:
    """int8 (per output channel, or groups) or int4 (asymmetric groups of 32, 64 or 128)."""

    bits: int
    group_size: int  # inputs per scale; PER_CHANNEL (int8 only): all of a row's inputs

    @classmethod
    def parse(cls, kind: str, group: int | None = None) -> "QuantSpec":
        """From `--quant`/`--to` and `--group`; a UsageError (one line) for a value the format has not."""
        if kind not in ("int8", "int4"):
            raise UsageError(f"unknown quantization {kind!r}; choose int8 or int4")
        if kind == "int4":
            group = DEFAULT_INT4_GROUP if group is None else group
            if group not in INT4_GROUPS:
                raise UsageError(f"int4 groups are {', '.join(map(str, INT4_GROUPS))}, not {group}")
            return cls(4, group)
        group = PER_CHANNEL if group is None else group
        if group != PER_CHANNEL and (group < 16 or group % 16):
            raise UsageError(f"int8 groups are multiples of 16 (or 0: one scale per output channel), not {group}")
        return cls(8, group)

    @property
    def label(self) -> str:
        """e.g. 'int4-g32', 'int8-channel': names cache entries and default store names."""
        return f"int{self.bits}-" + ("channel" if self.group_size == PER_CHANNEL else f"g{self.group_size}")

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == PER_CHANNEL else self.group_size

    def part_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The parts a [out, in] weight becomes in memory: part -> (safetensors tag, shape)."""
        groups = (out_features, in_features // self.group_for(in_features))
        packed = (out_features, in_features // 2) if self.bits == 4 else (out_features, in_features)
        parts = {"qweight": ("U8" if self.bits == 4 else "I8", packed), "scales": ("F32", groups)}
        if self.bits == 4:
            parts["mins"] = ("F32", groups)
        return parts


HEAD_SPEC: "QuantSpec | None" = QuantSpec(8, 32)  # the head's format (None: kept in 16 bits)


def in_layer(name: str) -> bool:
    """Whether a tensor (or a compressed tensor's name) belongs to a decoder layer."""
    return _LAYER_RE.search(name) is not None


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a checkpoint tensor is a layer's matmul weight: a 2-D weight inside a decoder layer."""
    return len(shape) == 2 and name.endswith(".weight") and in_layer(name)


def head_name(index: CheckpointIndex) -> str | None:
    """The output head's tensor: lm_head where the checkpoint has one, else the embedding table."""
    return next((name for name in HEAD_NAMES if name in index.tensors), None)


def compressed(index: CheckpointIndex, spec: QuantSpec) -> dict[str, QuantSpec]:
    """Each tensor `spec` compresses, with the format it takes (the layers' matmuls: `spec`; the
    output head: HEAD_SPEC), in the index's order."""
    head = head_name(index) if HEAD_SPEC is not None else None
    out = {}
    for name, info in index.tensors.items():
        if quantizable(name, info.shape):
            out[name] = spec
        elif name == head and len(info.shape) == 2:
            out[name] = HEAD_SPEC
    return out


def check_groups(index: CheckpointIndex, spec: QuantSpec) -> None:
    """A UsageError naming the first compressed tensor whose inputs the group does not divide."""
    for name, tensor_spec in compressed(index, spec).items():
        in_features = index[name].shape[1]
        group = tensor_spec.group_for(in_features)
        if in_features % group or (tensor_spec.bits == 4 and in_features % 2):
            raise UsageError(f"group {group} does not divide {name}'s {in_features} inputs; "
                             f"choose another --group")


def planned_index(index: CheckpointIndex, spec: QuantSpec) -> CheckpointIndex:
    """The index as it will be after quantizing on load: each compressed weight replaced by its parts
    (sizes only: the parts' byte ranges are not in any file), for the planner to count."""
    check_groups(index, spec)
    specs = compressed(index, spec)
    tensors: dict[str, TensorInfo] = {}
    for name, info in index.tensors.items():
        if name not in specs:
            tensors[name] = info
            continue
        for part, (tag, shape) in specs[name].part_shapes(*info.shape).items():
            size = DTYPE_BYTES[tag] * shape[0] * shape[1]
            tensors[f"{name}.{part}"] = TensorInfo(f"{name}.{part}", info.file, tag, shape, 0, size)
    return CheckpointIndex(index.folder, tensors)


def quantized_part(name: str) -> str:
    """The part a stored tensor is ('qweight', 'scales', ...), or '' for a plain tensor."""
    base, _, part = name.rpartition(".")
    return part if base.endswith(".weight") and (part == "qweight" or part in _PART_BYTES) else ""


def part_memory_bytes(part: str, tag: str, num_elements: int) -> int:
    """Bytes a stored quantized part takes once loaded (scales and mins as float32)."""
    return num_elements * (DTYPE_BYTES[tag] if part == "qweight" else _PART_BYTES[part])


def is_quantized(index: CheckpointIndex) -> bool:
    return any(name.endswith(".qweight") for name in index.tensors)
