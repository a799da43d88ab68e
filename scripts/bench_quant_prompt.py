"""Prompt chunks over compressed weights, side by side: bf16 and quantized on load, each quantized format
also with the AMX prompt GEMM's check failed on purpose (`-noamx`: its chunks run as on a CPU without
AMX, by the VNNI GEMM, kernels/quant_gemm_vnni.c) and with both prompt GEMMs' checks failed
(`-dequant`: the weight dequantized for oneDNN's GEMM, as before either), all engines in one process
and the runs interleaved, so a machine whose speed drifts moves them all alike. Prints min / median seconds of each case: prompts
of N tokens, B of them at once, G tokens generated each (the first token's time is the prompt's).

Usage: python scripts/bench_quant_prompt.py [MODEL] [--quants int4,int8] [--cases 128x1x1,512x1x1,128x16x16]
[--reps 6]"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.sampler import SamplingParams
from llmrun.hub.resolve import resolve_model


def prompt(length: int, seed: int) -> list[int]:
    """A fixed prompt of ordinary token ids (no two of a batch alike, so nothing is shared)."""
    return [(7 * i * i + 3 * i + 131 * seed) % 40000 + 100 for i in range(length)]


def run(engine, length: int, batch: int, new_tokens: int) -> float:
    """Seconds for `batch` prompts of `length` tokens and `new_tokens` greedy tokens each, from a cold
    prefix cache."""
    engine.eos_ids = frozenset()
    engine.allocator.reset_prefix_cache()
    start = time.perf_counter()
    engine.generate([prompt(length, seed) for seed in range(batch)],
                    SamplingParams(temperature=0, max_new_tokens=new_tokens)).run_to_end()
    return time.perf_counter() - start


def build(folder, kind: str):
    """An engine for `kind`: none, int8, int4, or one of those with `-noamx` (the AMX GEMM's check
    failed on purpose while the engine warms up; the verdict stays with its kernels) or `-dequant`
    (the VNNI GEMM's too)."""
    quant, _, flag = kind.partition("-")
    previous = os.environ.get("LLMRUN_FAIL_CHECKS")
    if flag:
        os.environ["LLMRUN_FAIL_CHECKS"] = "amx" if flag == "noamx" else "amx,vnni_gemm"
    try:
        engine = build_engine(folder, EngineOptions(gpu_mem_bytes=0, dtype="bfloat16", quant=quant, batch=16))
        run(engine, 40, 1, 1)  # the kernels' checks run here, under the setting
        run(engine, 40, 2, 2)
    finally:
        if previous is None:
            os.environ.pop("LLMRUN_FAIL_CHECKS", None)
        else:
            os.environ["LLMRUN_FAIL_CHECKS"] = previous
    return engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--quants", default="int4", help="formats beside bf16, comma-separated")
    parser.add_argument("--cases", default="128x1x1,512x1x1,128x16x16", help="TOKENSxPROMPTSxNEW, comma-separated")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    folder = resolve_model(args.model).path
    kinds = [kind for quant in args.quants.split(",") for kind in (quant, f"{quant}-noamx", f"{quant}-dequant")]
    kinds.append("none")
    engines = {kind: build(folder, kind) for kind in kinds}
    for kind, engine in engines.items():
        print(kind, engine.decoder.kernels.describe().get("quant_prompt_kernel", "bf16 weights"), flush=True)
    for case in args.cases.split(","):
        length, batch, new_tokens = (int(part) for part in case.split("x"))
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for engine in engines.values():
            run(engine, length, batch, new_tokens)
        for _ in range(args.reps):
            for kind, engine in engines.items():
                times[kind].append(run(engine, length, batch, new_tokens))
        print(case, " | ".join(f"{kind} {min(t):.3f} / {statistics.median(t):.3f} s" for kind, t in times.items()),
              flush=True)


if __name__ == "__main__":
    main()
