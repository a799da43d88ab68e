"""ModelSizes: per-layer and global weight bytes in the run dtype (compressed weights at their packed
size), from the safetensors index only."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmrun.quant.spec import CPU_DECODE_ROWS, part_memory_bytes, quantized_part
from llmrun.weights.index import DTYPE_BYTES, CheckpointIndex

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class ModelSizes:
    """Byte sizes the planner needs; every figure is in the run dtype."""

    layer_bytes: tuple[int, ...]      # per decoder layer
    embed_bytes: int                  # input embedding table
    lm_head_bytes: int                # 0 when tied to the embeddings
    other_bytes: int                  # final norm and anything else outside the layers
    tied_embeddings: bool
    kv_bytes_per_token: int           # K and V of one token, all layers
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    max_context: int
    dtype_bytes: int                  # bytes per element of the run dtype
    layer_matrix_bytes: tuple[int, ...] = ()  # per layer, its largest matrix as staged (q/k/v, gate/up fused)
    layer_vector_bytes: tuple[int, ...] = ()  # per layer, its norms (resident when it streams matrix by matrix)
    dequantized_bytes: int = 0  # a layer's largest compressed matrix in the run dtype (prompt chunks dequantize it)
    head_dequantized_bytes: int = 0  # the compressed output head (or tied embeddings) in the run dtype
    layer_dequantized_bytes: int = 0  # the largest layer's compressed matrices, all of them, in the run dtype
    head_compressed: bool = False  # the output head (the embeddings when tied) is stored compressed: kept resident

    def dequantized_workspace(self, batch: int, on_gpu: bool) -> int:
        """What prompt chunks of a compressed model dequantize at once: its largest matrix, or on
        the CPU a whole layer's where several chunks share a step (they run in lockstep and share a
        layer's dequantized weights); the head too where more rows ask for logits than the decode
        kernel reads packed (1 on a GPU, CPU_DECODE_ROWS on the CPU)."""
        matrices = self.layer_dequantized_bytes if batch > 1 and not on_gpu else self.dequantized_bytes
        head = batch > (1 if on_gpu else CPU_DECODE_ROWS)
        return max(matrices, self.head_dequantized_bytes if head else 0)

    def matrix_bytes(self, layer: int) -> int:
        """The largest piece layer `layer` streams in when staged matrix by matrix (the whole layer
        when its matrices are not known)."""
        return self.layer_matrix_bytes[layer] if self.layer_matrix_bytes else self.layer_bytes[layer]

    def vector_bytes(self, layer: int) -> int:
        return self.layer_vector_bytes[layer] if self.layer_vector_bytes else 0

    @property
    def num_parameters(self) -> int:
        return self.weight_bytes // self.dtype_bytes

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.embed_bytes + self.lm_head_bytes + self.other_bytes

    @property
    def head_bytes(self) -> int:
        """The output projection read for every token (the embeddings when tied)."""
        return self.embed_bytes if self.tied_embeddings else self.lm_head_bytes


def tensor_bytes_in(tag: str, num_elements: int, dtype_bytes: int) -> int:
    """Floating-point tensors convert to the run dtype; others keep their size."""
    return num_elements * (dtype_bytes if tag in _FLOAT_TAGS else DTYPE_BYTES[tag])


def tensor_layer(name: str, num_layers: int) -> int | None:
    """The decoder layer a tensor belongs to; None for the embeddings, head and final norm."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match and int(match.group(1)) < num_layers else None


def _piece_name(name: str) -> str:
    """The staged piece a layer's tensor travels in when the layer streams matrix by matrix
    (weights/pieces.py): its module, q/k/v and gate/up together as decoders fuse them (a compressed
    weight's parts with it)."""
    if quantized_part(name):
        name = name.rpartition(".")[0]
    module = name.rsplit(".", 1)[0]
    return re.sub(r"\.(q|k|v)_proj$", ".qkv_proj", re.sub(r"\.(gate|up)_proj$", ".gate_up_proj", module))


