"""The Llama family decoder (Llama 2/3.x, SmolLM2), and the base the other families specialise."""

from __future__ import annotations

from typing import Optional

import torch

from llmrun.kv.metadata import AttentionMetadata, windowed
from llmrun.kv.paged_cache import PagedKVCache
from llmrun.model.attention import paged_attention, write_kv
from llmrun.model.config import ModelConfig, sliding_windows
from llmrun.model.layers import activation, linear, linear_halves, rms_norm
from llmrun.kernels.interface import FusedKernels, LayerShape, fused_kernels
from llmrun.model.rope import RotaryTable, apply_rope, rotary_table


class LlamaDecoder:
    """Pre-norm decoder: x + attn(norm(x)), then x + mlp(norm(x)); weights by their HF names.

    Weights arrive from a provider (weights/placed.py): `weights.layer(i)` and `weights.head()` are
    context managers yielding tensors on the compute device, so every placement runs this code.
    Families override the hooks: layer_layout, project_qkv, norm, layer_forward, embed, logits.
    """

    architectures = ("LlamaForCausalLM",)
    qk_norm = False  # per-head q/k norms before RoPE (Qwen3, Gemma 3)

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, max_positions: int):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_positions = max_positions
        self.rotaries, self.layer_rotary = self.build_rotaries()
        self.windows = sliding_windows(config)
        self.act = activation(config.hidden_act)
        self.scale = config.head_dim**-0.5
        self.attn_softcap = None
        self.q_size = config.num_attention_heads * config.head_dim
        self.kv_size = config.num_key_value_heads * config.head_dim
        self.native = self.native_kernels()
        self._layer_verified: Optional[bool] = None  # whether the whole-layer call matched (layer_matches)

    def native_kernels(self) -> Optional[FusedKernels]:
        """Fused kernels (C on the CPU for decode steps, model/native.py; Triton on CUDA for every
        step, model/gpu_kernels.py) where this decoder runs the plain Llama layer: its own norm,
        attention and layer code, full-width RoPE, no q/k norms."""
        base = LlamaDecoder
        cls = type(self)
        plain = (cls.layer_forward is base.layer_forward and cls.norm is base.norm and cls.attention is base.attention
                 and cls.project_qkv is base.project_qkv and not self.qk_norm
                 and all(table.cos.shape[-1] == self.config.head_dim for table in self.rotaries))
        return fused_kernels(self.dtype, self.device, self.layer_shape()) if plain else None

    def layer_shape(self) -> LayerShape:
        """What fused kernels need to know of this decoder's layers."""
        c = self.config
        return LayerShape(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps,
                          intermediate_size=c.intermediate_size, silu=c.hidden_act == "silu")

    def rotary_dim(self, rope_parameters) -> int:
        factor = rope_parameters.get("partial_rotary_factor") or self.config.raw.get("partial_rotary_factor")
        return int(self.config.head_dim * float(factor or 1.0))

    def build_rotaries(self) -> tuple[tuple[RotaryTable, ...], tuple[int, ...]]:
        """The RoPE tables and, per layer, the index of the one it uses (one table here)."""
        params = self.config.rope_parameters
        table = rotary_table(params, self.rotary_dim(params), self.config.max_position_embeddings,
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
        """Hidden states [num_tokens, hidden] after the final norm, for flat tokens of all sequences."""
        hidden = self.embed(weights, input_ids)
        ropes = [table.lookup(positions, meta) for table in self.rotaries]
        metas = {window: windowed(meta, window) for window in set(self.windows) if window is not None}
        metas[None] = meta
        if self.native is not None and self.native.usable(hidden.shape[0]):
            return self.forward_native(weights, hidden, ropes, metas, cache)
        for layer_idx in range(self.config.num_hidden_layers):
            rope, layer_meta = ropes[self.layer_rotary[layer_idx]], metas[self.windows[layer_idx]]
            with weights.layer(layer_idx) as w:
                k_slots, v_slots = cache.layer(layer_idx)
                hidden = self.layer_forward(w, hidden, rope, layer_meta, k_slots, v_slots)
        return self.norm(hidden, weights.globals["norm"])

    def forward_native(self, weights, hidden, ropes, metas, cache: PagedKVCache) -> torch.Tensor:
        """`forward` with the fused kernels: each residual add runs with the norm after it (or, on
        CUDA, in the matmul before it: each norm then runs in the matmul after it), RoPE with the
        K/V writes. On the CPU the same values as the ATen ops, bit for bit; on CUDA the norms,
        the GEMVs and static decode steps' attention sum in their own order (model/gpu_kernels.py).
        A float32 decode step of one sequence runs each layer in one C call (model/native_layer.py)."""
        c, native = self.config, self.native
        delta = None  # the last projection's output, not yet added to `hidden`
        whole = self.whole_layer_step(hidden, ropes[0], metas[None])
        for layer_idx in range(c.num_hidden_layers):
            rope, meta = ropes[self.layer_rotary[layer_idx]], metas[self.windows[layer_idx]]
            with weights.layer(layer_idx) as w:
                k_slots, v_slots = cache.layer(layer_idx)
                if whole is not None and native.layer.takes(layer_idx, w) and self.layer_matches(w, rope, meta):
                    hidden, delta = native.layer.run(whole[0], w, k_slots, v_slots, hidden, delta, whole[1:])
                else:
                    hidden, delta = self.fused_layer(w, hidden, delta, rope, meta, k_slots, v_slots)
        return native.add_rms_norm(hidden, delta, weights.globals["norm"])[1]

    def fused_layer(self, w, hidden, delta, rope, meta, k_slots, v_slots):
        """One layer over the fused kernels: (hidden + delta through attention, the MLP's output)."""
        native = self.native
        hidden, qkv = native.norm_linear(hidden, delta, w["input_norm"], w["qkv"], w.get("qkv_bias"))
        q = native.rope_qkv(qkv, rope[0], rope[1], k_slots, v_slots, meta.slot_mapping)
        if native.can_attend(meta, self.attn_softcap):
            attn = native.attend(q, k_slots, v_slots, meta, self.scale)
        else:
            attn = paged_attention(q, k_slots, v_slots, meta, self.scale, self.attn_softcap)
        hidden, delta = native.linear_residual(attn, w["o"], w.get("o_bias"), hidden)
        hidden, gate_up = native.norm_linear(hidden, delta, w["post_norm"], w["gate_up"], w.get("gate_up_bias"))
        gate, up = gate_up.chunk(2, dim=-1)
        act = native.silu_mul(gate, up) if native.can_silu_mul(gate.shape[0]) else self.act(gate) * up
        return native.linear_residual(act, w["down"], w.get("down_bias"), hidden)

    def whole_layer_step(self, hidden, rope, meta):
        """The kernel set's whole-layer call for this step (its shared arguments and output rows),
        where it runs: one sequence's decode step, one RoPE table, no sliding windows or
        soft-capping; else None."""
        layer = self.native.layer
        if (layer is None or self._layer_verified is False or not layer.can_run(hidden.shape[0], meta)
                or self.attn_softcap is not None or len(self.rotaries) != 1
                or any(window is not None for window in self.windows)):
            return None
        return layer.begin(hidden, rope, meta, self.scale)

    def layer_matches(self, w, rope, meta) -> bool:
        """Whether the whole-layer call gives fused_layer's bits on this decoder's weights (checked
        once, on the first layer it meets, with random rows over scratch K/V pools of one block and
        of two, the second ragged)."""
        if self._layer_verified is None:
            self._layer_verified = all(self._layer_agrees(w, rope, meta, length) for length in (37, 600))
        return self._layer_verified

    def _layer_agrees(self, w, rope, meta, length: int) -> bool:
        from dataclasses import replace

        c, generator = self.config, torch.Generator().manual_seed(length)
        pools = [torch.randn(length + 3, c.num_key_value_heads, c.head_dim, generator=generator) for _ in range(2)]
        hidden, delta = (torch.randn(1, c.hidden_size, generator=generator) for _ in range(2))
        slot = torch.tensor([length + 1], device=hidden.device)
        trial = replace(meta, slot_mapping=slot, decode_span=(2, length))
        k_copy, v_copy = pools[0].clone(), pools[1].clone()
        expected = self.fused_layer(w, hidden, delta, rope, trial, k_copy, v_copy)
        step = self.native.layer.begin(hidden, rope, trial, self.scale)
        actual = self.native.layer.run(step[0], w, pools[0], pools[1], hidden, delta, step[1:])
        return (all(torch.equal(a, e) for a, e in zip(actual, expected))
                and torch.equal(pools[0], k_copy) and torch.equal(pools[1], v_copy))

    def embed(self, weights, input_ids: torch.Tensor) -> torch.Tensor:
        return weights.embed(input_ids)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.config.rms_norm_eps)

    def layer_forward(self, w, hidden, rope, meta, k_slots, v_slots) -> torch.Tensor:
        x = self.norm(hidden, w["input_norm"])
        hidden = hidden + linear(self.attention(w, x, rope, meta, k_slots, v_slots), w["o"], w.get("o_bias"))
        return hidden + self.mlp(w, self.norm(hidden, w["post_norm"]))

    def project_qkv(self, w, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k before RoPE together [num_tokens, num_heads + num_kv_heads, head_dim], and v."""
        num_tokens, qk_size = x.shape[0], self.q_size + self.kv_size
        qkv = linear(x, w["qkv"], w.get("qkv_bias"))
        qk = qkv[:, :qk_size].view(num_tokens, -1, self.config.head_dim)  # [tokens, heads + kv_heads, dim]
        v = qkv[:, qk_size:].view(num_tokens, self.config.num_key_value_heads, self.config.head_dim)
        return (self.norm_heads(w, qk) if self.qk_norm else qk), v

    def norm_heads(self, w, qk: torch.Tensor) -> torch.Tensor:
        """Per-head norms of q and k before RoPE (Qwen3, Gemma 3): weights [head_dim] each."""
        num_heads = self.config.num_attention_heads
        q = self.norm(qk[:, :num_heads], w["q_norm"])  # [num_tokens, num_heads, head_dim]
        k = self.norm(qk[:, num_heads:], w["k_norm"])  # [num_tokens, num_kv_heads, head_dim]
        return torch.cat((q, k), dim=1)

    def attention(self, w, x, rope, meta, k_slots, v_slots) -> torch.Tensor:
        """Attention output [num_tokens, num_heads * head_dim], before o_proj; q and k rotate together."""
        qk, v = self.project_qkv(w, x)
        qk = apply_rope(qk, *rope)
        q, k = qk[:, : self.config.num_attention_heads], qk[:, self.config.num_attention_heads :]
        write_kv(k_slots, v_slots, k, v, meta)
        return paged_attention(q, k_slots, v_slots, meta, self.scale, self.attn_softcap)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """layers.linear, or the kernel set's where it has a faster matmul (the CPU's bf16 GEMV)."""
        return linear(x, weight, bias) if self.native is None else self.native.linear(x, weight, bias)

    def mlp(self, w, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear_halves(x, w["gate_up"], w.get("gate_up_bias"), matmul=self.linear)
        if self.native is not None and self.native.can_silu_mul(x.shape[0]):
            return self.linear(self.native.silu_mul(gate, up), w["down"], w.get("down_bias"))
        return self.linear(self.act(gate) * up, w["down"], w.get("down_bias"))

    def logits(self, weights, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the given final hidden rows."""
        with weights.head() as head:
            return self.linear(hidden, head)
