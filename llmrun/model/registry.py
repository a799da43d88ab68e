"""The architecture registry: config.json `architectures` entry -> native decoder class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

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
    model_type: str  # config.json's model_type for this family
    config_defaults: Mapping[str, Any]  # what its transformers config class assumes for a missing field


# The config defaults are those of the transformers 5.x config classes (LlamaConfig, MistralConfig,
# Qwen2Config, Qwen3Config, Phi3Config, Gemma2Config, Gemma3TextConfig), for the fields llmrun reads;
# tests/model/test_config_reader.py checks each against the class itself.
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
              rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, head_dim=None,
              **_TOKENS)
_MISTRAL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                sliding_window=4096, **_TOKENS)
_QWEN = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
             rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
             max_window_layers=28, layer_types=None, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_PHI3 = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096,
             original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=32000, pad_token_id=32000, sliding_window=None)
_GEMMA = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
              num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
              pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
              query_pre_attn_scalar=256, sliding_window=4096, layer_types=None)

FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llmrun.model.llama", "LlamaDecoder", "Llama 2/3.x, SmolLM2",
           "RoPE default, linear and llama3 scaling", "llama", _LLAMA),
    Family("MistralForCausalLM", "llmrun.model.mistral", "MistralDecoder", "Mistral",
           "sliding-window attention on every layer when `sliding_window` is set", "mistral", _MISTRAL),
    Family("Qwen2ForCausalLM", "llmrun.model.qwen2", "Qwen2Decoder", "Qwen2, Qwen2.5",
           "q/k/v biases; sliding layers from `max_window_layers` when `use_sliding_window`", "qwen2", _QWEN),
    Family("Qwen3ForCausalLM", "llmrun.model.qwen3", "Qwen3Decoder", "Qwen3",
           "per-head RMSNorm on q and k before RoPE", "qwen3", {**_QWEN, "head_dim": 128, "attention_bias": False}),
    Family("Phi3ForCausalLM", "llmrun.model.phi3", "Phi3Decoder",
           "Phi-3 mini/medium (4k, 128k), Phi-3.5 mini, Phi-4-mini",
           "fused qkv/gate_up; LongRoPE short/long factors; partial rotary; sliding window", "phi3", _PHI3),
    Family("Gemma2ForCausalLM", "llmrun.model.gemma", "Gemma2Decoder", "Gemma 2",
           "scaled embeddings, x·(1+w) norms, four norms per layer, GELU-tanh, soft-capping, "
           "alternating sliding/global layers", "gemma2",
           {**_GEMMA, "vocab_size": 256000, "max_position_embeddings": 8192,
            "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    Family("Gemma3ForCausalLM", "llmrun.model.gemma", "Gemma3Decoder", "Gemma 3 (text)",
           "Gemma 2's layers plus q/k norms, a local RoPE base for sliding layers (5 of 6 in Gemma 3)",
           "gemma3_text", {**_GEMMA, "vocab_size": 262_208, "max_position_embeddings": 131_072,
                           "final_logit_softcapping": None, "attn_logit_softcapping": None,
                           "use_bidirectional_attention": False}),
)
_BY_ARCHITECTURE = {family.architecture: family for family in FAMILIES}
_BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}


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


def config_family(architecture: str, model_type: Optional[str]) -> Family:
    """The family whose config defaults apply: by model_type, as transformers' AutoConfig picks its
    config class, else the architecture's own."""
    return _BY_MODEL_TYPE.get(model_type) or _BY_ARCHITECTURE[architecture]


def decoder_class(architecture: str):
    import importlib

    family = _BY_ARCHITECTURE[architecture]
    return getattr(importlib.import_module(family.module), family.class_name)
