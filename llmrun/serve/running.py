"""One HTTP request's sequences on the engine loop: its choices submitted together (a refusal
turned into its HTTP status), their events merged as they come, all aborted at once when the
client goes away."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from llmrun.engine.events import RequestResult, TokenEvent
from llmrun.engine.sampler import SamplingParams
from llmrun.engine.sequence import FinishReason
from llmrun.errors import ContextOverflowError, EngineStoppedError, LlmrunError, QueueFullError
from llmrun.serve.metrics import ServerMetrics
from llmrun.serve.protocol import ApiError
from llmrun.serve.responses import Usage

COMPLETE = (FinishReason.STOP, FinishReason.LENGTH, FinishReason.EOS)
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ChoiceSpec:
    """One sequence to run: the prompt it continues (its index among the request's prompts) and
    its sampling parameters."""

    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams


def refusal(err: LlmrunError) -> ApiError:
    """The HTTP answer to a request the engine loop refuses at submission."""
    if isinstance(err, QueueFullError):
        return ApiError(429, f"the server is busy: {err}", kind="rate_limit_error", code="queue_full",
                        headers={"retry-after": str(RETRY_AFTER_S)})
    if isinstance(err, ContextOverflowError):
        return ApiError(400, str(err), code="context_length_exceeded")
    if isinstance(err, EngineStoppedError):
        return ApiError(503, str(err), kind="server_error", code="shutting_down")
    return ApiError(400, str(err))


class RunningRequest:
    """The engine requests behind one HTTP request, choice i being `specs[i]`.

    Submitting happens in the constructor: all choices or none (a refusal aborts those already
    submitted). `events()` yields (choice index, TokenEvent) as tokens come; `abort()` cancels
    every choice still running (harmless once they finished).
    """

    def __init__(self, loop, specs: list[ChoiceSpec], metrics: ServerMetrics):
        self.specs = specs
        self.metrics = metrics
        self.arrived_s = time.perf_counter()
        self.client_gone = False
        self.failure: Optional[EngineStoppedError] = None  # a step failed: the request cannot go on
        self.handles = []
        try:
            for spec in specs:
                self.handles.append(loop.submit(spec.prompt_ids, spec.params))
        except LlmrunError as err:
            self.abort()
            raise refusal(err) from None
        self._first_seen = [False] * len(specs)

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Every choice's events as they come; a failed engine step ends them (see `failure`)."""
        try:
            async for item in self._merged():
                yield item
        except EngineStoppedError as err:
            self.failure = err
            self.abort()

    @property
    def cut_short(self) -> Optional[str]:
        """Why a choice did not run to its end, when the client did not leave: a failed step, or
        the server shutting down. None when every choice finished."""
        if self.failure is not None:
            return str(self.failure)
        if self.complete or self.client_gone:
            return None
        return "the request was cancelled: the server is shutting down"

    async def _merged(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        if len(self.handles) == 1:  # the common case, without a task per choice
            async for event in self.handles[0].aevents():
                self._count(0)
                yield 0, event
            return
        queue: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.ensure_future(_pump(index, handle, queue)) for index, handle in enumerate(self.handles)]
        try:
            remaining = len(pumps)
            while remaining:
                index, event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if event is None:
                    remaining -= 1
                    continue
                self._count(index)
                yield index, event
        finally:
            for pump in pumps:
                pump.cancel()

    def _count(self, index: int) -> None:
        if not self._first_seen[index]:
            self._first_seen[index] = True
            self.metrics.ttft.observe(time.perf_counter() - self.arrived_s)

    def abort(self) -> None:
        """Stop every choice still running: the loop frees their blocks before its next step."""
        for handle in self.handles:
            handle.abort()

    def results(self) -> list[RequestResult]:
        return [handle.result for handle in self.handles]

    @property
    def complete(self) -> bool:
        """Every choice ran to its end (no abort cut one short)."""
        return all(result.finish_reason in COMPLETE for result in self.results())

    def usage(self) -> Usage:
        """Each prompt counted once, whatever its number of choices (as OpenAI counts)."""
        usage, seen = Usage(), set()
        for spec, result in zip(self.specs, self.results()):
            usage.completion_tokens += len(result.tokens)
            if spec.prompt_index not in seen:
                seen.add(spec.prompt_index)
                usage.prompt_tokens += result.prompt_tokens
                usage.cached_tokens += result.cached_tokens
        return usage

    @property
    def ttft_s(self) -> Optional[float]:
        firsts = [r.first_token_s for r in self.results() if r.first_token_s is not None]
        return min(firsts) - self.arrived_s if firsts else None


async def _pump(index: int, handle, queue: asyncio.Queue) -> None:
    """Copy one choice's events into the request's queue; None marks its end, an exception its failure."""
    try:
        async for event in handle.aevents():
            queue.put_nowait((index, event))
    except Exception as err:  # handed to the reader, which raises it
        queue.put_nowait((index, err))
    finally:
        queue.put_nowait((index, None))


async def abort_when_gone(receive, running: RunningRequest) -> None:
    """Wait for the client to disconnect, then abort its sequences. Run as a task beside the
    response; cancelled once the response is sent."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            running.client_gone = True
            running.abort()
            return
