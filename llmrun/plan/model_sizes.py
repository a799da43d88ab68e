"""ModelSizes: per-layer and global weight bytes in the run dtype, from the safetensors index only."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def model_sizes(index: CheckpointIndex, config: dict, dtype_bytes: int) -> ModelSizes:
    """Group the index's tensors by decoder layer and convert sizes to `dtype_bytes` per element."""
    num_layers = int(config["num_hidden_layers"])
    layer_bytes = [0] * num_layers
    embed = lm_head = other = 0
    for name, info in index.tensors.items():
        size = tensor_bytes_in(info.dtype, info.num_elements, dtype_bytes)
        match = _LAYER_RE.search(name)
        if match and int(match.group(1)) < num_layers:
            layer_bytes[int(match.group(1))] += size
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
    )
