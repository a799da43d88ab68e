"""The real SmolLM2 on the engine loop: a request's greedy tokens are the same alone, among 16
concurrent requests, and when a shared system prompt comes from the prefix cache."""

import pytest

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.loop import EngineLoop
from llmrun.engine.prompt import prompt_ids
from llmrun.engine.sampler import SamplingParams
from tests.engine.test_batch_invariance import SMOLLM2_TEXTS

SYSTEM = ("You are a careful assistant for a small engineering team. Answer in one short paragraph, "
          "name your assumptions, prefer plain words, and say so when you do not know. ") * 3
QUESTIONS = SMOLLM2_TEXTS + ["What is 2 + 2?", "Name a colour.", "Say hello in French.", "Count to five.",
                             "What is a prime number?", "Why do cats purr?", "Spell 'cat'.", "Is ice cold?"]


@pytest.mark.slow
def test_smollm2_greedy_alone_equals_among_16_and_with_a_shared_system_prompt(smollm2_dir):
    engine = build_engine(smollm2_dir, EngineOptions(dtype="bfloat16", gpu_mem_bytes=0, ctx=512, batch=16))
    engine.eos_ids = frozenset()
    plain = [prompt_ids(engine.tokenizer, text) for text in QUESTIONS]
    shared = [prompt_ids(engine.tokenizer, text, system=SYSTEM) for text in QUESTIONS]
    assert len(plain) == 16 and min(map(len, shared)) > 64
    params = SamplingParams(temperature=0, max_new_tokens=8, logprobs=2)
    loop = EngineLoop(engine, max_waiting=64)
    loop.start()
    try:
        def outcome(handle):
            events = list(handle.events())
            return [e.token_id for e in events], [e.logprob for e in events]

        def alone(prompt):
            engine.allocator.reset_prefix_cache()  # nothing cached: the whole prompt runs
            handle = loop.submit(prompt, params)
            result = outcome(handle)
            assert handle.cached_tokens == 0
            return result

        plain_alone, shared_alone = [alone(p) for p in plain], [alone(p) for p in shared]
        engine.allocator.reset_prefix_cache()
        together = [outcome(h) for h in [loop.submit(p, params) for p in plain]]
        assert together == plain_alone                    # tokens and their log probabilities
        engine.allocator.reset_prefix_cache()
        outcome(loop.submit(shared[0], params))           # the system prompt's blocks are cached now
        handles = [loop.submit(p, params) for p in shared]
        with_hits = [outcome(h) for h in handles]
        assert all(h.cached_tokens >= len(prompt_ids(engine.tokenizer, "", system=SYSTEM)) // 16 * 16 - 16
                   for h in handles)
        assert [tokens for tokens, _ in with_hits] == [tokens for tokens, _ in shared_alone]
    finally:
        loop.shutdown(cancel_running=True)
