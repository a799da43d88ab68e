"""The architecture registry: config.json `architectures` entry -> native decoder class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmrun.errors import InvalidModelError, UnsupportedArchitectureError
from llmrun.model.config import read_config_json


@dataclass(frozen=True)
class Family:
    """A supported architecture: where its decoder lives (imported lazily: no torch at import)."""

    architecture: str
    module: str
    class_name: str
    name: str
    notes: str


FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llmrun.model.llama", "LlamaDecoder", "Llama 2/3.x, SmolLM2",
           "RoPE default, linear and llama3 scaling"),
    Family("MistralForCausalLM", "llmrun.model.mistral", "MistralDecoder", "Mistral",
           "sliding-window attention on every layer when `sliding_window` is set"),
    Family("Qwen2ForCausalLM", "llmrun.model.qwen2", "Qwen2Decoder", "Qwen2, Qwen2.5",
           "q/k/v biases; sliding layers from `max_window_layers` when `use_sliding_window`"),
    Family("Qwen3ForCausalLM", "llmrun.model.qwen3", "Qwen3Decoder", "Qwen3",
           "per-head RMSNorm on q and k before RoPE"),
    Family("Phi3ForCausalLM", "llmrun.model.phi3", "Phi3Decoder",
           "Phi-3 mini/medium (4k, 128k), Phi-3.5 mini, Phi-4-mini",
           "fused qkv/gate_up; LongRoPE short/long factors; partial rotary; sliding window"),
    Family("Gemma2ForCausalLM", "llmrun.model.gemma", "Gemma2Decoder", "Gemma 2",
           "scaled embeddings, x·(1+w) norms, four norms per layer, GELU-tanh, soft-capping, "
           "alternating sliding/global layers"),
    Family("Gemma3ForCausalLM", "llmrun.model.gemma", "Gemma3Decoder", "Gemma 3 (text)",
           "Gemma 2's layers plus q/k norms, a local RoPE base for sliding layers (5 of 6 in Gemma 3)"),
)
_BY_ARCHITECTURE = {family.architecture: family for family in FAMILIES}


def supported_architectures() -> list[str]:
    """In the table's order (Llama first)."""
    return [family.architecture for family in FAMILIES]


def architecture_of(folder: Path, raw: Optional[dict] = None) -> str:
    """The architecture named by a model folder's config.json (`raw`, when already read), checked
    against the registry."""
    raw = read_config_json(folder) if raw is None else raw
    architectures = raw.get("architectures") or []
    if not architectures:
        raise InvalidModelError(f"{Path(folder) / 'config.json'} names no architecture")
    for name in architectures:
        if name in _BY_ARCHITECTURE:
            return name
    raise UnsupportedArchitectureError(
        f"architecture {architectures[0]} is not supported; supported: "
        + ", ".join(supported_architectures())
    )


def decoder_class(architecture: str):
    import importlib

    family = _BY_ARCHITECTURE[architecture]
    return getattr(importlib.import_module(family.module), family.class_name)
