"""The engine loop: requests join and leave a running batch, abort, preemption, the prefix cache,
and a request's greedy tokens the same alone, among 16 and after a prefix-cache hit."""

import asyncio
import threading
import time

import pytest
import torch

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.loop import EngineLoop
from llmrun.engine.sampler import SamplingParams
from llmrun.engine.sequence import FinishReason
from llmrun.errors import ContextOverflowError, EngineStoppedError, QueueFullError
from llmrun.kv.block_allocator import BlockAllocator
from tests.checkpoints import llama_config, save_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = llama_config(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
    return save_checkpoint(tmp_path_factory.mktemp("loop") / "tiny", config, seed=12)


def make_engine(folder, dtype="float32", ctx=256, batch=16, max_prefill_tokens=64):
    engine = build_engine(folder, EngineOptions(dtype=dtype, gpu_mem_bytes=0, ctx=ctx, batch=batch))
    engine.eos_ids = frozenset()  # every request makes exactly max_new_tokens
    engine.max_prefill_tokens = max_prefill_tokens
    return engine


def random_prompts(count, lengths=(3, 70, 9, 33, 40, 2, 20, 64, 5, 31, 17, 48, 12, 7, 90, 26)):
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, 300, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(count)]


def greedy(max_new_tokens, logprobs=3):
    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, logprobs=logprobs)


def outcome(handle):
    """(tokens, [(logprob, top_logprobs)]) of a request, read to its end."""
    events = list(handle.events())
    assert events[-1].finish_reason is FinishReason.LENGTH
    return [e.token_id for e in events], [(e.logprob, e.top_logprobs) for e in events]


def run_alone(engine, prompts, params):
    """Each prompt by itself, one after another, on a loop of its own."""
    loop = EngineLoop(engine, max_waiting=64)
    loop.start()
    try:
        return [outcome(loop.submit(prompt, params)) for prompt in prompts]
    finally:
        loop.shutdown(cancel_running=True)


def assert_pool_whole(loop):
    """Once the loop has taken its snapshot after the last step: no block held by anyone."""
    wait_for(lambda: loop.stats().num_running == 0 and loop.stats().num_waiting == 0)
    stats = loop.stats()
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks + stats.num_cached_blocks == stats.num_blocks


