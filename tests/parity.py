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


def same_tokens_but_for_ties(tokens, logits, expected_tokens, expected, tolerance: float) -> int:
    """Two greedy runs whose arithmetic differs by up to `tolerance` a logit: the same tokens step by
    step, until (if ever) a step where the expected run's logits of the two tokens chosen lie within
    twice that of each other (a tie either arithmetic may break; from there the runs continue from
    different tokens). Returns the steps whose tokens and logits come from the same sequence."""
    for step, (token, expected_token) in enumerate(zip(tokens, expected_tokens)):
        if token != expected_token:
            margin = float(expected[step, expected_token] - expected[step, token])
            assert margin <= 2 * tolerance, (step, token, expected_token, margin)
            return step + 1
    return len(tokens)


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
