"""Sequence: one prompt's state through generation (tokens, cache progress, text, finish)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from llmrun.engine.sampler import SamplingParams


class FinishReason(str, Enum):
    STOP = "stop"      # a stop string appeared
    LENGTH = "length"  # max new tokens or the context window reached
    EOS = "eos"        # the model produced an end-of-sequence token
    ABORT = "abort"    # cancelled by its client (EngineLoop: RequestHandle.abort or shutdown)


@dataclass(eq=False)  # compared by identity: the scheduler's lists hold the objects themselves
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_total_tokens: int
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0                  # tokens whose K/V are in the cache
    finish_reason: Optional[FinishReason] = None
    generator: object = None             # torch.Generator for sampling, None when greedy
    seen: object = None                  # bool [vocab]: ids in prompt and output (repetition penalty)
    num_seen: int = 0                    # how many of all_ids `seen` has marked
    kept: object = None                  # a KeptSequence whose blocks outlive this generation

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
