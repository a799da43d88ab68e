"""The float32 decode layer in one C call (native_layer.c): its binding, its self-check, when it runs.

One sequence's float32 decode step spends ~4 ms a token outside its matmuls on a 2-core CPU: the
Python and dispatch around ~10 ops a layer and SDPA's setup. native_layer.c runs a whole Llama layer
for one token in C, calling the same BLAS `sgemm_` ATen calls (MKL's, from libtorch) with the same
arguments, and reproducing ATen's flash attention for one query. It runs only where the layer shape
is Llama's exactly (LayerShape.plain_llama: no q/k norms, soft-capping or sliding windows, one RoPE
table), the layer has no biases, and the step is one sequence's decode: its K/V rows read in place
where they are contiguous, else (after a prefix-cache hit) gathered in order into scratch first, as
ATen's path gathers them, so the same sums. Before use it is checked against ATen: the attention on
synthetic data over several context lengths here, and each decoder's first layer on its own weights
against the decoder's layer function over the same kernel set (`NativeLayer.agrees`).
"""

from __future__ import annotations

import ctypes
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from llmrun.kernels.interface import check_forced_to_fail
from llmrun.kv.metadata import AttentionMetadata
from llmrun.model.attention import paged_attention

CHECK_LENGTHS = (1, 17, 255, 512, 513, 700, 1100, 1300)  # contexts: a vector or less, tails, blocks
KV_SPLIT = 512  # keys per block in ATen's flash attention (and native_layer.c)

_p, _f = ctypes.c_void_p, ctypes.c_float


class LayerWeights(ctypes.Structure):
    """struct layer_weights: one layer's weights and K/V pools."""

    _fields_ = [(name, _p) for name in ("input_norm", "qkv", "o", "post_norm", "gate_up", "down",
                                        "k_pool", "v_pool")]


class LayerStep(ctypes.Structure):
    """struct layer_step: what every layer of one decode step shares."""

    _fields_ = ([("sgemm", _p), ("exp_fn", _p)]
                + [(name, ctypes.c_int) for name in ("exp_width", "lanes", "threads", "hidden", "heads",
                                                     "kv_heads", "dim", "intermediate")]
                + [("eps", _f), ("scale", _f), ("cos", _p), ("sin_folded", _p), ("slot", _p),
                   ("span_start", ctypes.c_long), ("span_len", ctypes.c_long), ("rows", _p), ("scratch", _p)])


