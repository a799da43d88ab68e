"""The Qwen3 family: Llama's layers with a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

import torch

from llmrun.model.llama import LlamaDecoder


class Qwen3Decoder(LlamaDecoder):
    """Qwen3 normalises each head of q and k (weights [head_dim]) before rotating them; biases
    follow `attention_bias`, sliding layers `layer_types`, as in the base decoder."""

    architectures = ("Qwen3ForCausalLM",)

    def layer_layout(self, layer_idx: int) -> dict[str, tuple[str, ...]]:
        p = f"model.layers.{layer_idx}.self_attn."
        return {**super().layer_layout(layer_idx),
                "q_norm": (p + "q_norm.weight",), "k_norm": (p + "k_norm.weight",)}

    def project_qkv(self, w, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qk, v = super().project_qkv(w, x)
        return self.norm_heads(w, qk), v
