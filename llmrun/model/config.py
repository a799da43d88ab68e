"""ModelConfig: the frozen subset of a Hugging Face config.json that the native decoders read."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from llmrun.errors import InvalidModelError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: Mapping[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    checkpoint_dtype: Optional[str]
    raw: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 10000.0))

    @property
    def rope_type(self) -> str:
        return self.rope_parameters.get("rope_type") or self.rope_parameters.get("type") or "default"


def sliding_windows(config: ModelConfig) -> tuple[Optional[int], ...]:
    """Each layer's sliding window (None: full attention), as transformers decides it.

    With `layer_types` (Qwen2/3, Gemma 2/3) only "sliding_attention" layers slide; without it a
    `sliding_window` applies to every layer (Mistral, Phi-3). Qwen's config already clears
    `sliding_window` when `use_sliding_window` is off.
    """
    window = config.raw.get("sliding_window")
    layer_types = config.raw.get("layer_types")
    if layer_types is None:
        return (window,) * config.num_hidden_layers
    return tuple(window if kind == "sliding_attention" else None for kind in layer_types)


def read_config_json(folder: Path) -> dict:
    """The raw config.json of a model folder."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InvalidModelError(f"{folder} has no config.json") from err
    except (OSError, ValueError) as err:
        raise InvalidModelError(f"{path} is not valid JSON") from err


def _rope_parameters(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        # Per-layer-type dicts (Gemma 3) are keyed by layer type; families handle those.
        return dict(params)
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def load_model_config(folder: Path, architecture: str) -> ModelConfig:
    """Read config.json through transformers' config class (for its defaults) into a ModelConfig."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as err:
        raise InvalidModelError(f"cannot read the config of {folder}: {str(err).splitlines()[0]}") from err
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return ModelConfig(
        architecture=architecture,
        model_type=hf.model_type,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
        rope_parameters=_rope_parameters(hf),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        hidden_act=getattr(hf, "hidden_act", None) or getattr(hf, "hidden_activation", None) or "silu",
        checkpoint_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        raw=hf.to_dict(),
    )
