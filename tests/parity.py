"""Running an engine greedily for parity checks: tokens, each step's logits, batched vs alone."""

import torch

from llmrun.engine.sampler import SamplingParams


def greedy_with_logits(engine, prompt, steps):
    """Greedy tokens for `steps` steps (EOS ignored) and each step's logits [steps, vocab] (fp32, CPU)."""
    engine.eos_ids = frozenset()  # compare every step even if the random model emits EOS
    logits = []
    results = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=steps),
                              on_logits=lambda idx, rows: logits.append(rows[0].float().cpu())).run_to_end()
    return results[0].tokens, torch.stack(logits)


def batched_and_alone(engine, prompts, steps):
    """Greedy tokens of the prompts decoded together, and of each prompt decoded alone."""
    engine.eos_ids = frozenset()
    params = SamplingParams(temperature=0, max_new_tokens=steps)
    engine.allocator.reset_prefix_cache()
    together = [r.tokens for r in engine.generate(prompts, params).run_to_end()]
    alone = []
    for prompt in prompts:
        engine.allocator.reset_prefix_cache()  # alone as in a fresh engine: nothing served from the cache
        alone.append(engine.generate([prompt], params).run_to_end()[0].tokens)
    return together, alone
