"""The Gemma 2 and Gemma 3 (text) families: Gemma norms, scaled embeddings, soft-caps, sliding layers."""

from __future__ import annotations

from dataclasses import replace

import torch

from llmrun.kernels.interface import LayerShape
from llmrun.model.layers import soft_cap
from llmrun.model.llama import LlamaDecoder
from llmrun.model.rope import RotaryTable, rotary_table


class Gemma2Decoder(LlamaDecoder):
    """Gemma 2: embeddings × sqrt(hidden) (rounded to the run dtype first), RMSNorm x·(1+w) in
    float32, norms before and after both attention and MLP, GELU-tanh, attention scale
    query_pre_attn_scalar^-0.5, attention and final logit soft-capping, and sliding windows on the
    layers `layer_types` marks (every other one)."""

    architectures = ("Gemma2ForCausalLM",)
    norm_kind = "gemma"

    def __init__(self, config, dtype, device, max_positions: int, kernels):
        super().__init__(config, dtype, device, max_positions, kernels)
        raw = config.raw
        self.scale = float(raw.get("query_pre_attn_scalar") or config.head_dim) ** -0.5
        self.final_softcap = raw.get("final_logit_softcapping")
        self.normalizer = torch.tensor(config.hidden_size**0.5).to(dtype=dtype, device=self.device)

    @classmethod
    def attention_softcap(cls, config):
        return config.raw.get("attn_logit_softcapping")

    def layer_layout(self, layer_idx: int) -> dict[str, tuple[str, ...]]:
        p = f"model.layers.{layer_idx}."
        return {
            **super().layer_layout(layer_idx),
            "pre_mlp_norm": (p + "pre_feedforward_layernorm.weight",),
            "post_mlp_norm": (p + "post_feedforward_layernorm.weight",),
        }

    def embed(self, weights, input_ids: torch.Tensor) -> torch.Tensor:
        return weights.embed(input_ids) * self.normalizer

    def layer(self, ops, w, hidden, delta, rope, meta, k_slots, v_slots):
        """h = x + norm(o(attention(norm(x)))); out = h + norm(mlp(norm(h))): each sublayer's output
        normed too (post_attention_layernorm, post_feedforward_layernorm)."""
        hidden, qkv = ops.norm_linear(hidden, delta, w["input_norm"], w["qkv"], w.get("qkv_bias"))
        q = ops.rope_and_cache(qkv, rope, meta, k_slots, v_slots, w.get("q_norm"), w.get("k_norm"))
        attn = ops.attention(q, k_slots, v_slots, meta, self.scale, self.attn_softcap)
        attn = ops.linear(attn, w["o"], w.get("o_bias"))
        hidden, gate, up = ops.norm_gate_up(hidden, ops.norm(attn, w["post_norm"]), w["pre_mlp_norm"], w["gate_up"],
                                            w.get("gate_up_bias"))
        mlp = ops.linear(ops.act_mul(gate, up), w["down"], w.get("down_bias"))
        return hidden, ops.norm(mlp, w["post_mlp_norm"])

    def logits(self, weights, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(weights, hidden)
        return logits if self.final_softcap is None else soft_cap(logits, self.final_softcap)


class Gemma3Decoder(Gemma2Decoder):
    """Gemma 3 text: Gemma 2's layers plus a per-head x·(1+w) norm on q and k before RoPE, its own
    RoPE base for sliding layers (`rope_parameters` per layer type), sliding layers by the config's
    pattern, and no attention soft-capping (transformers' Gemma 3 never applies it)."""

    architectures = ("Gemma3ForCausalLM",)
    qk_norm = True

    @classmethod
    def attention_softcap(cls, config):
        return None

    @classmethod
    def layer_shape(cls, config) -> LayerShape:
        return replace(super().layer_shape(config), rope_tables=len(set(config.raw["layer_types"])))

    def build_rotaries(self) -> tuple[tuple[RotaryTable, ...], tuple[int, ...]]:
        """One table per layer type ("sliding_attention", "full_attention"), from that type's RoPE."""
        layer_types = self.config.raw["layer_types"]
        kinds = sorted(set(layer_types))
        tables = tuple(
            rotary_table(self.config.rope_parameters[kind], self.config.head_dim,
                         self.config.max_position_embeddings, self.max_positions, self.dtype, self.device)
            for kind in kinds
        )
        return tables, tuple(kinds.index(kind) for kind in layer_types)
