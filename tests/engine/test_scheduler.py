"""The scheduler alone (no model): prompt chunks beside decode rows on a fixed grid, admission
from the prefix cache, preemption of the newest sequence when blocks run out."""

from llmrun.engine.sampler import SamplingParams
from llmrun.engine.scheduler import Scheduler
from llmrun.engine.sequence import Sequence
from llmrun.kv.block_allocator import BlockAllocator

PARAMS = SamplingParams(temperature=0, max_new_tokens=100)


def scheduler_with(num_blocks, block_size=4, max_prefill_tokens=8, max_num_seqs=8):
    allocator = BlockAllocator(num_blocks, block_size)
    return Scheduler(allocator, max_num_seqs, max_prefill_tokens, prefix_salt=lambda num_tokens: "rope"), allocator


def sequence(seq_id, prompt):
    return Sequence(seq_id, list(prompt), PARAMS, max_total_tokens=1000)


def run_step(scheduler):
    """Schedule a step and do what the runner and sampler would: advance, then add a token."""
    out = scheduler.schedule()
    for step in out.steps:
        sampled = step.completes_prompt
        step.seq.num_cached += step.num_new
        scheduler.register_computed(step.seq)
        if sampled:
            step.seq.output_ids.append(7)
    return out


def shape(out):
    return [(step.seq.seq_id, step.num_new) for step in out.steps]


def test_prompt_chunks_end_on_the_grid_and_run_beside_decode_rows():
    scheduler, _ = scheduler_with(32)
    short, long = sequence(0, range(3)), sequence(1, range(100, 120))
    scheduler.add(short)
    assert shape(run_step(scheduler)) == [(0, 3)]
    scheduler.add(long)
    assert shape(run_step(scheduler)) == [(0, 1), (1, 8)]      # a decode row and a chunk together
    assert shape(run_step(scheduler)) == [(0, 1), (1, 8)]
    assert shape(run_step(scheduler)) == [(0, 1), (1, 4)]      # the prompt's rest, sampled
    assert shape(run_step(scheduler)) == [(0, 1), (1, 1)]


def test_a_prefix_hit_starts_past_the_cached_blocks_and_keeps_the_grid():
    scheduler, allocator = scheduler_with(32)
    first = sequence(0, range(20))
    scheduler.add(first)
    for _ in range(3):
        run_step(scheduler)
    second = sequence(1, list(range(13)) + [99] * 7)          # 13 shared tokens: 3 full blocks
    scheduler.add(second)
    out = run_step(scheduler)
    assert out.admitted == [second] and second.num_cached == 12 + 4   # 12 from the cache, then 4 run
    assert shape(out) == [(0, 1), (1, 4)]                     # [12, 16): up to the grid point
    assert allocator.block_table(1)[:3] == allocator.block_table(0)[:3]
    assert shape(run_step(scheduler)) == [(0, 1), (1, 4)]     # [16, 20)


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_comes_back_first():
    scheduler, allocator = scheduler_with(4, max_prefill_tokens=16)
    older, newer, waiting = sequence(0, range(6)), sequence(1, range(10, 16)), sequence(2, range(20, 22))
    for seq in (older, newer, waiting):
        scheduler.add(seq)
    assert shape(run_step(scheduler)) == [(0, 6), (1, 6)]     # the third does not fit yet
    assert shape(run_step(scheduler)) == [(0, 1), (1, 1)]
    assert shape(run_step(scheduler)) == [(0, 1), (1, 1)]     # 8 tokens each: their blocks are full
    out = run_step(scheduler)                                  # both need a third block: none is free
    assert out.preempted == [newer] and shape(out) == [(0, 1)]
    assert newer.num_cached == 0 and list(scheduler.waiting) == [newer, waiting]
    assert newer.output_ids == [7, 7, 7]                       # kept: recomputed with its prompt
    scheduler.finish(older)
    out = run_step(scheduler)
    # back first, from the prefix cache: its first block (its second went to the older one's growth)
    assert out.admitted == [newer, waiting] and newer.num_cached == 4 + 5
    assert shape(out) == [(1, 5), (2, 2)]
    assert allocator.num_used_blocks == 4


def test_a_newcomer_waits_while_running_rows_need_the_last_blocks():
    scheduler, _ = scheduler_with(3)
    running = sequence(0, range(8))
    scheduler.add(running)
    run_step(scheduler)                                        # 8 tokens in 2 blocks; needs a 3rd next
    scheduler.add(sequence(1, range(30, 33)))
    out = run_step(scheduler)
    assert out.admitted == [] and out.preempted == [] and shape(out) == [(0, 1)]
