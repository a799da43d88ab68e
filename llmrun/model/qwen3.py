"""The Qwen3 family: Llama's layers with a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

from llmrun.model.llama import LlamaDecoder


class Qwen3Decoder(LlamaDecoder):
    """Qwen3 normalises each head of q and k (weights [head_dim]) before rotating them; biases
    follow `attention_bias`, sliding layers `layer_types`, as in the base decoder."""

    architectures = ("Qwen3ForCausalLM",)
    qk_norm = True
