"""The Mistral family: Llama's layers with sliding-window attention on every layer."""

from __future__ import annotations

from llmrun.model.llama import LlamaDecoder


class MistralDecoder(LlamaDecoder):
    """Mistral is Llama plus the config's `sliding_window` (null in Mistral 7B v0.2+): each query
    sees the last `sliding_window` positions, itself included. The window comes from the config
    (config.sliding_windows) and reaches attention as per-window metadata (kv/metadata.windowed)."""

    architectures = ("MistralForCausalLM",)
