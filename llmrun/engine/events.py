"""What a request gives back: its TokenEvents as tokens are sampled, and its RequestResult."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llmrun.engine.sequence import FinishReason


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request.

    `request_index` is the request's index in its generate() call (for EngineLoop requests: the
    loop's serial number of the request). `logprob` and `top_logprobs` are filled only when the
    request's SamplingParams ask for them (`logprobs` not None): the sampled token's log
    probability under the model's raw distribution (float32 log-softmax of the logits, before
    temperature and filters, as OpenAI reports them), and the `logprobs` most likely
    (token id, log probability) pairs, most likely first.
    """

    request_index: int
    token_id: int
    text: str                              # newly settled text (may be empty)
    finish_reason: Optional[FinishReason]  # set on the request's last event
    logprob: Optional[float] = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class KeptSequence:
    """A sequence whose KV blocks stay cached between generate() calls (a conversation).

    The next call with it prefills only what follows the longest common prefix of `cached_ids`
    and the new prompt, so the result equals a fresh run while skipping the shared history.
    """

    seq_id: int
    cached_ids: list[int] = field(default_factory=list)


@dataclass
class RequestResult:
    """A request's outcome so far; complete once `finish_reason` is set.

    `cached_tokens`: prompt tokens whose K/V came from the prefix cache or a kept sequence when
    the request was admitted; `prefilled_tokens`: prompt tokens run through the model (a
    preempted request's recomputation included). Times are `time.perf_counter()` seconds.
    """

    prompt_tokens: int
    prefilled_tokens: int = 0              # prompt tokens run through the model (the rest was cached)
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[FinishReason] = None
    started_s: float = 0.0
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None
    cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft_s(self) -> float:
        return (self.first_token_s or self.started_s) - self.started_s

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first token (the first one pays for the prefill)."""
        if self.first_token_s is None or self.finished_s is None or len(self.tokens) < 2:
            return 0.0
        elapsed = self.finished_s - self.first_token_s
        return (len(self.tokens) - 1) / elapsed if elapsed > 0 else 0.0
