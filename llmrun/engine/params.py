"""SamplingParams: what a request asks of sampling, each value checked where it is made. Torch-free,
so a command that only sends a request (`run --url`) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmrun.options import check_value

LABELS = {"repetition_penalty": "repeat-penalty", "max_new_tokens": "max-tokens"}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: Optional[int] = 40
    top_p: Optional[float] = 0.95
    min_p: Optional[float] = 0.05
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # report each token's log probability and this many most likely (0-20)

    def __post_init__(self) -> None:
        checked = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                   "repetition_penalty": self.repetition_penalty, "seed": self.seed,
                   "max_new_tokens": self.max_new_tokens, "logprobs": self.logprobs}
        for key, value in checked.items():
            check_value(key, value, LABELS.get(key, key.replace("_", "-")))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
