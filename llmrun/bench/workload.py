"""The fixed benchmark workload and the statistics reported for it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from llmrun.errors import UsageError

# A neutral English passage; prompts are its tokens repeated and cut to the exact length.
_PASSAGE = (
    "The history of computing is a story of machines that grew smaller, faster and cheaper, "
    "from rooms full of vacuum tubes to chips in every pocket. Each generation of hardware "
    "made new kinds of software possible, and each new kind of software asked more of the "
    "hardware that ran it. "
)


@dataclass(frozen=True)
class Case:
    name: str
    prompt_tokens: int
    new_tokens: int
    batch: int


def default_cases(batch: int = 8, new_tokens: int = 128) -> list[Case]:
    """Prompt lengths 128 and 512, batch 1 and `batch`, `new_tokens` generated (greedy, no EOS)."""
    return [
        Case("prompt128_b1", 128, new_tokens, 1),
        Case("prompt512_b1", 512, new_tokens, 1),
        Case(f"prompt128_b{batch}", 128, new_tokens, batch),
    ]


QUICK_NEW_TOKENS = 16


def quick_cases(batch: int = 4, new_tokens: int = QUICK_NEW_TOKENS) -> list[Case]:
    """`--quick`: 64-token prompts, batch 1 and `batch`, 16 new tokens unless --new-tokens says."""
    return [Case("prompt64_b1", 64, new_tokens, 1), Case(f"prompt64_b{batch}", 64, new_tokens, batch)]


def bench_cases(quick: bool, batch: int, new_tokens: Optional[int]) -> list[Case]:
    """The workload for `llmrun bench`'s options; new_tokens None: 16 with --quick, else 128."""
    if quick:
        return quick_cases(batch, QUICK_NEW_TOKENS if new_tokens is None else new_tokens)
    return default_cases(batch, 128 if new_tokens is None else new_tokens)


def fitting_cases(cases: list[Case], ctx: int) -> list[Case]:
    """The cases whose prompt and new tokens fit in `ctx`; none is a usage error, not an empty report."""
    fitting = [case for case in cases if case.prompt_tokens + case.new_tokens <= ctx]
    if not fitting:
        smallest = min(cases, key=lambda case: case.prompt_tokens + case.new_tokens)
        raise UsageError(f"--ctx {ctx} is too short for the benchmark: its smallest case needs "
                         f"{smallest.prompt_tokens + smallest.new_tokens} tokens ({smallest.prompt_tokens}-token "
                         f"prompt + {smallest.new_tokens} new)")
    return fitting


def prompt_ids(tokenizer, length: int, variant: int = 0) -> list[int]:
    """Exactly `length` token ids of the passage (variant shifts the start so prompts differ)."""
    ids = list(tokenizer.encode(_PASSAGE, add_special_tokens=False))  # llmrun's or transformers' tokenizer
    reps = length // max(1, len(ids)) + 2
    stream = (ids * reps)[variant % len(ids):]
    return stream[:length]


@dataclass(frozen=True)
class Stat:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))

    def to_json(self) -> dict:
        """Rounded figures; null where the figure was not measured (NaN is not JSON)."""
        return {"median": _figure(self.median), "min": _figure(self.low), "max": _figure(self.high)}


def _figure(value: float):
    return None if math.isnan(value) else round(value, 4)
