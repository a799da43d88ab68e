"""The Llama family decoder (Llama 2/3.x, SmolLM2), and the base the other families specialise."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from llmrun.kernels.interface import Kernels, LayerShape
from llmrun.kv.metadata import AttentionMetadata, windowed
from llmrun.kv.paged_cache import PagedKVCache
from llmrun.model.config import ModelConfig, sliding_windows
from llmrun.model.rope import RotaryTable, rotary_table


class LlamaDecoder:
    """Pre-norm decoder: x + attn(norm(x)), then x + mlp(norm(x)); weights by their HF names.

    Weights arrive from a provider (weights/placed.py): `weights.layer(i)` yields a layer's tensors
    on the compute device and `weights.head_chunks()` the head's vocabulary chunks in turn, so every
    placement runs this code. A streamed layer may hold one matrix at a time: a layer uses its
    matrices in its layout's order.
    The operations arrive as a kernel set (kernels/choose.py picks one for `layer_shape`): ATen's
    ops or fused kernels that passed their check. Families override the layout, the shape's
    variants (norm kind, q/k norms, soft-capping) and, where the math differs, `layer`.
    """

    architectures = ("LlamaForCausalLM",)
    qk_norm = False  # per-head q/k norms before RoPE (Qwen3, Gemma 3)
    norm_kind = "rms"  # LayerShape.norm

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, max_positions: int, kernels: Kernels):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_positions = max_positions
        self.kernels = kernels
        self.rotaries, self.layer_rotary = self.build_rotaries()
        self.windows = sliding_windows(config)
        self.scale = config.head_dim**-0.5
        self.attn_softcap = self.attention_softcap(config)
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim

    @classmethod
    def layer_shape(cls, config: ModelConfig) -> LayerShape:
        """What kernels need to know of this family's layers: their sizes and math's variants."""
        c = config
        return LayerShape(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps,
                          intermediate_size=c.intermediate_size, activation=c.hidden_act, norm=cls.norm_kind,
                          qk_norm=cls.qk_norm, rotary_dim=cls.rotary_dim(c, c.rope_parameters),
                          softcap=cls.attention_softcap(c),
                          sliding=any(window is not None for window in sliding_windows(c)))

    @classmethod
    def attention_softcap(cls, config: ModelConfig):
        """The attention scores' soft-cap (Gemma 2), or None."""
        return None

    @classmethod
    def rotary_dim(cls, config: ModelConfig, rope_parameters) -> int:
        factor = rope_parameters.get("partial_rotary_factor") or config.raw.get("partial_rotary_factor")
        return int(config.head_dim * float(factor or 1.0))

    def build_rotaries(self) -> tuple[tuple[RotaryTable, ...], tuple[int, ...]]:
        """The RoPE tables and, per layer, the index of the one it uses (one table here)."""
        params = self.config.rope_parameters
        table = rotary_table(params, self.rotary_dim(self.config, params), self.config.max_position_embeddings,
                             self.max_positions, self.dtype, self.device)
        return (table,), (0,) * self.config.num_hidden_layers

    def rope_variant(self, seq_len: int) -> int:
        """Which RoPE table a sequence of `seq_len` tokens uses (LongRoPE: 0 short, 1 long; else 0).

        K cached under another variant is stale: the engine recomputes it, as transformers' Phi-3
        generation drops its cache when a sequence grows past the original context.
        """
        return max(table.variant(seq_len) for table in self.rotaries)

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
        if self.qk_norm:
            layout.update(q_norm=(p + "self_attn.q_norm.weight",), k_norm=(p + "self_attn.k_norm.weight",))
        return layout

    # -- forward -------------------------------------------------------------------------------
    def forward(self, weights, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, cache: PagedKVCache) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm, for flat tokens of all sequences.

        Each layer returns its residual stream and the output it has not yet added to it (`delta`):
        the next norm adds it (a fused set then runs the add with the norm, or on CUDA adds it in the
        matmul before). A step the kernel set runs a whole layer for (a float32 decode step of one
        sequence on the CPU: kernels/native_layer.py) calls it for every layer whose tensors it takes."""
        return self.forward_many(weights, [(input_ids, positions, meta)], cache)[0]

    def forward_many(self, weights, parts: list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]],
                     cache: PagedKVCache) -> list[torch.Tensor]:
        """Several forwards (input_ids, positions, meta) in lockstep, layer by layer: each part runs
        exactly the ops its own forward would, so its bits are its own, but a layer's weights are
        fetched once for all of them (streamed once a step; a compressed weight dequantized once for
        every prompt chunk, kernels/quant.py's `sharing_dequantized`). Where layers stream matrix by
        matrix (each matrix readable once, in order) the parts run one after another instead."""
        if len(parts) > 1 and weights.stages_matrices:
            return [self.forward_many(weights, [part], cache)[0] for part in parts]
        states = [self._begin(weights, *part) for part in parts]
        shared = self.kernels.quant.sharing_dequantized if len(parts) > 1 else nullcontext
        for layer_idx in range(self.config.num_hidden_layers):
            with weights.layer(layer_idx) as w, shared():
                k_slots, v_slots = cache.layer(layer_idx)
                for state in states:
                    self._run_layer(state, layer_idx, w, k_slots, v_slots)
        return [state.ops.add_norm(state.hidden, state.delta, weights.globals["norm"])[1] for state in states]

    def _begin(self, weights, input_ids: torch.Tensor, positions: torch.Tensor,
               meta: AttentionMetadata) -> "_Forward":
        hidden = self.embed(weights, input_ids)
        ops = self.kernels.for_rows(hidden.shape[0])
        ropes = [table.lookup(positions, meta) for table in self.rotaries]
        metas = {window: windowed(meta, window) for window in set(self.windows) if window is not None}
        metas[None] = meta
        whole = ops.whole_layer(hidden, ropes[0], meta, self.scale, self.layer_over(ops))
        return _Forward(ops, ropes, metas, whole, hidden)

    def _run_layer(self, state: "_Forward", layer_idx: int, w, k_slots, v_slots) -> None:
        rope, layer_meta = state.ropes[self.layer_rotary[layer_idx]], state.metas[self.windows[layer_idx]]
        whole = state.whole
        if whole is not None and isinstance(w, dict) and whole.takes(layer_idx, w):  # all at once
            state.hidden, state.delta = whole.run(w, k_slots, v_slots, state.hidden, state.delta)
        else:
            state.hidden, state.delta = self.layer(state.ops, w, state.hidden, state.delta, rope, layer_meta,
                                                   k_slots, v_slots)

    def layer_over(self, ops: Kernels):
        """`layer` over one kernel set: (w, hidden, delta, rope, meta, k_slots, v_slots) -> (hidden, delta)."""
        return lambda *args: self.layer(ops, *args)

    def layer(self, ops: Kernels, w, hidden, delta, rope, meta, k_slots, v_slots):
        """One layer: h = x + o(attention(norm(x))); out = h + down(act(gate(norm(h))) · up(norm(h))).
        Returns (h, the MLP's output), its add left to the next norm; `delta` is the last one's."""
        hidden, qkv = ops.norm_linear(hidden, delta, w["input_norm"], w["qkv"], w.get("qkv_bias"))
        q = ops.rope_and_cache(qkv, rope, meta, k_slots, v_slots, w.get("q_norm"), w.get("k_norm"))
        attn = ops.attention(q, k_slots, v_slots, meta, self.scale, self.attn_softcap)
        hidden, delta = ops.linear_residual(attn, w["o"], w.get("o_bias"), hidden)
        hidden, gate, up = ops.norm_gate_up(hidden, delta, w["post_norm"], w["gate_up"], w.get("gate_up_bias"))
        return ops.linear_residual(ops.act_mul(gate, up), w["down"], w.get("down_bias"), hidden)

    def embed(self, weights, input_ids: torch.Tensor) -> torch.Tensor:
        return weights.embed(input_ids)

    def logits(self, weights, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the given final hidden rows, a chunk of the vocabulary at a time
        as the head's rows arrive (the whole head at once when it is resident)."""
        chunks = [self.kernels.linear(hidden, head) for head in weights.head_chunks()]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)


@dataclass
class _Forward:
    """One part of `forward_many` between layers: its kernel set, rotary tables, metadata per
    window, whole-layer call, and its residual stream (hidden, and the delta the next norm adds)."""

    ops: Kernels
    ropes: list
    metas: dict
    whole: object
    hidden: torch.Tensor
    delta: Optional[torch.Tensor] = None
