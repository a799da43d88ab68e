"""The engine loop without HTTP, in one invocation on one engine (figures on a shared machine are
comparable only within a run): N concurrent requests through EngineLoop against generate() with
the same N prompts, time to first token p50/p95 at N, a long shared system prompt's second request
against its first, and the loop thread's CPU while idle.

Example: python scripts/bench_loop.py ~/.cache/llmrun-tests/home/models/smollm2 --clients 16 --new 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    from llmrun.engine.build import EngineOptions, build_engine
    from llmrun.engine.loop import EngineLoop
    from llmrun.engine.prompt import prompt_ids
    from llmrun.engine.sampler import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a model folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new", type=int, default=32, help="new tokens per request")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    engine = build_engine(args.model, EngineOptions(dtype=args.dtype, gpu_mem_bytes=0, ctx=2048, batch=args.clients))
    engine.eos_ids = frozenset()  # every request makes exactly --new tokens
    tokenizer = engine.tokenizer
    prompts = [prompt_ids(tokenizer, f"Question {i}: say something true about the number {i * 7}.")
               for i in range(args.clients)]
    params = SamplingParams(temperature=0, max_new_tokens=args.new)
    engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=2)).run_to_end()  # warm-up: row checks, kernels

    engine.allocator.reset_prefix_cache()
    started = time.perf_counter()
    generated = engine.generate(prompts, params).run_to_end()
    generate_s = time.perf_counter() - started

    loop = EngineLoop(engine, max_waiting=4 * args.clients)
    loop.start()
    try:
        engine.allocator.reset_prefix_cache()
        started = time.perf_counter()
        handles = [loop.submit(prompt, params) for prompt in prompts]
        for handle in handles:
            list(handle.events())
        loop_s = time.perf_counter() - started
        assert [h.result.tokens for h in handles] == [r.tokens for r in generated], "loop and generate differ"
        ttfts = [h.result.ttft_s for h in handles]

        unit = "Answer briefly and plainly, and name your assumptions before you answer. "
        system = unit * max(1, args.system_tokens // len(tokenizer.encode(unit, add_special_tokens=False)))
        engine.allocator.reset_prefix_cache()
        one = SamplingParams(temperature=0, max_new_tokens=1)
        first = loop.submit(prompt_ids(tokenizer, "What is 2 + 2?", system=system), one)
        list(first.events())
        second = loop.submit(prompt_ids(tokenizer, "Name a colour.", system=system), one)
        list(second.events())

        thread_clock = time.pthread_getcpuclockid(loop._thread.ident)
        idle_before = time.clock_gettime(thread_clock)
        time.sleep(2.0)
        idle_cpu_s = time.clock_gettime(thread_clock) - idle_before
    finally:
        loop.shutdown(cancel_running=True)
    engine.allocator.reset_prefix_cache()
    started = time.perf_counter()
    engine.generate(prompts, params).run_to_end()
    generate_after_s = time.perf_counter() - started

    total = args.clients * args.new
    print(f"{args.clients} requests x {args.new} new tokens, {args.dtype}, {args.model.name}")
    print(f"  generate(): {total / generate_s:7.1f} tok/s ({generate_s:.2f} s)")
    print(f"  generate() again after the loop: {total / generate_after_s:7.1f} tok/s ({generate_after_s:.2f} s)")
    print(f"  EngineLoop: {total / loop_s:7.1f} tok/s ({loop_s:.2f} s), ratio {generate_s / loop_s:.2f}")
    print(f"  TTFT at {args.clients}: p50 {statistics.median(ttfts):.3f} s, p95 {percentile(ttfts, 0.95):.3f} s")
    print(f"  shared system prompt ({first.prompt_tokens} tokens): first TTFT {first.result.ttft_s:.3f} s, "
          f"second {second.result.ttft_s:.3f} s ({second.cached_tokens} cached), "
          f"ratio {second.result.ttft_s / first.result.ttft_s:.3f}")
    print(f"  loop thread CPU while idle for 2 s: {idle_cpu_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
