"""The Llama family decoder (Llama 2/3, SmolLM2, Mistral-style checkpoints without extras)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmrun.kv.metadata import AttentionMetadata
from llmrun.kv.paged_cache import PagedKVCache
from llmrun.model.config import ModelConfig
from llmrun.model.layers import (
    RotaryTable, activation, apply_rope, paged_attention, rms_norm, rope_inv_freq, write_kv,
)


class LlamaDecoder:
    """Pre-norm decoder: x + attn(norm(x)), then x + mlp(norm(x)); weights by their HF names.

    Weights arrive per layer from a weights provider (`weights.layer(i)` is a context manager
    yielding that layer's prepared tensors), so resident and streamed placements share this code.
    """

    architectures = ("LlamaForCausalLM",)

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, max_positions: int):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        inv_freq, scaling = rope_inv_freq(dict(config.rope_parameters), config.head_dim)
        self.rotary = RotaryTable(inv_freq, scaling, max_positions, dtype, device)
        self.act = activation(config.hidden_act)
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim

    # -- weight names --------------------------------------------------------------------------
    def global_tensor_names(self) -> dict[str, str]:
        names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names

    def layer_tensor_names(self, layer_idx: int) -> dict[str, str]:
        prefix = f"model.layers.{layer_idx}."
        names = {
            "input_norm": "input_layernorm.weight",
            "post_norm": "post_attention_layernorm.weight",
            "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
            "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
            "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight",
        }
        if self.config.attention_bias:
            names.update(q_bias="self_attn.q_proj.bias", k_bias="self_attn.k_proj.bias",
                         v_bias="self_attn.v_proj.bias", o_bias="self_attn.o_proj.bias")
        if self.config.mlp_bias:
            names.update(gate_bias="mlp.gate_proj.bias", up_bias="mlp.up_proj.bias",
                         down_bias="mlp.down_proj.bias")
        return {key: prefix + name for key, name in names.items()}

    def prepare_layer(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fuse q/k/v and gate/up so each layer runs two input matmuls instead of five."""
        out = {k: v for k, v in tensors.items() if k not in ("q", "k", "v", "gate", "up")}
        out["qkv"] = torch.cat((tensors["q"], tensors["k"], tensors["v"]), dim=0)
        out["gate_up"] = torch.cat((tensors["gate"], tensors["up"]), dim=0)
        for fused, parts in (("qkv_bias", ("q_bias", "k_bias", "v_bias")),
                             ("gate_up_bias", ("gate_bias", "up_bias"))):
            if parts[0] in tensors:
                out[fused] = torch.cat([tensors[key] for key in parts])
                for key in parts:
                    del out[key]
        return out

    # -- forward -------------------------------------------------------------------------------
    def forward(self, weights, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, cache: PagedKVCache) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm, for flat tokens of all sequences."""
        hidden = F.embedding(input_ids, weights.globals["embed"])
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
        qkv = F.linear(x, w["qkv"], w.get("qkv_bias"))
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = apply_rope(q.view(num_tokens, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.view(num_tokens, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.view(num_tokens, cfg.num_key_value_heads, cfg.head_dim)
        write_kv(k_slots, v_slots, k, v, meta)
        attn = paged_attention(q, k_slots, v_slots, meta, self.scale)
        hidden = hidden + F.linear(attn, w["o"], w.get("o_bias"))
        x = rms_norm(hidden, w["post_norm"], cfg.rms_norm_eps)
        gate, up = F.linear(x, w["gate_up"], w.get("gate_up_bias")).chunk(2, dim=-1)
        return hidden + F.linear(self.act(gate) * up, w["down"], w.get("down_bias"))

    def logits(self, weights, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the given final hidden rows."""
        head = weights.globals.get("lm_head")
        return F.linear(hidden, head if head is not None else weights.globals["embed"])