def _matrix_and_vector_bytes(pieces: dict, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per layer: its largest piece holding a matrix, and its pieces of vectors only (norms)."""
    matrices, vectors = [0] * num_layers, [0] * num_layers
    for (layer, _), (size, is_matrix) in pieces.items():
        if is_matrix:
            matrices[layer] = max(matrices[layer], size)
        else:
            vectors[layer] += size
    return tuple(matrices), tuple(vectors)


def model_sizes(index: CheckpointIndex, config: dict, dtype_bytes: int) -> ModelSizes:
    """Group the index's tensors by decoder layer and convert sizes to `dtype_bytes` per element."""
    num_layers = int(config["num_hidden_layers"])
    layer_bytes = [0] * num_layers
    embed = lm_head = other = 0
    pieces: dict[tuple[int, str], tuple[int, bool]] = {}  # (layer, piece) -> (bytes, holds a matrix)
    compressed: dict[tuple, int] = {}  # (layer, piece) -> values of its compressed matrices
    for name, info in index.tensors.items():
        part = quantized_part(name)  # a compressed weight's part counts what it takes once loaded
        size = (part_memory_bytes(part, info.dtype, info.num_elements) if part
                else tensor_bytes_in(info.dtype, info.num_elements, dtype_bytes))
        layer = tensor_layer(name, num_layers)
        if part == "qweight":  # int4 packs two values a byte (U8), int8 one (I8)
            key = (layer, _piece_name(name))
            compressed[key] = compressed.get(key, 0) + info.num_elements * (2 if info.dtype == "U8" else 1)
        if layer is not None:
            layer_bytes[layer] += size
            piece_bytes, is_matrix = pieces.get((layer, _piece_name(name)), (0, False))
            pieces[layer, _piece_name(name)] = (piece_bytes + size, is_matrix or len(info.shape) > 1)
        elif "embed_tokens" in name or name.endswith("wte.weight"):
            embed += size
        elif name.startswith("lm_head"):
            lm_head += size
        else:
            other += size
    tied = bool(config.get("tie_word_embeddings", False)) and lm_head == 0
    num_heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // num_heads)
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    layer_matrix_bytes, layer_vector_bytes = _matrix_and_vector_bytes(pieces, num_layers)
    return ModelSizes(
        layer_bytes=tuple(layer_bytes),
        embed_bytes=embed,
        lm_head_bytes=lm_head,
        other_bytes=other,
        tied_embeddings=tied,
        kv_bytes_per_token=2 * num_layers * num_kv_heads * head_dim * dtype_bytes,
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config.get("intermediate_size") or 4 * int(config["hidden_size"])),
        vocab_size=int(config["vocab_size"]),
        num_attention_heads=num_heads,
        max_context=int(config.get("max_position_embeddings") or 2048),
        dtype_bytes=dtype_bytes,
        layer_matrix_bytes=layer_matrix_bytes,
        layer_vector_bytes=layer_vector_bytes,
        **_dequantized_sizes(compressed, dtype_bytes, tied),
    )


def _dequantized_sizes(compressed: dict[tuple, int], dtype_bytes: int, tied: bool) -> dict:
    """From the values of each (layer, piece)'s compressed matrices (layer None: embeddings, head):
    the largest layer piece, the largest layer in all, and the head, in the run dtype; and whether
    the output head (the embeddings when tied) is one of them."""
    per_layer: dict[int, int] = {}
    for (layer, _), count in compressed.items():
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + count
    pieces = [count for (layer, _), count in compressed.items() if layer is not None]
    head = [count for (layer, _), count in compressed.items() if layer is None]
    return {"dequantized_bytes": max(pieces, default=0) * dtype_bytes,
            "layer_dequantized_bytes": max(per_layer.values(), default=0) * dtype_bytes,
            "head_dequantized_bytes": max(head, default=0) * dtype_bytes,
            # outside the layers only the embeddings and lm_head are compressed: tied, the embeddings are the head
            "head_compressed": any(layer is None and piece.startswith("lm_head") != tied
                                   for layer, piece in compressed)}
