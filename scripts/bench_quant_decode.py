"""Decode and prefill of one model in bf16 and quantized on load (int8, int4), in one process, runs
interleaved: tok/s medians and each format's ratio to bf16 (timings on a shared machine are noisy:
compare the ratios of one run). Usage: python scripts/bench_quant_decode.py [MODEL] [--new-tokens 64]
[--rounds 3] [--rows 1] [--prompt 128] [--quants int8,int4] (MODEL defaults to smollm2; --rows
prompts decode together)."""

from __future__ import annotations

import argparse
import statistics
import time

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.sampler import SamplingParams
from llmrun.hub.resolve import resolve_model


def timed(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tok/s over every row) of one greedy generation, its prompts prefilled
    in full (the prefix cache emptied first: the warm-up and earlier rounds left them cached)."""
    engine.eos_ids = frozenset()
    engine.allocator.reset_prefix_cache()
    stamps = []
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    start = time.perf_counter()
    generation = engine.generate(prompts, params, on_logits=lambda idx, rows: stamps.append(time.perf_counter()))
    generation.run_to_end()
    first, last = stamps[0], stamps[-1]
    return first - start, len(prompts) * (len(stamps) - 1) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--quants", default="int8,int4", help="formats beside bf16, comma-separated")
    args = parser.parse_args()
    folder = resolve_model(args.model).path
    engines = {quant: build_engine(folder, EngineOptions(gpu_mem_bytes=0, dtype="bfloat16", quant=quant,
                                                         batch=args.rows))
               for quant in ("none", *args.quants.split(","))}
    prompts = [[(17 * i + 31 * row) % 20000 + 100 for i in range(args.prompt)] for row in range(args.rows)]
    results = {quant: [] for quant in engines}
    for engine in engines.values():
        timed(engine, prompts, 4)  # warm-up: checks, graphs of caches, first-use costs
    for round_idx in range(args.rounds):
        for quant, engine in engines.items():
            results[quant].append(timed(engine, prompts, args.new_tokens))
            print(f"round {round_idx}: {quant} {results[quant][-1][1]:.1f} tok/s", flush=True)
    base_tok_s = statistics.median(r[1] for r in results["none"])
    base_prefill = statistics.median(r[0] for r in results["none"])
    print(f"{args.model}: {args.rows} row(s), prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"median of {args.rounds}")
    for quant, samples in results.items():
        prefill, tok_s = statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)
        print(f"{quant:5s} decode {tok_s:7.1f} tok/s ({tok_s / base_tok_s:4.2f}x bf16)   "
              f"prefill+first token {prefill * 1e3:7.1f} ms ({prefill / base_prefill:4.2f}x bf16)   "
              f"{engines[quant].decoder.kernels.describe()}")
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
