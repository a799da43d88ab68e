"""The benchmark's JSON report (schema llmrun.bench/1) built from the measured results."""

from __future__ import annotations

from llmrun.bench.measure import CaseResult

SCHEMA = "llmrun.bench/1"


def speedups(ours: CaseResult, ref: CaseResult) -> dict:
    """Greater than 1 means llmrun is better: throughput ours/ref, time to first token ref/ours."""
    out = {"decode_tok_s": round(ours.decode_tok_s.median / ref.decode_tok_s.median, 3)}
    if ref.ttft_s.median == ref.ttft_s.median:  # not NaN (generate_batch has no TTFT)
        out["ttft_s"] = round(ref.ttft_s.median / ours.ttft_s.median, 3)
        out["prefill_tok_s"] = round(ours.prefill_tok_s.median / ref.prefill_tok_s.median, 3)
    return out


def kernels_json(engine) -> dict:
    """Which decode kernels ran: the fused set (C on the CPU, Triton on CUDA; none: ATen's ops),
    its GEMV, and whether CUDA graphs replayed the decode steps."""
    static = engine.runner.static
    return {**engine.decoder.kernels.describe(), "cuda_graphs": bool(static is not None and static.capture)}


def bench_json(name: str, engine, facts: dict, ours: dict, refs: dict, compare: str, reps: int,
               waste_slots: int, peak_rss: int, peak_gpu: int) -> dict:
    from llmrun.plan.tiers import Tier

    placement = engine.plan.placement
    cases = {}
    for case_name, result in ours.items():
        entry = {"llmrun": result.to_json()}
        if case_name in refs:
            ref = refs[case_name]
            entry[compare] = ref.to_json()
            entry["speedup"] = speedups(result, ref)
            if result.case.batch == 1 or compare == "transformers":
                entry["tokens_match"] = result.tokens == ref.tokens[: len(result.tokens)]
        cases[case_name] = entry
    return {
        "schema": SCHEMA, "model": name, "dtype": engine.plan.dtype, "machine": facts,
        "placement": {"compute": placement.compute_tier.value,
                      "layer_tiers": {t.value: sum(x is t for x in placement.layer_tiers) for t in Tier},
                      "streamed_bytes_per_token": placement.streamed_bytes(),
                      "disk_reads": engine.weights.disk_reads, "ctx": placement.ctx, "batch": placement.batch},
        "kv_cache": {"block_size": placement.block_size, "max_wasted_slots_per_seq": waste_slots,
                     "under_one_block": waste_slots < placement.block_size},
        "kernels": kernels_json(engine),
        "peak_rss_bytes": peak_rss, "peak_gpu_bytes": peak_gpu, "repetitions": reps,
        "compare": compare, "cases": cases,
    }
