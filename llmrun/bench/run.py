"""Running the benchmark: llmrun on every case, then the chosen reference, and the report data."""

from __future__ import annotations

import os
import platform
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from llmrun.bench.llamacpp import llama_cpp_version, missing_note, run_llama_cpp, source_gguf
from llmrun.bench.measure import CaseResult, llmrun_case, transformers_batch_case, transformers_case
from llmrun.bench.workload import Case, fitting_cases
from llmrun.errors import UsageError

COMPARE_CHOICES = ("none", "transformers", "accelerate", "llama.cpp")


def kv_waste_probe(engine):
    """An on_logits observer recording the most slots any sequence held beyond its tokens."""
    worst = {"slots": 0}

    def observe(_indices, _logits):
        allocator = engine.allocator
        for seq_id in allocator.sequence_ids():
            worst["slots"] = max(worst["slots"], allocator.wasted_slots(seq_id))

    return observe, worst


def _no_progress(_text: str) -> None:
    """The default step callback: scripts calling these functions show no progress."""


def run_llmrun(engine, cases: list[Case], reps: int,
               step: Callable[[str], None] = _no_progress) -> tuple[dict[str, CaseResult], int]:
    observe, worst = kv_waste_probe(engine)
    results = {}
    for case in cases:
        step(f"llmrun {case.name}")
        results[case.name] = llmrun_case(engine, case, reps, on_logits=observe)
    return results, worst["slots"]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars, log lines and Python warnings kept off stderr while the
    reference loads and runs (the bench shows its own progress); settings restored after."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    loggers = [logging.getLogger(name) for name in ("ContinuousBatchingLogger", "accelerate")]
    levels = [logger.level for logger in loggers]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run_reference(kind: str, folder: Path, dtype_name: str, device: str, cases: list[Case], reps: int,
                  cpu_budget: Optional[int], gpu_budget: Optional[int], streamed: bool,
                  step: Callable[[str], None] = _no_progress) -> dict[str, CaseResult]:
    """transformers `generate` (and `generate_batch` for batches) on the same weights, or accelerate:
    its offload with the same budget when llmrun streams, its dispatch onto the device when not."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmrun.engine.build import torch_dtype

    step(f"loading {kind}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch_dtype(dtype_name)
    dispatched = kind == "accelerate" or streamed
    with tempfile.TemporaryDirectory(prefix="llmrun-bench-offload-") as offload:
        if streamed:
            memory = {"cpu": cpu_budget} if gpu_budget in (None, 0) else {0: gpu_budget, "cpu": cpu_budget or "100GiB"}
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto",
                                                         max_memory=memory, offload_folder=offload)
        elif dispatched:  # nothing streams: accelerate places every weight on the device (no budget)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device})
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        model.eval()
        results = {}
        for case in cases:
            step(f"{kind} {case.name}")
            if case.batch > 1 and not dispatched and hasattr(model, "generate_batch"):
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


def check_bench_args(compare: str, batch: int, new_tokens: Optional[int], reps: int) -> str:
    """The compare choice, once the numbers are checked (new_tokens None: the workload's own)."""
    if batch < 1 or (new_tokens is not None and new_tokens < 2) or reps < 1:
        raise UsageError("--batch and --reps must be at least 1 and --new-tokens at least 2")
    return check_compare(compare)


def run_bench(name: str, request, cases, reps: int, compare: str) -> dict:
    """Plan and load `name`, time every case that fits the context, then the reference; progress
    on stderr (a terminal only)."""
    from llmrun.bench.report import bench_json
    from llmrun.display import note, progress_steps
    from llmrun.runtime import open_model

    if request.ctx is not None:
        fitting_cases(cases, request.ctx)  # a context too short fails before anything loads
    if compare == "llama.cpp" and llama_cpp_version() is None:
        note(missing_note())
        compare = "none"
    opened = open_model(name, request)
    with opened.engine as engine, ExitStack() as stack:
        reference = _reference_runner(compare, opened, stack)  # llama.cpp's GGUF found before any timing
        fitting = fitting_cases(cases, engine.max_context)
        skipped = [case.name for case in cases if case not in fitting]
        if skipped:
            note(f"bench: skipping {', '.join(skipped)} (longer than the {engine.max_context}-token context)")
        cases = fitting
        compared = [case for case in cases if case.batch == 1 or compare != "llama.cpp"] if compare != "none" else []
        with progress_steps("bench", len(cases) + len(compared) + bool(compared)) as step:
            ours, waste, peaks = _measure_llmrun(engine, cases, reps, step)
            facts = machine_facts(engine.decoder.device.type)
            refs = {}
            if compare != "none":
                refs, reference_facts = reference(cases, reps, step)
                facts.update(reference_facts)
    return bench_json(opened.name, engine, facts, ours, refs, compare, reps, waste, *peaks)


def _reference_runner(compare: str, opened, stack: ExitStack) -> Callable:
    """(cases, reps, step) -> (the reference's results, facts for the report), run after llmrun's cases."""
    if compare != "llama.cpp":
        return lambda cases, reps, step: (_measure_reference(opened, cases, reps, compare, step), {})
    gguf_file = stack.enter_context(source_gguf(opened.path))

    def run(cases, reps, step):
        import torch

        opened.engine.close()  # its weights released before llama.cpp loads its own
        results, facts = run_llama_cpp(gguf_file, opened.engine.tokenizer, cases, reps, torch.get_num_threads(), step)
        return results, {"llama.cpp": facts}

    return run


def _measure_llmrun(engine, cases, reps, step):
    """llmrun's results, its KV waste and its peaks (RSS, GPU), before any reference is loaded."""
    from llmrun.plan.devices import peak_rss_bytes
    from llmrun.plan.make import record_run

    ours, waste = run_llmrun(engine, cases, reps, step)
    for result in ours.values():  # one sequence's decode refreshes the plan's figures
        if result.case.batch == 1:
            record_run(engine.plan, result.decode_tok_s.median, result.case.new_tokens)
    peak_gpu = 0
    if engine.decoder.device.type == "cuda":
        import torch

        peak_gpu = torch.cuda.max_memory_reserved()
    return ours, waste, (peak_rss_bytes(), peak_gpu)


def _measure_reference(opened, cases, reps, compare, step) -> dict[str, CaseResult]:
    """The reference on the same weights, dtype and budget, after llmrun's weights are released."""
    import gc

    from llmrun.plan.tiers import Tier

    engine = opened.engine
    placement, streamed = engine.plan.placement, engine.plan.placement.streams
    budgets = placement.budgets
    engine.close()
    with quiet_transformers():
        refs = run_reference(compare, opened.path, engine.plan.dtype, engine.decoder.device.type, cases, reps,
                             budgets.cpu_bytes if streamed else None,
                             budgets.gpu_bytes if placement.compute_tier is Tier.GPU and streamed else None,
                             streamed, step)
    gc.collect()
    return refs