def wait_for(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_alone_equals_among_16_joining_mid_run_and_after_a_prefix_hit(tiny, dtype):
    prompts = random_prompts(16)
    params = greedy(10)
    alone = run_alone(make_engine(tiny, dtype), prompts, params)
    engine = make_engine(tiny, dtype)
    loop = EngineLoop(engine, max_waiting=64)
    loop.start()
    try:
        first = [loop.submit(prompt, params) for prompt in prompts[:8]]
        next(first[0].events())                          # the batch is running: the rest join it
        later = [loop.submit(prompt, params) for prompt in prompts[8:]]
        together = [outcome(handle) for handle in first + later]
        assert together == alone
        assert all(handle.cached_tokens == 0 for handle in first + later)
        assert loop.stats().num_cached_blocks > 0
        again = [loop.submit(prompt, params) for prompt in prompts]
        with_hits = [outcome(handle) for handle in again]
        for prompt, handle in zip(prompts, again):
            assert handle.cached_tokens == (len(prompt) - 1) // 16 * 16   # every full block of the prompt
            assert handle.result.prefilled_tokens == len(prompt) - handle.cached_tokens
        assert [tokens for tokens, _ in with_hits] == [tokens for tokens, _ in alone]
        stats = loop.stats()
        assert stats.prefix_hit_tokens == sum(handle.cached_tokens for handle in again) > 0
        assert stats.prefix_queried_tokens == 2 * sum(map(len, prompts))
        assert_pool_whole(loop)
    finally:
        loop.shutdown(cancel_running=True)


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(tiny):
    engine = make_engine(tiny)
    loop = EngineLoop(engine, max_waiting=8)
    loop.start()
    try:
        long_prompt, short_prompt = random_prompts(2, lengths=(40, 12))
        long = loop.submit(long_prompt, greedy(80))
        long_events = long.events()
        next(long_events)
        short = loop.submit(short_prompt, greedy(4))
        short_tokens, _ = outcome(short)
        assert long.result.finish_reason is None           # the short one left first
        rest = [event.token_id for event in long_events]
        assert len(rest) == 79 and long.result.finish_reason is FinishReason.LENGTH
        [(alone_long, _), (alone_short, _)] = run_alone(make_engine(tiny), [long_prompt, short_prompt],
                                                         greedy(80))
        assert long.result.tokens == alone_long and short_tokens == alone_short[:4]
    finally:
        loop.shutdown(cancel_running=True)


def test_abort_frees_the_blocks_before_the_next_step(tiny):
    engine = make_engine(tiny)
    loop = EngineLoop(engine, max_waiting=8)
    loop.start()
    try:
        victim_prompt, other_prompt = random_prompts(2, lengths=(50, 30))
        victim = loop.submit(victim_prompt, greedy(200))
        other = loop.submit(other_prompt, greedy(200))
        wait_for(lambda: len(victim.result.tokens) >= 3)
        seq_id = victim._request.seq.seq_id
        made = len(victim.result.tokens)
        victim.abort()
        assert all(event.finish_reason is None for event in victim.events())  # they end, unfinished
        assert len(victim.result.tokens) <= made + 1      # at most the step that was running
        assert victim.result.finish_reason is FinishReason.ABORT
        other_made = len(other.result.tokens)
        wait_for(lambda: len(other.result.tokens) >= other_made + 2)   # a whole step after the abort
        assert not engine.allocator.has_sequence(seq_id)
        assert loop.stats().num_running == 1 and loop.stats().num_aborted == 1
        other.abort()
        assert_pool_whole(loop)
        victim.abort()                                    # harmless once finished
    finally:
        loop.shutdown(cancel_running=True)


def test_preemption_in_a_tiny_pool_gives_every_request_its_tokens(tiny):
    """16 blocks of 16 tokens for 8 requests of up to 100 tokens each: the newest are preempted,
    recomputed later, and nothing fails."""
    prompts = random_prompts(8, lengths=(30, 45, 20, 50, 35, 25, 40, 10))
    params = greedy(50, logprobs=None)
    alone = run_alone(make_engine(tiny, ctx=128, batch=2), prompts, params)
    engine = make_engine(tiny, ctx=128, batch=2)
    assert engine.allocator.num_blocks == 16
    loop = EngineLoop(engine, max_waiting=16, max_running=8)
    loop.start()
    try:
        handles = [loop.submit(prompt, params) for prompt in prompts]
        results = [[event.token_id for event in handle.events()] for handle in handles]
        assert results == [tokens for tokens, _ in alone]
        assert loop.stats().num_preemptions > 0
        assert sum(handle.result.num_preemptions for handle in handles) == loop.stats().num_preemptions
        assert_pool_whole(loop)
    finally:
        loop.shutdown(cancel_running=True)


def test_a_request_that_can_never_fit_is_refused_up_front(tiny):
    engine = make_engine(tiny, ctx=128, batch=2)
    loop = EngineLoop(engine, max_waiting=8)
    with pytest.raises(ContextOverflowError, match="context window is 128 tokens"):
        loop.submit(list(range(3, 131)), greedy(4))
    with pytest.raises(ContextOverflowError, match="empty"):
        loop.submit([], greedy(4))
    small = BlockAllocator(4, 16)   # a pool smaller than the context: 64 tokens
    engine.allocator = engine.runner.allocator = small
    loop = EngineLoop(engine, max_waiting=8)
    with pytest.raises(ContextOverflowError) as refused:
        loop.submit(list(range(3, 53)), greedy(20))
    assert "\n" not in str(refused.value) and "KV cache holds 64" in str(refused.value)
    loop.start()
    try:
        assert len(outcome(loop.submit(list(range(3, 53)), greedy(14)))[0]) == 14   # 64 tokens fit
        assert_pool_whole(loop)
    finally:
        loop.shutdown(cancel_running=True)


def test_a_full_queue_refuses_and_shutdown_cancels_or_finishes(tiny):
    engine = make_engine(tiny)
    loop = EngineLoop(engine, max_waiting=2)
    waiting = [loop.submit(prompt, greedy(300)) for prompt in random_prompts(2)]
    with pytest.raises(QueueFullError, match="at most 2"):
        loop.submit([5, 6, 7], greedy(3))
    loop.start()
    next(waiting[0].events())
    loop.shutdown(cancel_running=True)
    for handle in waiting:
        assert all(event.finish_reason is None for event in handle.events())
        assert handle.result.finish_reason is FinishReason.ABORT
    with pytest.raises(EngineStoppedError):
        loop.submit([5, 6, 7], greedy(3))
    assert engine.allocator.num_used_blocks == 0

    finishing = EngineLoop(engine, max_waiting=4)
    finishing.start()
    handles = [finishing.submit(prompt, greedy(5)) for prompt in random_prompts(3)]
    finishing.shutdown(cancel_running=False)
    assert all(handle.result.finish_reason is FinishReason.LENGTH for handle in handles)
    assert all(len(list(handle.events())) == 5 for handle in handles)


def test_async_events_equal_the_blocking_ones(tiny):
    engine = make_engine(tiny)
    prompts = random_prompts(4)
    loop = EngineLoop(engine, max_waiting=8)
    loop.start()
    try:
        async def read_all():
            handles = [loop.submit(prompt, greedy(6)) for prompt in prompts]

            async def read(handle):
                return [event.token_id async for event in handle.aevents()]
            return await asyncio.gather(*(read(handle) for handle in handles)), handles

        tokens, handles = asyncio.run(read_all())
        assert tokens == [[event.token_id for event in handle.events()] for handle in handles]
        assert tokens == [tokens for tokens, _ in run_alone(make_engine(tiny), prompts, greedy(6))]
    finally:
        loop.shutdown(cancel_running=True)


def test_logprobs_are_the_log_softmax_of_the_raw_logits(tiny):
    prompt = random_prompts(1, lengths=(20,))[0]
    seen = []
    make_engine(tiny).generate([prompt], greedy(3),
                               on_logits=lambda idx, rows: seen.append(rows[0].float().clone())).run_to_end()
    loop = EngineLoop(make_engine(tiny), max_waiting=4)
    loop.start()
    try:
        events = list(loop.submit(prompt, greedy(3, logprobs=5)).events())
    finally:
        loop.shutdown(cancel_running=True)
    for event, logits in zip(events, seen):
        logprobs = logits.log_softmax(-1)
        assert event.logprob == pytest.approx(float(logprobs[event.token_id]), abs=1e-6)
        assert [token for token, _ in event.top_logprobs] == logprobs.topk(5).indices.tolist()
        assert event.top_logprobs[0][0] == event.token_id   # greedy takes the most likely


def test_an_idle_loop_sleeps(tiny):
    engine = make_engine(tiny)
    loop = EngineLoop(engine, max_waiting=4)
    loop.start()
    try:
        list(loop.submit([5, 6, 7], greedy(3)).events())
        thread = next(t for t in threading.enumerate() if t.name == "llmrun-engine-loop")
        clock = time.pthread_getcpuclockid(thread.ident)
        before = time.clock_gettime(clock)
        time.sleep(1.0)
        assert time.clock_gettime(clock) - before < 0.01   # CPU seconds the loop thread used idle
    finally:
        loop.shutdown(cancel_running=True)


def test_generate_lets_a_waiting_prompt_join_when_another_finishes(tiny):
    """Engine.generate (run, --each-line, chat, bench) drives the same continuous batching: with
    room for two, the third prompt starts as soon as the short one ends, not after the long one."""
    engine = make_engine(tiny, batch=2)
    prompts = random_prompts(3, lengths=(10, 20, 15))
    events = list(engine.generate(prompts, [greedy(3), greedy(30), greedy(3)]))
    order = [event.request_index for event in events]
    def last(index):
        return len(order) - 1 - order[::-1].index(index)
    assert last(0) < order.index(2) < last(1)      # 2 began once 0 had finished, long before 1 ended
    assert engine.allocator.num_used_blocks == 0
