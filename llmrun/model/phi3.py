"""The Phi-3 family (Phi-3/3.5 mini and medium, Phi-4-mini): fused checkpoint tensors, LongRoPE."""

from __future__ import annotations

from llmrun.model.llama import LlamaDecoder


class Phi3Decoder(LlamaDecoder):
    """Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj` (gate rows first),
    exactly the fused layout the Llama decoder runs.

    What else Phi-3 needs comes from its config through the shared code: LongRoPE's short/long
    tables and their attention scaling (rope.py), `partial_rotary_factor` (Phi-4-mini), and a
    `sliding_window` on every layer (Phi-3-mini-4k: 2047).
    """

    architectures = ("Phi3ForCausalLM",)

    def layer_layout(self, layer_idx: int) -> dict[str, tuple[str, ...]]:
        p = f"model.layers.{layer_idx}."
        return {
            "input_norm": (p + "input_layernorm.weight",),
            "qkv": (p + "self_attn.qkv_proj.weight",),
            "o": (p + "self_attn.o_proj.weight",),
            "post_norm": (p + "post_attention_layernorm.weight",),
            "gate_up": (p + "mlp.gate_up_proj.weight",),
            "down": (p + "mlp.down_proj.weight",),
        }
