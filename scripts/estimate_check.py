"""Plan estimates against the decode speed runs achieve (issue 18), in one invocation.

    PYTHONPATH=$PWD LLMRUN_CACHE=/tmp/fresh python scripts/estimate_check.py --model smollm2

1. The plan's figures start from the first-use probes (a fresh LLMRUN_CACHE: memory read, disk read
   cold and from the page cache) with the per-layer step cost assumed.
2. One resident run per dtype teaches the step cost (`record_run`), as any `llmrun run` does.
3. Each case is then planned (its estimate printed) and run: resident, disk-streamed with the page
   cache warm, and disk-streamed cold (the streamed files dropped from the page cache before every
   repetition). Nothing is learnt from these runs, so each streamed estimate is a prediction from
   the probes and the resident run, not a replay of itself. With --learn-streamed N, one run of
   case N (a disk-streamed one) also teaches the streaming rate first, and `--cases 6` then
   predicts another budget from it.
Achieved decode is tokens 2..N of one greedy sequence (EOS ignored), median of --reps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [  # name, dtype, --cpu-mem (None: measured), page cache
    ("resident", "bfloat16", None, "warm"),
    ("disk, warm", "bfloat16", "150MB", "warm"),
    ("disk, cold", "bfloat16", "150MB", "cold"),
    ("resident", "float32", None, "warm"),
    ("disk, warm", "float32", "400MB", "warm"),
    ("disk, cold", "float32", "400MB", "cold"),
    ("disk, warm", "bfloat16", "200MB", "warm"),   # 6: another budget, for --learn-streamed
    ("disk, cold", "bfloat16", "200MB", "cold"),   # 7
    ("disk, warm", "float32", "300MB", "warm"),    # 8
]


def drop_streamed_files(folder: Path) -> None:
    """Drop every file the disk tier may read (the checkpoint, the offload cache) from the page cache."""
    from llmrun.paths import llmrun_home
    from llmrun.plan.residency import drop_from_page_cache

    for file in [*folder.glob("*.safetensors"), *(llmrun_home() / "offload").rglob("*.bin")]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # only written-back pages can be dropped
            drop_from_page_cache(fd)
        finally:
            os.close(fd)


def decode_runs(opened, new_tokens: int, reps: int, cold: bool) -> tuple[float, float]:
    """(median decode tok/s, median time to first token) over `reps` greedy runs after a warm-up."""
    from llmrun.engine.prompt import prompt_ids
    from llmrun.engine.sampler import SamplingParams

    engine = opened.engine
    prompt = prompt_ids(engine.tokenizer, "Tell me about dragons.")
    engine.eos_ids = frozenset()
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    engine.generate([prompt], params).run_to_end()  # warm-up: kernels, the offload cache written
    rates, firsts = [], []
    for _ in range(reps):
        if cold:
            drop_streamed_files(opened.path)
        [result] = engine.generate([prompt], params).run_to_end()
        rates.append(result.decode_tok_s)
        firsts.append(result.ttft_s)
    return statistics.median(rates), statistics.median(firsts)


def open_case(model: str, dtype: str, cpu_mem: str | None):
    from llmrun.engine.build import EngineOptions
    from llmrun.runtime import open_model
    from llmrun.sizes import parse_size

    options = EngineOptions(gpu_mem_bytes=0, cpu_mem_bytes=parse_size(cpu_mem) if cpu_mem else None, ctx=512,
                            dtype=dtype)
    return open_model(model, options, show_progress=False)


def case_json(name: str, opened, rate: float, first: float) -> dict:
    from llmrun.plan.tiers import Tier

    plan = opened.engine.plan
    est = plan.estimate
    low, high = est.decode_tok_s_low, est.decode_tok_s_high
    return {
        "case": f"{name} {plan.dtype}", "cpu_mem_bytes": plan.request.cpu_mem_bytes,
        "disk_mib_per_token": round(plan.placement.streamed_bytes_per_token(Tier.DISK) / 2**20, 1),
        "estimate_low": round(low, 2), "estimate_high": round(high, 2), "achieved": round(rate, 2),
        "achieved_over_low": round(rate / low, 3), "achieved_over_high": round(rate / high, 3),
        "ttft_s": round(first, 3), "first_read_s_estimate": round(est.first_read_s, 3),
        "figures": {k: [float(f"{v.value:.4g}"), v.source] for k, v in est.figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-learn", action="store_true", help="skip step 2 (estimates from probes alone)")
    parser.add_argument("--cases", default="", help="comma-separated case numbers (default: all)")
    parser.add_argument("--learn-streamed", type=int, default=None, metavar="CASE",
                        help="also learn from one run of this case (its streaming rate) before measuring")
    args = parser.parse_args()
    from llmrun.plan.make import record_run

    chosen = {int(n) for n in args.cases.split(",") if n} or set(range(6))
    if not args.no_learn:
        for dtype in sorted({CASES[n][1] for n in chosen}):
            opened = open_case(args.model, dtype, None)
            with opened.engine:
                rate, _ = decode_runs(opened, args.new_tokens, 1, cold=False)
                record_run(opened.engine.plan, rate, args.new_tokens)
            print(json.dumps({"learnt_from": f"resident {dtype}", "decode_tok_s": round(rate, 2)}), flush=True)
    if args.learn_streamed is not None:
        name, dtype, cpu_mem, _ = CASES[args.learn_streamed]
        opened = open_case(args.model, dtype, cpu_mem)
        with opened.engine:
            rate, _ = decode_runs(opened, args.new_tokens, 1, cold=False)
            record_run(opened.engine.plan, rate, args.new_tokens)
        print(json.dumps({"learnt_from": f"{name} {dtype} {cpu_mem}", "decode_tok_s": round(rate, 2)}), flush=True)
    for number, (name, dtype, cpu_mem, cache) in enumerate(CASES):
        if number not in chosen:
            continue
        opened = open_case(args.model, dtype, cpu_mem)
        with opened.engine:
            rate, first = decode_runs(opened, args.new_tokens, args.reps, cold=cache == "cold")
            print(json.dumps(case_json(f"{name} {cpu_mem or ''}".strip(), opened, rate, first)), flush=True)


if __name__ == "__main__":
    main()
