"""The Llama family decoder (Llama 2/3, SmolLM2, Mistral-style checkpoints without extras)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.kv.metadata import AttentionMetadata
from llmrun.kv.paged_cache import PagedKVCache
from llmrun.model.config import ModelConfig
from llmrun.model.layers import (
    RotaryTable, activation, apply_rope, linear, paged_attention, rms_norm, rope_inv_freq, write_kv,
)


class LlamaDecoder:
    """Pre-norm decoder: x + attn(norm(x)), then x + mlp(norm(x)); weights by their HF names.

    Weights arrive from a provider (weights/placed.py): `weights.layer(i)` and `weights.head()` are
    context managers yielding tensors on the compute device, so every placement runs this code.
    """

    architectures = ("LlamaForCausalLM",)

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, max_positions: int):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        rotary_dim = int(config.head_dim * float(config.raw.get("partial_rotary_factor") or 1.0))
        inv_freq, scaling = rope_inv_freq(dict(config.rope_parameters), rotary_dim)
        self.rotary = RotaryTable(inv_freq, scaling, max_positions, dtype, device)
        self.act = activation(config.hidden_act)
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim

    # -- weight layout (key -> HF tensors concatenated along dim 0) ------------------------------
    def embed_name(self) -> str:
        return "model.embed_tokens.weight"

    def head_name(self) -> str:
        """The output projection: lm_head, or the embeddings when tied."""
        return self.embed_name() if self.config.tie_word_embeddings else "lm_head.weight"

    def global_layout(self) -> dict[str, tuple[str, ...]]:
        return {"norm": ("model.norm.weight",)}

    def layer_layout(self, layer_idx: int) -> dict[str, tuple[str, ...]]:
        """q/k/v and gate/up are fused so each layer runs two input matmuls instead of five."""
        p = f"model.layers.{layer_idx}."
        layout = {
            "input_norm": (p + "input_layernorm.weight",),
            "qkv": (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"),
            "o": (p + "self_attn.o_proj.weight",),
            "post_norm": (p + "post_attention_layernorm.weight",),
            "gate_up": (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            "down": (p + "mlp.down_proj.weight",),
        }
        if self.config.attention_bias:
            layout["qkv_bias"] = tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv")
            layout["o_bias"] = (p + "self_attn.o_proj.bias",)
        if self.config.mlp_bias:
            layout["gate_up_bias"] = (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias")
            layout["down_bias"] = (p + "mlp.down_proj.bias",)
        return layout

    # -- forward -------------------------------------------------------------------------------
    def forward(self, weights, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, cache: PagedKVCache) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm, for flat tokens of all sequences."""
        hidden = weights.embed(input_ids)
        cos, sin = self.rotary.lookup(positions)
        for layer_idx in range(self.config.num_hidden_layers):
            with weights.layer(layer_idx) as w:
                k_slots, v_slots = cache.layer(layer_idx)
                hidden = self.layer_forward(w, hidden, cos, sin, meta, k_slots, v_slots)
        return rms_norm(hidden, weights.globals["norm"], self.config.rms_norm_eps)

    def layer_forward(self, w, hidden, cos, sin, meta, k_slots, v_slots) -> torch.Tensor:
        cfg = self.config
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, w["input_norm"], cfg.rms_norm_eps)
        qkv = linear(x, w["qkv"], w.get("qkv_bias"))
        qk_size = self.q_size + self.kv_size
        # q and k rotate together: [num_tokens, num_heads + num_kv_heads, head_dim]
        qk = apply_rope(qkv[:, :qk_size].view(num_tokens, -1, cfg.head_dim), cos, sin)
        q, k = qk[:, : cfg.num_attention_heads], qk[:, cfg.num_attention_heads :]
        v = qkv[:, qk_size:].view(num_tokens, cfg.num_key_value_heads, cfg.head_dim)
        write_kv(k_slots, v_slots, k, v, meta)
        attn = paged_attention(q, k_slots, v_slots, meta, self.scale)
        hidden = hidden + linear(attn, w["o"], w.get("o_bias"))
        x = rms_norm(hidden, w["post_norm"], cfg.rms_norm_eps)
        gate, up = linear(x, w["gate_up"], w.get("gate_up_bias")).chunk(2, dim=-1)
        return hidden + linear(self.act(gate) * up, w["down"], w.get("down_bias"))

    def logits(self, weights, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the given final hidden rows."""
        with weights.head() as head:
            return linear(hidden, head)
