"""EngineLoop: one thread runs the engine's steps while requests come and go (continuous batching);
RequestHandle: one request's events, for threads and for asyncio."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Optional, Sequence as Seq

from llmrun.engine.batcher import Batcher, Request
from llmrun.engine.events import RequestResult, TokenEvent
from llmrun.engine.sampler import SamplingParams
from llmrun.errors import EngineStoppedError, LlmrunError, QueueFullError


@dataclass(frozen=True)
class LoopStats:
    """A snapshot of the loop, taken after each step (counts since the loop started)."""

    num_running: int                 # requests in the running batch
    num_waiting: int                 # submitted, not yet running (preempted ones included)
    num_blocks: int                  # KV blocks in the pool
    num_used_blocks: int             # held by requests
    num_cached_blocks: int           # held by none, kept for prefix hits (reclaimed when needed)
    num_free_blocks: int             # neither held nor cached
    prefix_queried_tokens: int       # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int           # of those, served from it
    prompt_tokens: int               # prompt tokens of every admitted request
    generated_tokens: int
    num_finished: int
    num_aborted: int
    num_preemptions: int


class RequestHandle:
    """One submitted request. Every method is thread-safe.

    `events()` (blocking) and `aevents()` (asyncio) yield its TokenEvents from the first, each
    time they are called; they end after the event whose `finish_reason` is set, or, when the
    request was aborted, without one (then `result.finish_reason` is FinishReason.ABORT). Should
    a step fail, they raise EngineStoppedError. `result` fills in as tokens come (text, tokens,
    finish_reason, timings; `cached_tokens` once the request has joined the batch).
    """

    def __init__(self, loop: "EngineLoop", serial: int, prompt_ids: list[int], params: SamplingParams):
        self.request_id = f"req-{serial}"
        self.serial = serial              # TokenEvent.request_index of its events
        self.prompt_ids = prompt_ids
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.result = RequestResult(len(prompt_ids), started_s=time.perf_counter())
        self._loop = loop
        self._cond = threading.Condition()
        self._events: list[TokenEvent] = []
        self._done = False
        self._error: Optional[BaseException] = None
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._request: Optional[Request] = None  # set by the loop thread when it joins the batcher

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (0 until the request joins the batch)."""
        return self.result.cached_tokens

    @property
    def done(self) -> bool:
        with self._cond:
            return self._done

    def abort(self) -> None:
        """Cancel the request: it leaves the batch and its blocks are back in the pool before the
        loop's next step. Harmless once it has finished."""
        self._loop._abort(self)

    def events(self) -> Iterator[TokenEvent]:
        seen = 0
        while True:
            with self._cond:
                while seen >= len(self._events) and not self._done:
                    self._cond.wait()
                batch, done, error = self._events[seen:], self._done, self._error
            seen += len(batch)
            yield from batch
            if done:
                if error is not None:
                    raise EngineStoppedError(f"the engine stopped: {error}") from error
                return

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        wake = asyncio.Event()
        waker = (asyncio.get_running_loop(), wake)
        with self._cond:
            self._wakers.append(waker)
        try:
            seen = 0
            while True:
                wake.clear()
                with self._cond:
                    batch, done, error = self._events[seen:], self._done, self._error
                seen += len(batch)
                for event in batch:
                    yield event
                if done:
                    if error is not None:
                        raise EngineStoppedError(f"the engine stopped: {error}") from error
                    return
                if not batch:
                    await wake.wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)

    # -- called by the loop thread ------------------------------------------------------------
    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._done = self._done or event.finish_reason is not None
            self._wake()

    def _close(self, error: Optional[BaseException] = None) -> None:
        with self._cond:
            self._done, self._error = True, error
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        for event_loop, wake in self._wakers:
            try:
                event_loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that event loop has closed: nobody is waiting there any more
                pass


