"""Running the benchmark: llmrun on every case, then the chosen reference, and the report data."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

from llmrun.bench.measure import CaseResult, llmrun_case, transformers_batch_case, transformers_case
from llmrun.bench.workload import Case
from llmrun.errors import UsageError

COMPARE_CHOICES = ("none", "transformers", "accelerate")


def kv_waste_probe(engine):
    """An on_logits observer recording the most slots any sequence held beyond its tokens."""
    worst = {"slots": 0}

    def observe(_indices, _logits):
        allocator = engine.allocator
        for seq_id in allocator.sequence_ids():
            worst["slots"] = max(worst["slots"], allocator.wasted_slots(seq_id))

    return observe, worst


def run_llmrun(engine, cases: list[Case], reps: int) -> tuple[dict[str, CaseResult], int]:
    observe, worst = kv_waste_probe(engine)
    results = {case.name: llmrun_case(engine, case, reps, on_logits=observe) for case in cases}
    return results, worst["slots"]


def run_reference(kind: str, folder: Path, dtype_name: str, device: str, cases: list[Case], reps: int,
                  cpu_budget: Optional[int], gpu_budget: Optional[int], streamed: bool) -> dict[str, CaseResult]:
    """transformers `generate` (and `generate_batch` for batches) on the same weights, or accelerate's
    offload with the same budget when llmrun streams."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(prefix="llmrun-bench-offload-") as offload:
        if kind == "accelerate" or streamed:
            memory = {"cpu": cpu_budget} if gpu_budget in (None, 0) else {0: gpu_budget, "cpu": cpu_budget or "100GiB"}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto",
                                                         max_memory=memory, offload_folder=offload)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        model.eval()
        results = {}
        for case in cases:
            if case.batch > 1 and not (kind == "accelerate" or streamed) and hasattr(model, "generate_batch"):
                results[case.name] = transformers_batch_case(model, tokenizer, case, reps)
            else:
                results[case.name] = transformers_case(model, tokenizer, case, reps)
        del model
    return results


def machine_facts(device: str) -> dict:
    import torch

    facts = {"device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def check_compare(compare: str) -> str:
    if compare not in COMPARE_CHOICES:
        raise UsageError(f"--compare must be one of: {', '.join(COMPARE_CHOICES)}")
    return compare


def check_bench_args(compare: str, batch: int, new_tokens: int, reps: int) -> str:

    if batch < 1 or new_tokens < 2 or reps < 1:
        raise UsageError("--batch and --reps must be at least 1 and --new-tokens at least 2")
    return check_compare(compare)


def run_bench(name: str, request, cases, reps: int, compare: str) -> dict:
    import gc

    from llmrun.bench.report import bench_json
    from llmrun.engine.build import peak_rss_bytes
    from llmrun.plan.placement import Tier
    from llmrun.runtime import open_model

    opened = open_model(name, request)
    engine = opened.engine
    cases = [c for c in cases if c.prompt_tokens + c.new_tokens <= engine.max_context]
    ours, waste = run_llmrun(engine, cases, reps)
    peak_rss = peak_rss_bytes()  # llmrun's own peak, before a reference model is loaded
    device = engine.decoder.device.type
    peak_gpu = 0
    if device == "cuda":
        import torch

        peak_gpu = torch.cuda.max_memory_reserved()
    placement = engine.plan.placement
    streamed = placement.streams
    dtype_name, budgets = engine.plan.dtype, placement.budgets
    data_engine = engine
    refs = {}
    if compare != "none":
        engine.runner.weights.close()
        refs = run_reference(compare, opened.path, dtype_name, device, cases, reps,
                             budgets.cpu_bytes if streamed else None,
                             budgets.gpu_bytes if placement.compute_tier is Tier.GPU and streamed else None,
                             streamed)
        gc.collect()
    return bench_json(opened.name, data_engine, machine_facts(device), ours, refs, compare, reps, waste,
                      peak_rss, peak_gpu)
