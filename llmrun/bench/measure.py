"""Timing llmrun and the reference implementations on one Case (warm-up excluded, repetitions)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from llmrun.bench.workload import Case, Stat, prompt_ids


@dataclass(frozen=True)
class Timing:
    """One repetition: time to first token, prefill tok/s, decode tok/s (all sequences together)."""

    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float


@dataclass(frozen=True)
class CaseResult:
    case: Case
    ttft_s: Stat
    prefill_tok_s: Stat
    decode_tok_s: Stat
    tokens: list[int]               # the first sequence's generated tokens (last repetition)

    def to_json(self) -> dict:
        return {"prompt_tokens": self.case.prompt_tokens, "new_tokens": self.case.new_tokens,
                "batch": self.case.batch, "ttft_s": self.ttft_s.to_json(),
                "prefill_tok_s": self.prefill_tok_s.to_json(), "decode_tok_s": self.decode_tok_s.to_json()}


def repeat(case: Case, run_once: Callable[[], tuple[Timing, list[int]]], reps: int) -> CaseResult:
    run_once()  # warm-up: kernels, allocator, caches
    timings, tokens = [], []
    for _ in range(reps):
        timing, tokens = run_once()
        timings.append(timing)
    return CaseResult(case, Stat.of([t.ttft_s for t in timings]), Stat.of([t.prefill_tok_s for t in timings]),
                      Stat.of([t.decode_tok_s for t in timings]), tokens)


def llmrun_case(engine, case: Case, reps: int, on_logits=None) -> CaseResult:
    """llmrun's engine: greedy, EOS ignored so every run makes exactly `new_tokens` per sequence.
    `on_logits` observes every step (the KV-waste probe)."""
    from llmrun.engine.sampler import SamplingParams

    prompts = [prompt_ids(engine.tokenizer, case.prompt_tokens, i) for i in range(case.batch)]
    params = SamplingParams(temperature=0, max_new_tokens=case.new_tokens)
    engine.eos_ids = frozenset()

    def once():
        engine.allocator.reset_prefix_cache()  # every repetition prefills its prompts in full
        started = time.perf_counter()
        first = None
        generation = engine.generate(prompts, params, on_logits=on_logits)
        for event in generation:
            if first is None:
                first = time.perf_counter()
        _sync(engine.decoder.device)
        ended = time.perf_counter()
        ttft = first - started
        decoded = case.batch * (case.new_tokens - 1)
        return Timing(ttft, case.batch * case.prompt_tokens / ttft, decoded / (ended - first)), generation.results[0].tokens

    return repeat(case, once, reps)


def transformers_case(model, tokenizer, case: Case, reps: int) -> CaseResult:
    """transformers' generate on the same prompts: TTFT from a 1-token run, decode from the rest."""
    import torch

    prompts = [prompt_ids(tokenizer, case.prompt_tokens, i) for i in range(case.batch)]
    ids = torch.tensor(prompts, device=model.device)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id or 0, eos_token_id=None)

    def once():
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(model.device)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, **kwargs)
        _sync(model.device)
        total = time.perf_counter() - started
        decoded = case.batch * (case.new_tokens - 1)
        timing = Timing(ttft, case.batch * case.prompt_tokens / ttft, decoded / max(total - ttft, 1e-9))
        return timing, out[0, case.prompt_tokens:].tolist()

    return repeat(case, once, reps)


def transformers_batch_case(model, tokenizer, case: Case, reps: int) -> CaseResult:
    """transformers' continuous batching (`generate_batch`): total tokens/s over all prompts."""
    from transformers import GenerationConfig

    prompts = [prompt_ids(tokenizer, case.prompt_tokens, i) for i in range(case.batch)]
    config = GenerationConfig(max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=tokenizer.pad_token_id or 0)

    def once():
        started = time.perf_counter()
        outputs = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
        total = time.perf_counter() - started
        produced = sum(len(o.generated_tokens) for o in outputs.values())
        first = next(iter(outputs.values())).generated_tokens
        return Timing(float("nan"), float("nan"), produced / total), list(first)

    return repeat(case, once, reps)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
