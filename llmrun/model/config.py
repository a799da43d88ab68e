"""ModelConfig: the frozen subset of a Hugging Face config.json that the native decoders read, and its one reader."""

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


_SCALED_ROPE_TYPES = ("llama3", "yarn", "longrope")
_REQUIRED_ROPE_KEYS = {"linear": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                       "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def model_config(raw: Mapping[str, Any], architecture: str, family) -> ModelConfig:
    """A config.json's dict as ModelConfig, with `family`'s defaults (registry.config_family) for the
    fields it omits and the derived fields (head_dim, KV heads, layer types, RoPE parameters)
    worked out as transformers' config class works them out."""
    merged = {**family.config_defaults, **raw}
    for name in _INT_FIELDS:
        if not isinstance(merged.get(name), int) or isinstance(merged.get(name), bool) or merged[name] <= 0:
            raise InvalidModelError(f"config.json: {name} must be a positive integer, got {merged.get(name)!r}")
    num_heads = merged["num_attention_heads"]
    merged["num_key_value_heads"] = merged.get("num_key_value_heads") or num_heads
    merged["head_dim"] = merged.get("head_dim") or merged["hidden_size"] // num_heads
    _layer_types(merged, family.model_type)
    merged["rope_parameters"] = _rope_parameters(merged, family)
    dtype = merged.get("dtype") if merged.get("dtype") is not None else merged.get("torch_dtype")
    return ModelConfig(
        architecture=architecture,
        model_type=merged.get("model_type", family.model_type),
        vocab_size=merged["vocab_size"],
        hidden_size=merged["hidden_size"],
        intermediate_size=merged["intermediate_size"],
        num_hidden_layers=merged["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=merged["num_key_value_heads"],
        head_dim=merged["head_dim"],
        rms_norm_eps=float(merged.get("rms_norm_eps", 1e-6)),
        rope_parameters=merged["rope_parameters"],
        max_position_embeddings=int(merged.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(merged.get("tie_word_embeddings", False)),
        attention_bias=bool(merged.get("attention_bias", False)),
        mlp_bias=bool(merged.get("mlp_bias", False)),
        hidden_act=merged.get("hidden_act") or merged.get("hidden_activation") or "silu",
        checkpoint_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        raw=merged,
    )


def _layer_types(merged: dict, model_type: str) -> None:
    """Qwen's sliding switch and the per-layer attention kinds each family's config class derives."""
    num_layers = merged["num_hidden_layers"]
    if model_type in ("qwen2", "qwen3"):
        merged["sliding_window"] = merged.get("sliding_window") if merged.get("use_sliding_window") else None
        if merged.get("layer_types") is None:
            merged["layer_types"] = ["sliding_attention" if merged["sliding_window"] is not None
                                     and i >= merged["max_window_layers"] else "full_attention"
                                     for i in range(num_layers)]
    elif model_type in ("gemma2", "gemma3_text") and merged.get("layer_types") is None:
        every = 2 if model_type == "gemma2" else merged.get("sliding_window_pattern", 6)
        merged["layer_types"] = ["sliding_attention" if (i + 1) % every else "full_attention"
                                 for i in range(num_layers)]
    if model_type == "gemma3_text" and merged.get("use_bidirectional_attention") and merged.get("sliding_window"):
        merged["sliding_window"] = merged["sliding_window"] // 2 * 2  # what Gemma3TextConfig.to_dict gives back


def _rope_parameters(merged: dict, family) -> dict:
    """RoPE parameters standardized as transformers does: legacy `rope_scaling` / `rope_theta`
    folded in, `rope_type` set, the pretraining length added for scaled types."""
    if family.model_type == "gemma3_text":
        return _gemma3_rope_parameters(merged)
    # The legacy keys move into the parameters (and out of the raw dict, as transformers pops them).
    params = dict(merged.pop("rope_scaling", None) or merged.get("rope_parameters") or {})
    params.setdefault("rope_theta", merged.pop("rope_theta", 10000.0))
    if family.model_type == "phi3":  # Phi3Config reads it without popping it
        params.setdefault("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))
    elif merged.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", merged.pop("partial_rotary_factor"))
    _standardize(params, merged, fixed_original="original_max_position_embeddings" in family.config_defaults)
    if family.model_type == "phi3" and params["rope_type"] in ("su", "yarn"):
        params["rope_type"] = "longrope"
    _check_rope(params)
    return params


def _gemma3_rope_parameters(merged: dict) -> dict:
    """Gemma 3: one dict per layer kind; the global base from `rope_theta` (1M), the local from
    `rope_local_base_freq` (10k); legacy `rope_scaling` applies to the global layers."""
    given = merged.get("rope_parameters")
    params = {key: dict(value) if isinstance(value, dict) else value for key, value in given.items()} if given \
        else {"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "default"}}
    if merged.get("rope_scaling") is not None:
        params["full_attention"].update(merged.pop("rope_scaling"))
    for kind, theta_key, theta in (("full_attention", "rope_theta", 1_000_000.0),
                                   ("sliding_attention", "rope_local_base_freq", 10_000.0)):
        if params.get(kind) is None:
            params[kind] = {"rope_type": "default"}
        params[kind].setdefault("rope_theta", merged.pop(theta_key, theta))
    for kind in set(merged["layer_types"]):
        if isinstance(params.get(kind), dict):
            _standardize(params[kind], merged, fixed_original=False)
            _check_rope(params[kind])
    return params


def _standardize(params: dict, merged: dict, *, fixed_original: bool) -> None:
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _SCALED_ROPE_TYPES:
        if fixed_original:  # Phi-3 keeps the pretraining length next to the RoPE parameters
            params["original_max_position_embeddings"] = merged["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", merged.get("max_position_embeddings", 2048))


def _check_rope(params: dict) -> None:
    """The keys each RoPE type llmrun computes needs (transformers refuses the config without them)."""
    missing = [key for key in _REQUIRED_ROPE_KEYS.get(params["rope_type"], ()) if key not in params]
    if missing:
        raise InvalidModelError(f"config.json: RoPE type {params['rope_type']!r} needs {', '.join(missing)}")