@lru_cache(maxsize=1)
def blas_sgemm() -> Optional[int]:
    """The address of the BLAS `sgemm_` ATen's float32 matmuls call (MKL's, exported by libtorch_cpu)."""
    try:
        libtorch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(libtorch.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def declare_layer(lib: ctypes.CDLL) -> None:
    """The argument types of native_layer.c's functions."""
    i64, i32 = ctypes.c_long, ctypes.c_int
    lib.layer_supported.restype = i32
    lib.attend_one_f32.argtypes = [_p, _p, _p, _p, i64, i64, i32, i32, i32, _f, _p, _p, i32]
    lib.attend_one_f32.restype = None
    lib.decode_layer_f32.argtypes = [ctypes.POINTER(LayerWeights), ctypes.POINTER(LayerStep), _p, _p, _p, _p]
    lib.decode_layer_f32.restype = None
    lib.layer_scratch_floats.argtypes = [ctypes.POINTER(LayerStep)]
    lib.layer_scratch_floats.restype = i64


class NativeLayer:
    """native_layer.c bound to one decoder's shape, with NativeKernels' norm lanes and SiLU exp."""

    def __init__(self, kernels, sgemm: int):
        self.lib, self.shape, self.sgemm = kernels.lib, kernels.shape, sgemm
        self.lanes, self.exp_fn, self.exp_width = kernels.lanes, kernels.exp_fn, kernels.exp_width
        self._scratch = torch.empty(0)
        self._takes: dict[int, bool] = {}  # layer index -> whether the C layer reads its tensors
        self.verified: Optional[bool] = None  # whether it gave the decoder's layer's bits (`agrees`, once)
        self.ran = False  # whether a decode step ran a layer here (for reports)

    @classmethod
    def for_kernels(cls, kernels) -> Optional["NativeLayer"]:
        """The layer for a float32 kernel set whose SiLU·mul checked out, where the library has it,
        the CPU runs it and its attention gives ATen's bits; else None."""
        sgemm = blas_sgemm()
        if (kernels.dtype != torch.float32 or kernels.exp_fn is None or not kernels.shape.plain_llama or sgemm is None
                or not kernels.avx512 or not hasattr(kernels.lib, "decode_layer_f32")
                or not kernels.lib.layer_supported()):
            return None
        layer = cls(kernels, sgemm)
        return layer if layer.attention_matches() else None

    @staticmethod
    def can_run(num_rows: int, meta) -> bool:
        """One sequence's decode step (its K/V rows contiguous, or gathered in order in C)."""
        return num_rows == 1 and meta.one_sequence_keys() is not None

    def call(self, hidden: torch.Tensor, rope, meta, scale: float, reference) -> Optional["LayerCall"]:
        """This step's layer calls, where the step is one the layer runs and it has not failed `agrees`."""
        if self.verified is False or not self.can_run(hidden.shape[0], meta):
            return None
        return LayerCall(self, self.begin(hidden, rope, meta, scale), rope, meta, scale, reference)

    def agrees(self, reference, w: dict, rope, meta, scale: float) -> bool:
        """Whether the layer gives `reference`'s bits (the decoder's layer over the same kernel set)
        on this decoder's weights: checked once, on the first layer it meets, with random rows over
        scratch K/V pools of one block and of two, the second ragged."""
        if self.verified is None:
            self.verified = all(self._agrees_at(reference, w, rope, meta, scale, length) for length in (37, 600))
        return self.verified

    def _agrees_at(self, reference, w: dict, rope, meta, scale: float, length: int) -> bool:
        s, generator = self.shape, torch.Generator().manual_seed(length)
        pools = [torch.randn(length + 3, s.num_kv_heads, s.head_dim, generator=generator) for _ in range(2)]
        hidden, delta = (torch.randn(1, s.hidden_size, generator=generator) for _ in range(2))
        trial = replace(meta, slot_mapping=torch.tensor([length + 1]), decode_span=(2, length))
        k_copy, v_copy = pools[0].clone(), pools[1].clone()
        expected = reference(w, hidden, delta, rope, trial, k_copy, v_copy)
        step = self.begin(hidden, rope, trial, scale)
        actual = self.run(step[0], w, pools[0], pools[1], hidden, delta, step[1:])
        return (all(torch.equal(a, e) for a, e in zip(actual, expected))
                and torch.equal(pools[0], k_copy) and torch.equal(pools[1], v_copy))

    def takes(self, layer_idx: int, w: dict) -> bool:
        """Whether a layer's tensors are ones the C layer reads: no biases, plain contiguous weight tensors
        (a layer's structure, so looked at once per layer, whether its weights stream or not)."""
        known = self._takes.get(layer_idx)
        if known is None:
            known = self._takes[layer_idx] = (
                not any(key.endswith("bias") for key in w)
                and all(isinstance(w[key], torch.Tensor) and not w[key].is_mkldnn and w[key].is_contiguous()
                        for key in ("qkv", "o", "gate_up", "down")))
        return known

    def begin(self, hidden: torch.Tensor, rope, meta, scale: float) -> tuple[LayerStep, torch.Tensor, torch.Tensor]:
        """A step's shared arguments and its output rows (hidden, delta), for `run` on every layer."""
        s, (start, length, rows) = self.shape, meta.one_sequence_keys()
        step = LayerStep(self.sgemm, self.exp_fn, self.exp_width, self.lanes, torch.get_num_threads(), s.hidden_size,
                         s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, s.eps, scale,
                         rope[0].data_ptr(), rope[1].data_ptr(), meta.slot_mapping.data_ptr(), start, KV_SPLIT, None,
                         None)
        floats = self.lib.layer_scratch_floats(ctypes.byref(step))  # for any context: its blocks are 512 keys
        if rows is not None:  # and room to gather this context's keys and values
            step.span_len, step.rows = length, rows.data_ptr()
            floats = max(floats, self.lib.layer_scratch_floats(ctypes.byref(step)))
        if self._scratch.numel() < floats:
            self._scratch = torch.empty(floats, dtype=torch.float32)
        step.span_len, step.scratch = length, self._scratch.data_ptr()
        step.keep = (self._scratch, rows)  # a step in flight keeps its scratch (even if a later one grows it), rows
        return step, torch.empty_like(hidden), torch.empty_like(hidden)

    def run(self, step: LayerStep, w: dict, k_pool: torch.Tensor, v_pool: torch.Tensor, hidden: torch.Tensor,
            delta: Optional[torch.Tensor], out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer: (hidden + delta, through attention) and the MLP's output, into `out`."""
        weights = LayerWeights(w["input_norm"].data_ptr(), w["qkv"].data_ptr(), w["o"].data_ptr(),
                               w["post_norm"].data_ptr(), w["gate_up"].data_ptr(), w["down"].data_ptr(),
                               k_pool.data_ptr(), v_pool.data_ptr())
        self.lib.decode_layer_f32(ctypes.byref(weights), ctypes.byref(step), hidden.data_ptr(),
                                  None if delta is None else delta.data_ptr(), out[0].data_ptr(), out[1].data_ptr())
        self.ran = True
        return out

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, start: int, length: int,
               scale: float) -> torch.Tensor:
        """The C attention alone: q [heads, dim] over pool rows [start, start + length)."""
        s, threads = self.shape, torch.get_num_threads()
        out = torch.empty(s.num_heads * s.head_dim)
        buf = torch.empty(threads * (min(length, KV_SPLIT) + 2 + s.head_dim))
        self.lib.attend_one_f32(self.sgemm, q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), start, length,
                                s.num_heads, s.num_kv_heads, s.head_dim, scale, out.data_ptr(), buf.data_ptr(),
                                threads)
        return out

    def attention_matches(self) -> bool:
        """The C attention against paged_attention (SDPA over the pool rows in place), bit for bit,
        on random data with sharp and flat scores over contexts of one vector, tails, one and
        several blocks."""
        if check_forced_to_fail("layer"):
            return False
        s = self.shape
        generator = torch.Generator().manual_seed(4)
        for length in CHECK_LENGTHS:
            meta = AttentionMetadata(slot_mapping=torch.tensor([length + 4]), query_starts=(0,), query_lens=(1,),
                                     cached_lens=(length - 1,), seq_lens=(length,), context_slots=(),
                                     decode_slots=None, decode_mask=None, decode_span=(5, length))
            for sharpness in (4.0, 1.0, 0.05):
                k_pool = torch.randn(length + 9, s.num_kv_heads, s.head_dim, generator=generator) * sharpness
                v_pool = torch.randn(length + 9, s.num_kv_heads, s.head_dim, generator=generator)
                q = torch.randn(1, s.num_heads, s.head_dim, generator=generator) * sharpness
                expected = paged_attention(q, k_pool, v_pool, meta, s.head_dim**-0.5)
                if not torch.equal(self.attend(q, k_pool, v_pool, 5, length, s.head_dim**-0.5), expected.flatten()):
                    return False
        return True


class LayerCall:
    """One decode step's whole-layer calls: the step's shared arguments and output rows, taken by
    each layer whose tensors the C layer reads once it agreed with the decoder's layer."""

    def __init__(self, layer: NativeLayer, begun, rope, meta, scale: float, reference):
        self.layer, self.step, self.out = layer, begun[0], begun[1:]
        self.rope, self.meta, self.scale, self.reference = rope, meta, scale, reference

    def takes(self, layer_idx: int, w: dict) -> bool:
        return self.layer.takes(layer_idx, w) and self.layer.agrees(self.reference, w, self.rope, self.meta, self.scale)

    def run(self, w: dict, k_pool: torch.Tensor, v_pool: torch.Tensor, hidden: torch.Tensor,
            delta: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.run(self.step, w, k_pool, v_pool, hidden, delta, self.out)
