"""The rule for every numeric value a person types: one check shared by the command-line options,
chat's /set and SamplingParams, so the same value is accepted or refused everywhere alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

from llmrun.errors import UsageError

Number = Union[int, float]


@dataclass(frozen=True)
class Rule:
    """A finite number (an integer when `integer`) between `low` and `high`; `low_open` excludes low."""

    low: Optional[Number] = None
    high: Optional[Number] = None
    integer: bool = False
    low_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            return f"{kind} from {_fmt(self.low)} to {_fmt(self.high)}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        return f"{kind}"

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def _fmt(number: Number) -> str:
    if isinstance(number, int):
        return str(number)
    return str(int(number)) if number.is_integer() else f"{number:g}"


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits

PERPLEXITY_CHUNK = 512  # tokens a forward in `llmrun perplexity`: its default and the most (512 x vocab logits)

# key -> its rule; the keys are SamplingParams' fields and the other numeric options.
RULES = {
    "temperature": Rule(low=0),
    "top_k": Rule(low=0, integer=True),
    "top_p": Rule(low=0, high=1),
    "min_p": Rule(low=0, high=1),
    "repetition_penalty": Rule(low=0, low_open=True),
    "max_new_tokens": Rule(low=1, integer=True),
    "seed": Rule(low=0, high=SEED_MAX, integer=True),
    "logprobs": Rule(low=0, high=20, integer=True),  # most likely tokens reported beside each sampled one
    "ctx": Rule(low=2, integer=True),  # one prompt token and one generated
    "batch": Rule(low=1, integer=True),
    "port": Rule(low=0, high=65535, integer=True),
    "max_waiting": Rule(low=1, integer=True),
    "shutdown_grace": Rule(low=0),
    "reps": Rule(low=1, integer=True),
    "new_tokens": Rule(low=1, integer=True),
    "chunk": Rule(low=1, high=PERPLEXITY_CHUNK, integer=True),  # tokens a forward in `llmrun perplexity`
}


def problem(key: str, value) -> Optional[str]:
    """What is wrong with `value` under RULES[key] ("must be ..., got ..."), or None when it is fine
    (None itself passes: "not set")."""
    rule = RULES[key]
    if value is None or rule.accepts(value):
        return None
    return f"must be {rule.describe()}, got {value!r}"


def check_value(key: str, value, label: Optional[str] = None):
    """`value` when RULES[key] accepts it, else a UsageError naming `label` (the option as the person
    typed it: "--top-p", "top_p") and the range."""
    wrong = problem(key, value)
    if wrong:
        raise UsageError(f"{label or key} {wrong}")
    return value


def parse_value(key: str, text: str, label: Optional[str] = None):
    """Text typed by a person (chat's /set) read as RULES[key]'s kind of number, then checked."""
    rule = RULES[key]
    try:
        value = int(text, 10) if rule.integer else float(text)
    except ValueError:
        raise UsageError(f"{label or key} must be {rule.describe()}, got {text!r}") from None
    return check_value(key, value, label)
