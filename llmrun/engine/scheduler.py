"""Scheduler: which sequences run in the next step and how many tokens each (no tensors)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmrun.engine.sequence import Sequence
from llmrun.errors import ContextOverflowError
from llmrun.kv.block_allocator import BlockAllocator


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int          # tokens this step runs for the sequence

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence has a next-token distribution to sample from."""
        return self.seq.num_cached + self.num_new == self.seq.num_tokens


class Scheduler:
    """Admits waiting sequences while KV blocks allow; prefill runs in chunks, then decode together.

    A step is either a prefill step (newly admitted prompts, up to `max_prefill_tokens` tokens)
    or a decode step (one token for every running sequence).
    """

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_prefill_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        self._admit()
        prefilling = [s for s in self.running if s.num_cached < s.num_tokens - 1]
        if prefilling:
            return self._prefill_chunk(prefilling)
        steps = [ScheduledSeq(s, s.num_tokens - s.num_cached) for s in self.running]
        for step in steps:
            self.allocator.grow(step.seq.seq_id, step.seq.num_cached + step.num_new)
        return steps

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            held = seq.seq_id if self.allocator.has_sequence(seq.seq_id) else None
            if not self.allocator.can_grow(held, len(seq.prompt_ids)):
                if not self.running:
                    raise ContextOverflowError(
                        f"the prompt has {len(seq.prompt_ids)} tokens but the KV cache holds "
                        f"{self.allocator.capacity_tokens}"
                    )
                return
            self.waiting.popleft()
            if held is None:
                self.allocator.add_sequence(seq.seq_id)
            self.running.append(seq)

    def _prefill_chunk(self, prefilling: list[Sequence]) -> list[ScheduledSeq]:
        """Whole chunks of the prompts while the token budget lasts (the first always runs). A
        prompt's chunks end where they would alone, every `max_prefill_tokens`, whatever else
        runs: its K/V and tokens then do not depend on its company."""
        steps, budget = [], self.max_prefill_tokens
        for seq in prefilling:
            num_new = min(seq.num_tokens - seq.num_cached, self.max_prefill_tokens)
            if steps and num_new > budget:
                break
            self.allocator.grow(seq.seq_id, seq.num_cached + num_new)
            steps.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return steps

    def finish(self, seq: Sequence) -> None:
        """Release a finished sequence's blocks (a kept one keeps them, with what they hold)."""
        self.running.remove(seq)
        if seq.kept is None:
            self.allocator.free_sequence(seq.seq_id)
            return
        self.allocator.truncate(seq.seq_id, seq.num_cached)
        seq.kept.cached_ids = seq.all_ids[: seq.num_cached]
