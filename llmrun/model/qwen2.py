"""The Qwen2 family (Qwen2, Qwen2.5): bias on the q/k/v projections, optional sliding layers."""

from __future__ import annotations

from llmrun.model.llama import LlamaDecoder


class Qwen2Decoder(LlamaDecoder):
    """Qwen2 always has q/k/v biases and never an o_proj bias. With `use_sliding_window`, the layers
    from `max_window_layers` on slide (the config's `layer_types` says which; config.sliding_windows)."""

    architectures = ("Qwen2ForCausalLM",)

    def layer_layout(self, layer_idx: int) -> dict[str, tuple[str, ...]]:
        p = f"model.layers.{layer_idx}.self_attn."
        layout = super().layer_layout(layer_idx)
        layout["qkv_bias"] = (p + "q_proj.bias", p + "k_proj.bias", p + "v_proj.bias")
        layout.pop("o_bias", None)
        return layout
