"""Scheduler: which sequences run in the next step and how many tokens each (no tensors)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Hashable

from llmrun.engine.sequence import Sequence
from llmrun.kv.block_allocator import BlockAllocator


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int          # tokens this step runs for the sequence

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence has a next-token distribution to sample from."""
        return self.seq.num_cached + self.num_new == self.seq.num_tokens


@dataclass(frozen=True)
class ScheduleOutput:
    steps: list[ScheduledSeq]
    admitted: list[Sequence]     # started this step (their num_cached: what the prefix cache gave)
    preempted: list[Sequence]    # blocks freed, back at the head of the queue, to be recomputed


class Scheduler:
    """Continuous batching: sequences join at any step and leave when they finish.

    Each step runs one token for every decoding sequence and, beside them, prompt chunks while
    `max_prefill_tokens` last (the first chunk always runs). A prompt's chunks end at multiples of
    `max_prefill_tokens` from its first token, whatever runs beside it, so its K/V do not depend
    on its company. A waiting sequence starts (oldest first) when its whole prompt fits in the
    free blocks, from the longest run of its full blocks the prefix cache holds. When a running
    sequence needs a block and none is free, the newest running sequence is preempted: its blocks
    are released (the named ones stay cached) and it waits at the head of the queue, to be
    computed again from its prompt and the tokens it has made.

    `prefix_salt(num_tokens)` is what else a sequence's K/V depend on (the RoPE variant).
    """

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_prefill_tokens: int,
                 prefix_salt: Callable[[int], Hashable]):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_salt = prefix_salt
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduleOutput:
        admitted = self._admit()
        preempted: list[Sequence] = []
        steps = self._decode_rows(preempted) + self._prefill_chunks(preempted)
        steps = [step for step in steps if step.seq not in preempted]  # a chunk may preempt a newer row
        return ScheduleOutput(steps, [s for s in admitted if s not in preempted], preempted)

    def _admit(self) -> list[Sequence]:
        """Start waiting sequences, oldest first, while their prompts fit beside the blocks the
        running ones need for this step's decode rows (so a newcomer is not preempted at once)."""
        admitted = []
        reserve = sum(1 for s in self.running if s.num_cached == s.num_tokens - 1
                      and self.allocator.blocks_needed(s.num_tokens) > len(self.allocator.block_table(s.seq_id)))
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.allocator.has_sequence(seq.seq_id):
                self.allocator.add_sequence(seq.seq_id)
            if self.allocator.num_tokens(seq.seq_id) == 0:  # nothing held yet: ask the prefix cache
                salt = self.prefix_salt(seq.num_tokens)
                blocks, names = self.allocator.match_prefix(seq.all_ids[: seq.num_tokens - 1], salt)
                if not self.allocator.can_start(blocks, seq.num_tokens, reserve):
                    return admitted
                seq.num_cached = self.allocator.attach(seq.seq_id, blocks, names)
            elif not self.allocator.can_grow(seq.seq_id, seq.num_tokens + reserve * self.allocator.block_size):
                return admitted
            self.waiting.popleft()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _decode_rows(self, preempted: list[Sequence]) -> list[ScheduledSeq]:
        steps = []
        for seq in [s for s in self.running if s.num_cached == s.num_tokens - 1]:
            if seq in preempted or not self._make_room(seq, seq.num_tokens, preempted):
                continue
            self.allocator.grow(seq.seq_id, seq.num_tokens)
            steps.append(ScheduledSeq(seq, 1))
        return steps

    def _prefill_chunks(self, preempted: list[Sequence]) -> list[ScheduledSeq]:
        """Whole chunks of the prompts while the token budget lasts (the first always runs)."""
        steps, budget, size = [], self.max_prefill_tokens, self.max_prefill_tokens
        for seq in [s for s in self.running if s.num_cached < s.num_tokens - 1]:
            if seq in preempted:
                continue
            end = min(seq.num_tokens, (seq.num_cached // size + 1) * size)
            num_new = end - seq.num_cached
            if steps and num_new > budget:
                break
            if not self._make_room(seq, end, preempted):
                break
            self.allocator.grow(seq.seq_id, end)
            steps.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return steps

    def _make_room(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Preempt the newest running sequences until `seq` can hold `num_tokens` tokens; False
        when `seq` itself was the newest and was preempted."""
        while not self.allocator.can_grow(seq.seq_id, num_tokens):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Release a running sequence's blocks and put it first in the queue (recomputed later)."""
        self.running.remove(seq)
        self.allocator.truncate(seq.seq_id, 0)
        seq.num_cached = 0
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence, running or waiting, and release its blocks (a kept one keeps them,
        with what they hold)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not self.allocator.has_sequence(seq.seq_id):
            return
        if seq.kept is None:
            self.allocator.free_sequence(seq.seq_id)
            return
        seq.num_cached = self.allocator.truncate(seq.seq_id, min(seq.num_cached, self.allocator.num_tokens(seq.seq_id)))
        seq.kept.cached_ids = seq.all_ids[: seq.num_cached]

    def register_computed(self, seq: Sequence) -> None:
        """Name the sequence's newly computed full blocks for the prefix cache."""
        if seq.num_cached // self.allocator.block_size > self.allocator.num_named_blocks(seq.seq_id):
            self.allocator.register(seq.seq_id, seq.all_ids, seq.num_cached, self.prefix_salt(seq.num_tokens))
