"""How fast can batch-1 decode get on this machine without changing transformers' greedy tokens?

    PYTHONPATH=$PWD python scripts/decode_floor.py --model smollm2 --dtype bfloat16

Measures, in one process, on the same weights (all resident on the CPU):
- stream: reading the model's weight bytes once (a tensor sum over a buffer of that size): the
  memory-bandwidth bound on tokens/s;
- matmul floor: only the matmuls one decode step runs (every layer's projections and the output
  head, M = 1), through the exact kernels and packed weights llmrun's decoder calls. Any engine
  whose tokens stay bit-identical to transformers must sum in these kernels' order (a different
  accumulation order flips greedy tokens after ~40 steps on SmolLM2 in bf16), so this is the
  ceiling for such an engine, with norms, RoPE, attention and sampling taking no time at all;
- everything but the matmuls, warm: llmrun's decode with every M = 1 matmul of the Llama
  decoder answered from a cache of its first result (no weight bytes read), so what remains,
  norms, RoPE, attention, sampling, Python, runs with warm CPU caches. Against the real step it
  shows what streaming the weights through the caches costs the small ops that follow them;
- llmrun decode and transformers `generate` decode, as `llmrun bench` measures them.
It prints the ratios: achieved (llmrun / transformers) and the ceiling (floor / transformers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_step(decoder, weights, dtype):
    """One decode step's matmuls (M = 1) over the resident weights, as the decoder runs them (its
    kernel set's matmul: the C GEMV for bf16 where the CPU has it, else oneDNN or MKL)."""
    import torch

    calls = []
    for unit in sorted(weights.resident):
        for tensor in weights.resident[unit].values():
            if tensor.dim() == 2:
                calls.append((decoder.kernels.linear, tensor, torch.randn(1, tensor.size(1)).to(dtype)))

    def step():
        for call, weight, x in calls:
            call(x, weight)
    return step


@contextmanager
def matmuls_from_cache(decoder):
    """The decoder's M = 1 matmuls return their first result again (warm-cache measurement): its
    kernel set's matmul (every matmul of a decode step with the fused kernels) and the interface
    module's (ATen's ops). A float32 layer in one C call (kernels/native_layer.py) calls MKL itself,
    so it is off here: this figure is then the fused Python path's."""
    import llmrun.kernels.interface as interface

    real_linear, real_halves, seen = interface.linear, interface.linear_halves, {}
    kernels = decoder.kernels

    def cached(real):
        def call(x, weight, bias=None, **options):
            if x.shape[0] != 1:
                return real(x, weight, bias, **options)
            if id(weight) not in seen:
                seen[id(weight)] = real(x, weight, bias, **options)
            return seen[id(weight)]
        return call

    interface.linear, interface.linear_halves = cached(real_linear), cached(real_halves)
    kernels.linear, layer, kernels.layer = cached(kernels.linear), getattr(kernels, "layer", None), None
    try:
        yield
    finally:
        interface.linear, interface.linear_halves = real_linear, real_halves
        del kernels.linear  # the class's method again
        kernels.layer = layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import torch

    from llmrun.bench.measure import llmrun_case
    from llmrun.bench.run import machine_facts, run_reference
    from llmrun.bench.workload import Case
    from llmrun.engine.build import EngineOptions
    from llmrun.runtime import open_model

    opened = open_model(args.model, EngineOptions(dtype=args.dtype, gpu_mem_bytes=0))
    engine = opened.engine
    weights = engine.runner.weights
    if len(weights.resident) != engine.decoder.config.num_hidden_layers + 1:
        sys.exit("decode_floor: the model must be fully resident in memory (no streamed layers)")
    dtype = weights.dtype
    step = matmul_step(engine.decoder, weights, dtype)
    matmul_bytes = sum(t.numel() * t.element_size() if not t.is_mkldnn else t.size(0) * t.size(1) * weights.element_size
                       for unit in weights.resident.values() for t in unit.values() if t.dim() == 2)
    stream = torch.ones(matmul_bytes // 4, dtype=torch.float32)
    stream_s = median_time(lambda: stream.sum(), args.reps)
    floor_s = median_time(step, args.reps * 4)
    case = Case("decode", args.prompt_tokens, args.new_tokens, 1)
    ours = llmrun_case(engine, case, args.reps).decode_tok_s.median
    with matmuls_from_cache(engine.decoder):
        without_matmuls = llmrun_case(engine, case, args.reps).decode_tok_s.median
    weights.close()
    theirs = run_reference("transformers", opened.path, args.dtype, "cpu", [case], args.reps,
                           None, None, False)["decode"].decode_tok_s.median
    report = {
        "model": opened.name, "dtype": args.dtype, "machine": machine_facts("cpu"),
        "matmul_weight_bytes": matmul_bytes,
        "stream_gb_s": round(matmul_bytes / stream_s / 1e9, 1),
        "bandwidth_bound_tok_s": round(1 / stream_s, 1),
        "matmul_floor_tok_s": round(1 / floor_s, 1),
        "llmrun_decode_tok_s": round(ours, 1),
        "transformers_decode_tok_s": round(theirs, 1),
        "achieved_ratio": round(ours / theirs, 2),
        "ceiling_ratio": round(1 / floor_s / theirs, 2),
        "llmrun_non_matmul_ms_per_token": round(1000 / ours - floor_s * 1000, 2),
        "non_matmul_warm_ms_per_token": round(1000 / without_matmuls, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
