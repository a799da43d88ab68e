"""Batch-1 (and few-row) CPU matmuls of one SmolLM2-135M token over 30 layers' weights, in one process:
llmrun's C kernel (int8 activations, VNNI) on int4 and int8 weights, ATen's `_weight_int4pack_mm_for_cpu`
and `_weight_int8pack_mm` (bf16 activations), and the bf16 path (oneDNN-packed weights, the C GEMV for one
row) as the baseline. Each variant runs the same token's matmuls in rounds, interleaved, and reports its
median ms a token. Usage: python scripts/bench_quant_cpu.py [--rows 1] [--rounds 15] [--layers 30]
(timings on a shared machine are noisy: compare the ratios of one run)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmrun.kernels.choose import kernels_for
from llmrun.kernels.interface import LayerShape
from llmrun.kernels.quant_cpu import CpuQuantMatmul
from llmrun.quant.format import QuantWeight, dequantize, unpack_int4
from llmrun.weights.packing import pack_weight

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate/up, down
SMOLLM2 = LayerShape(576, 9, 3, 64, 1e-5, intermediate_size=1536)


def quantized(weight: torch.Tensor, bits: int, group: int) -> QuantWeight:
    """Plain min/max quantization (enough for timing; llmrun/quant/quantize.py is the real one)."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group, group)
    if bits == 8:
        scales = w.abs().amax(-1) / 127
        q = torch.round(w / scales.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).reshape(n, k)
        return QuantWeight(8, group, n, k, q, scales, None)
    low, high = w.amin(-1), w.amax(-1)
    scales = (high - low) / 15
    q = torch.round((w - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantWeight(4, group, n, k, packed, scales, low)


def aten_int4(qw: QuantWeight):
    """ATen's int4 form: packed for its CPU kernel, scale and zero (w = (q - 8) * scale + zero) in bf16."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(qw.qweight).to(torch.int32), 1)
    zeros = qw.mins + 8 * qw.scales
    scales_zeros = torch.stack((qw.scales.T, zeros.T), -1).to(torch.bfloat16).contiguous()  # [groups, n, 2]
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, qw.group_size, scales_zeros)


def aten_int8(qw: QuantWeight):
    scales = qw.scales[:, 0].to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, qw.qweight, scales)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    floats = [[torch.randn(n, k) * 0.05 for n, k in SHAPES] for _ in range(args.layers)]
    bf16 = kernels_for(SMOLLM2, torch.bfloat16, "cpu")
    quant = CpuQuantMatmul()
    variants = {}
    packed = [[pack_weight(w.to(torch.bfloat16)) for w in layer] for layer in floats]
    variants["bf16 (packed, C GEMV at 1 row)"] = [[(lambda x, w=w: bf16.linear(x, w)) for w in layer]
                                                  for layer in packed]
    for bits, group in ((4, 32), (4, 64), (8, 32)):
        qws = [[quantized(w, bits, group) for w in layer] for layer in floats]
        variants[f"C VNNI int{bits} g{group}"] = [[(lambda x, q=q: quant.linear(x, q)) for q in layer] for layer in qws]
        if bits == 4:
            variants[f"ATen int4pack g{group}"] = [[aten_int4(q) for q in layer] for layer in qws]
    per_channel = [[quantized(w, 8, w.shape[1]) for w in layer] for layer in floats]
    variants["C VNNI int8 per-channel"] = [[(lambda x, q=q: quant.linear(x, q)) for q in layer]
                                           for layer in per_channel]
    variants["ATen int8pack per-channel"] = [[aten_int8(q) for q in layer] for layer in per_channel]
    inputs = {k: torch.randn(args.rows, k).to(torch.bfloat16) for k in {k for _, k in SHAPES}}
    # sanity: every variant computes the same product (int4 g32 against its reference)
    check = variants["C VNNI int4 g32"][0][0](inputs[576]).float()
    reference = inputs[576].float() @ dequantize(quantized(floats[0][0], 4, 32)).T
    assert (check - reference).abs().max() < 0.05 * reference.abs().max(), "the kernel disagrees with its reference"
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, layers in variants.items():
            start = time.perf_counter()
            for layer in layers:
                for fn, (_, k) in zip(layer, SHAPES):
                    fn(inputs[k])
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["bf16 (packed, C GEMV at 1 row)"])
    print(f"rows {args.rows}, {args.layers} layers, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    for name, samples in times.items():
        ms = statistics.median(samples)
        print(f"{name:34s} {ms:7.2f} ms/token   {base / ms:5.2f}x bf16")
    print("kernels:", quant.describe())


if __name__ == "__main__":
    main()
