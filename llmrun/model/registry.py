"""The architecture registry: config.json `architectures` entry -> native decoder class."""

from __future__ import annotations

from pathlib import Path

from llmrun.errors import InvalidModelError, UnsupportedArchitectureError
from llmrun.model.config import read_config_json

# Filled lazily so that importing the registry does not import torch.
_DECODERS = {
    "LlamaForCausalLM": ("llmrun.model.llama", "LlamaDecoder"),
    "Phi3ForCausalLM": ("llmrun.model.phi3", "Phi3Decoder"),
}


def supported_architectures() -> list[str]:
    return sorted(_DECODERS)


def architecture_of(folder: Path) -> str:
    """The architecture named by a model folder's config.json, checked against the registry."""
    raw = read_config_json(folder)
    architectures = raw.get("architectures") or []
    if not architectures:
        raise InvalidModelError(f"{Path(folder) / 'config.json'} names no architecture")
    for name in architectures:
        if name in _DECODERS:
            return name
    raise UnsupportedArchitectureError(
        f"architecture {architectures[0]} is not supported; supported: "
        + ", ".join(supported_architectures())
    )


def decoder_class(architecture: str):
    import importlib

    module_name, class_name = _DECODERS[architecture]
    return getattr(importlib.import_module(module_name), class_name)