class EngineLoop:
    """Owns an Engine while it runs: one background thread runs steps while there is work and
    sleeps (no busy loop) when there is none.

    `submit()` queues a request and returns its handle; the request joins the running batch at
    the loop's next step that has room (at most `max_running` at once; KV blocks permitting),
    prompts prefilled in chunks between decode steps, and leaves when it finishes or is aborted.
    Refused up front, as one-line LlmrunErrors: a prompt the context or the whole KV pool can
    never hold (ContextOverflowError), more than `max_waiting` requests waiting (QueueFullError),
    a loop shutting down (EngineStoppedError). Do not call engine.generate() while it runs.
    """

    def __init__(self, engine, *, max_waiting: int, max_running: Optional[int] = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self._batcher = Batcher(engine, max_running or engine.max_num_seqs)
        self._cond = threading.Condition()
        self._inbox: list[RequestHandle] = []
        self._aborts: list[RequestHandle] = []
        self._handles: dict[int, RequestHandle] = {}   # by serial, while in the batcher
        self._serials = itertools.count()
        self._stopping = self._cancel = False
        self._thread = threading.Thread(target=self._run, name="llmrun-engine-loop", daemon=True)
        self._stats = self._snapshot()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, cancel_running: bool) -> None:
        """Stop taking requests; let those submitted finish (or, with `cancel_running`, abort
        them all: their events end), then stop the thread. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cancel = self._cancel or cancel_running
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, prompt_ids: Seq[int], params: SamplingParams) -> RequestHandle:
        """Queue a request; raises ContextOverflowError, QueueFullError or EngineStoppedError."""
        self._batcher.check_fits(prompt_ids, params)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is shutting down and takes no new requests")
            waiting = self._stats.num_waiting + len(self._inbox)
            if waiting >= self.max_waiting:
                raise QueueFullError(f"{waiting} requests are waiting already (at most {self.max_waiting}); "
                                     f"try again shortly")
            handle = RequestHandle(self, next(self._serials), list(prompt_ids), params)
            self._inbox.append(handle)
            self._cond.notify_all()
        return handle

    def stats(self) -> LoopStats:
        with self._cond:
            return self._stats

    # -- the loop thread ------------------------------------------------------------------------
    def _abort(self, handle: RequestHandle) -> None:
        with self._cond:
            self._aborts.append(handle)
            self._cond.notify_all()

    def _run(self) -> None:
        batcher = self._batcher
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stopping or batcher.has_work):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                stopping, cancel = self._stopping, self._cancel
            for handle in inbox:
                self._join(handle)
            for handle in aborts + (list(self._handles.values()) if cancel else []):
                self._leave(handle)
            if batcher.has_work:
                self._step()
            with self._cond:
                self._stats = self._snapshot()
                if stopping and not batcher.has_work and not self._inbox:
                    return

    def _join(self, handle: RequestHandle) -> None:
        try:
            handle._request = self._batcher.add(handle.serial, handle.prompt_ids, handle.params, handle.result,
                                                handle._push)
        except LlmrunError as err:  # checked at submit already; the pool cannot have shrunk since
            handle._close(err)
            return
        self._handles[handle.serial] = handle

    def _leave(self, handle: RequestHandle) -> None:
        if self._handles.pop(handle.serial, None) is not None:
            self._batcher.abort(handle._request)
            handle._close()

    def _step(self) -> None:
        try:
            self._batcher.step()
        except Exception as err:  # every request in the batch fails alike; the loop goes on
            for handle in list(self._handles.values()):
                self._handles.pop(handle.serial)
                self._batcher.abort(handle._request)
                handle._close(err)
            return
        for serial in [s for s, h in self._handles.items() if h.result.finish_reason is not None]:
            del self._handles[serial]

    def _snapshot(self) -> LoopStats:
        allocator, scheduler, counters = self.engine.allocator, self._batcher.scheduler, self._batcher.counters
        return LoopStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            num_blocks=allocator.num_blocks, num_used_blocks=allocator.num_used_blocks,
            num_cached_blocks=allocator.num_cached_blocks,
            num_free_blocks=allocator.num_free_blocks - allocator.num_cached_blocks,
            prefix_queried_tokens=counters.prefix_queried_tokens, prefix_hit_tokens=counters.prefix_hit_tokens,
            prompt_tokens=counters.prompt_tokens, generated_tokens=counters.generated_tokens,
            num_finished=counters.num_finished, num_aborted=counters.num_aborted,
            num_preemptions=counters.num_preemptions,
        )
