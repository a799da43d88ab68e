"""A bf16 decode layer over quantized weights in one C call (quant_layer.c): its binding, its check, when it runs.

One sequence's int4 decode step reads SmolLM2's layer weights in ~3 ms, and the Python, dispatch and
SDPA set-up around each layer's ~10 ops cost as much again (for 16 sequences, an SDPA call each).
quant_layer.c runs a Llama layer for a decode step's rows (up to MAX_ROWS, each one sequence's token) in C with the C set's own norm, RoPE and SiLU·mul functions (native_kernels.c, so the same code)
and quant_kernels.c's matmuls; only attention is its own (float32, one rounding), so the layer is
checked once, on the first layer it meets, against the decoder's layer over the same kernel set on
that layer's weights: the K/V writes identical, the outputs within ATTENTION_TOLERANCE. It runs where
the layer shape is Llama's exactly (LayerShape.plain_llama), the run dtype is bf16, the C set's
SiLU·mul checked out, every matmul weight is a QuantWeight whose format the VNNI kernel passed, the
layer has no biases, and every row of the step is a sequence's decode (its K/V rows in place, or read
through its block table where they are not contiguous, as after a prefix-cache hit or beside other
sequences). The rows share nothing but the call: a sequence's bits are those it gets alone.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import replace
from typing import Optional

import torch

from llmrun.kernels.interface import CHECK_ROWS, check_forced_to_fail
from llmrun.quant.format import QuantWeight
from llmrun.quant.spec import cpu_amx_rows

MATRICES = ("qkv", "o", "gate_up", "down")
ATTENTION_TOLERANCE = 0.03  # of the largest output: attention rounds once here, where SDPA rounds elsewhere
MAX_ROWS = CHECK_ROWS[-1]  # decode rows one call takes (the AMX tiles' and the engine's most)
KEPT_LAYERS = 512  # layers' weight structures kept between steps (streamed layers bring new ones)

_p, _i64, _i32, _f = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float


class QuantMatrix(ctypes.Structure):
    _fields_ = [("qweight", _p), ("scales", _p), ("mins", _p), ("n", _i64), ("k", _i64), ("bits", _i64),
                ("group", _i64), ("amx_from", _i64)]


class QuantLayerWeights(ctypes.Structure):
    _fields_ = ([("input_norm", _p), ("post_norm", _p)] + [(name, QuantMatrix) for name in MATRICES]
                + [("k_pool", _p), ("v_pool", _p)])


class QuantLayerStep(ctypes.Structure):
    _fields_ = ([(name, _p) for name in ("norm", "rope", "silu", "exp_fn")]
                + [(name, _i32) for name in ("exp_width", "lanes", "threads", "hidden", "heads", "kv_heads", "dim",
                                             "intermediate")]
                + [("eps", _f), ("scale", _f), ("cos", _p), ("sin_folded", _p), ("slot", _p), ("count", _i64),
                   ("max_len", _i64), ("starts", _p), ("lens", _p), ("rows", _p), ("amx_matmul", _p),
                   ("amx_scratch", _p), ("scratch", _p)])


def declare_quant_layer(lib: ctypes.CDLL) -> None:
    lib.quant_layer_scratch_bytes.argtypes = [ctypes.POINTER(QuantLayerStep)]
    lib.quant_layer_scratch_bytes.restype = _i64
    lib.quant_decode_layer.argtypes = [ctypes.POINTER(QuantLayerWeights), ctypes.POINTER(QuantLayerStep), _p, _p, _p,
                                       _p]
    lib.quant_decode_layer.restype = None


def _matrix(qw: QuantWeight) -> QuantMatrix:
    mins = None if qw.mins is None else qw.mins.data_ptr()
    return QuantMatrix(qw.qweight.data_ptr(), qw.scales.data_ptr(), mins, qw.out_features, qw.in_features, qw.bits,
                       qw.group_size, cpu_amx_rows(qw.bits, qw.out_features, qw.in_features))


class QuantLayer:
    """quant_layer.c bound to one C kernel set (its norm lanes, SiLU exp and functions) and its quantized matmul."""

    def __init__(self, kernels, quant):
        self.kernels, self.quant, self.shape = kernels, quant, kernels.shape
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._takes: dict[int, bool] = {}  # layer index -> whether its tensors are ones the C layer reads
        self._structs: dict[int, tuple] = {}  # id(qkv weight) -> (its weights' refs, addresses, the C struct)
        self.verified: Optional[bool] = None  # whether it agreed with the decoder's layer (once)
        self.ran = False

    @classmethod
    def for_kernels(cls, kernels, quant) -> Optional["QuantLayer"]:
        """The layer for a bf16 C set whose SiLU·mul checked out, on Llama's layer exactly; else None.
        (The quantized library is built when a step first offers it a layer: float runs never do.)"""
        if (kernels.dtype != torch.bfloat16 or kernels.exp_fn is None or not kernels.shape.plain_llama
                or kernels.shape.head_dim % 16 or kernels.shape.head_dim > 256
                or check_forced_to_fail("quant_layer")):
            return None
        return cls(kernels, quant)

    def call(self, hidden: torch.Tensor, rope, meta, scale: float, reference) -> Optional["QuantLayerCall"]:
        if self.verified is False or hidden.shape[0] > MAX_ROWS:
            return None
        keys = meta.decode_keys()
        if keys is None or len(keys) != hidden.shape[0]:
            return None
        return QuantLayerCall(self, hidden, rope, meta, scale, reference)

    def takes(self, layer_idx: int, w: dict) -> bool:
        """No biases, and every matmul weight a contiguous CPU QuantWeight whose format the VNNI kernel passed."""
        known = self._takes.get(layer_idx)
        if known is None:
            known = self._takes[layer_idx] = (
                all(isinstance(w.get(key), QuantWeight) for key in MATRICES)  # float layers: the library stays unbuilt
                and not any(key.endswith("bias") for key in w)
                and self.quant.lib is not None and hasattr(self.quant.lib, "quant_decode_layer")
                and all(self._reads(w[key]) for key in MATRICES))
        return known

    def _reads(self, qw: QuantWeight) -> bool:
        parts = [qw.qweight, qw.scales] + ([] if qw.mins is None else [qw.mins])
        return (all(t.is_contiguous() and t.device.type == "cpu" for t in parts)
                and self.quant.kernel_checked(qw.bits, qw.group_size, qw.in_features, torch.bfloat16))

    def begin(self, rope, meta, scale: float) -> QuantLayerStep:
        s, k = self.shape, self.kernels
        lib, native = self.quant.lib, k.lib
        address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
        keys = meta.decode_keys()
        starts = torch.tensor([start for start, _, _ in keys], dtype=torch.long)
        lens = torch.tensor([length for _, length, _ in keys], dtype=torch.long)
        rows = (ctypes.c_void_p * len(keys))(*(None if r is None else r.data_ptr() for _, _, r in keys))
        threads = torch.get_num_threads()
        amx = self.quant.amx_int  # (then quant_amx_int.c is in the library)
        step = QuantLayerStep(address(native.add_rms_norm), address(native.rope_qkv), address(native.silu_mul),
                              k.exp_fn, k.exp_width, k.lanes, threads, s.hidden_size, s.num_heads,
                              s.num_kv_heads, s.head_dim, s.intermediate_size, s.eps, scale, rope[0].data_ptr(),
                              rope[1].data_ptr(), meta.slot_mapping.data_ptr(), len(keys), int(lens.max()),
                              starts.data_ptr(), lens.data_ptr(), ctypes.addressof(rows),
                              address(lib.quant_matmul_amx) if amx else None, None, None)
        layer_bytes = lib.quant_layer_scratch_bytes(ctypes.byref(step))
        size = layer_bytes + (lib.quant_amx_int_scratch(max(s.hidden_size, s.intermediate_size), 16, threads) + 64
                              if amx else 0)  # (the AMX tiles' scratch after the layer's)
        if self._scratch.numel() < size:
            self._scratch = torch.empty(2 * size, dtype=torch.uint8)  # room for the context to grow
        step.scratch = self._scratch.data_ptr()
        if amx:
            step.amx_scratch = (step.scratch + layer_bytes + 63) // 64 * 64
        step.keys = keys  # each row's (start, length, its K/V rows or None)
        step.keep = (self._scratch, rope, meta.slot_mapping, starts, lens, rows)  # alive while the step runs
        return step

    def run(self, step: QuantLayerStep, w: dict, k_pool: torch.Tensor, v_pool: torch.Tensor, hidden: torch.Tensor,
            delta: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self._weights(w, k_pool, v_pool)
        out_hidden, out_delta = torch.empty_like(hidden), torch.empty_like(hidden)
        self.quant.lib.quant_decode_layer(ctypes.byref(weights), ctypes.byref(step), hidden.data_ptr(),
                                          None if delta is None else delta.data_ptr(), out_hidden.data_ptr(),
                                          out_delta.data_ptr())
        self.ran = self.quant.ran = True  # (its matmuls are the quantized matmul's kernel)
        if step.amx_matmul and not self.quant.amx_ran:  # (for reports: asked until it is so)
            self.quant.amx_ran = any(step.count >= getattr(weights, key).amx_from for key in MATRICES)
        return out_hidden, out_delta

    def _weights(self, w: dict, k_pool: torch.Tensor, v_pool: torch.Tensor) -> QuantLayerWeights:
        """The layer's C struct, built once per set of weights: a QuantWeight never changes its tensors
        (frozen), so the same four objects (held weakly) and the same norm and pool addresses give the
        same struct; a streamed layer's new weights build a new one. (Saves ~20 us a layer and step.)"""
        matrices = [w[key] for key in MATRICES]
        addresses = (w["input_norm"].data_ptr(), w["post_norm"].data_ptr(), k_pool.data_ptr(), v_pool.data_ptr())
        kept = self._structs.get(id(matrices[0]))
        if kept is not None and kept[1] == addresses and all(r() is m for r, m in zip(kept[0], matrices)):
            return kept[2]
        weights = QuantLayerWeights(addresses[0], addresses[1], *(_matrix(m) for m in matrices), addresses[2],
                                    addresses[3])
        if len(self._structs) >= KEPT_LAYERS:
            self._structs.clear()
        self._structs[id(matrices[0])] = (tuple(weakref.ref(m) for m in matrices), addresses, weights)
        return weights

    def agrees(self, reference, w: dict, rope, meta, scale: float) -> bool:
        """Whether the layer gives the decoder's layer's K/V writes exactly and its outputs within
        ATTENTION_TOLERANCE, on this layer's weights, random rows and K/V pools of 37 and 600 rows."""
        if self.verified is None:
            self.verified = all(self._agrees_at(reference, w, rope, meta, scale, length) for length in (37, 600))
        return self.verified

    def _agrees_at(self, reference, w: dict, rope, meta, scale: float, length: int) -> bool:
        s, generator = self.shape, torch.Generator().manual_seed(length)
        pools = [torch.randn(length + 3, s.num_kv_heads, s.head_dim, generator=generator).to(torch.bfloat16)
                 for _ in range(2)]
        hidden, delta = (torch.randn(1, s.hidden_size, generator=generator).to(torch.bfloat16) for _ in range(2))
        trial = replace(meta, slot_mapping=torch.tensor([length + 1]), decode_span=(2, length))
        k_copy, v_copy = pools[0].clone(), pools[1].clone()
        expected = reference(w, hidden, delta, rope, trial, k_copy, v_copy)
        actual = self.run(self.begin(rope, trial, scale), w, pools[0], pools[1], hidden, delta)
        close = all(float((a.float() - e.float()).abs().max()) <= ATTENTION_TOLERANCE * float(e.float().abs().max())
                    for a, e in zip(actual, expected))
        return close and torch.equal(pools[0], k_copy) and torch.equal(pools[1], v_copy)


class QuantLayerCall:
    """One decode step's whole-layer calls (the decoder's `whole_layer` contract, as native_layer.LayerCall)."""

    def __init__(self, layer: QuantLayer, hidden, rope, meta, scale: float, reference):
        self.layer, self.rope, self.meta, self.scale, self.reference = layer, rope, meta, scale, reference
        self.step: Optional[QuantLayerStep] = None

    def takes(self, layer_idx: int, w: dict) -> bool:
        return (self.layer.takes(layer_idx, w)
                and self.layer.agrees(self.reference, w, self.rope, self.meta, self.scale))

    def run(self, w: dict, k_pool: torch.Tensor, v_pool: torch.Tensor, hidden: torch.Tensor,
            delta: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step is None:
            self.step = self.layer.begin(self.rope, self.meta, self.scale)
        return self.layer.run(self.step, w, k_pool, v_pool, hidden, delta)
