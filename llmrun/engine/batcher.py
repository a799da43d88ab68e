"""The continuous-batching core every client shares: requests join and leave at any step, and a
step is schedule → run → sample → deliver (Engine.generate drives it in the caller's thread,
EngineLoop in a thread of its own)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence as Seq

import torch

from llmrun.engine.detokenize import TextStream
from llmrun.engine.events import KeptSequence, RequestResult, TokenEvent
from llmrun.engine.sampler import SamplingParams, make_generator, sample_next, token_logprobs
from llmrun.engine.scheduler import Scheduler
from llmrun.engine.sequence import FinishReason, Sequence
from llmrun.errors import ContextOverflowError

LogitsObserver = Callable[[list[int], torch.Tensor], None]


def ignore_logits(request_indices: list[int], logits: torch.Tensor) -> None:
    """The default logits observer: looks at nothing."""


@dataclass(eq=False)
class Request:
    """One request inside the batcher: its sequence, text stream, result and where events go."""

    index: int
    seq: Sequence
    stream: TextStream
    result: RequestResult
    sink: Callable[[TokenEvent], None]
    on_logits: LogitsObserver = ignore_logits
    admitted: bool = False


@dataclass
class BatcherCounters:
    """Totals since the batcher was made (read by EngineLoop.stats)."""

    prompt_tokens: int = 0           # prompt tokens of every admitted request
    generated_tokens: int = 0
    prefix_queried_tokens: int = 0   # prompt tokens looked up in the prefix cache (first admission)
    prefix_hit_tokens: int = 0       # of those, served from cached blocks or a kept sequence
    num_preemptions: int = 0
    num_finished: int = 0
    num_aborted: int = 0


class Batcher:
    """Holds the engine's requests and runs them together, step by step.

    Not thread-safe: one thread calls add/abort/step (EngineLoop's, or generate()'s caller).
    """

    def __init__(self, engine, max_num_seqs: int):
        self.engine = engine
        self.scheduler = Scheduler(engine.allocator, max_num_seqs, engine.max_prefill_tokens,
                                   engine.decoder.rope_variant)
        self.requests: dict[int, Request] = {}  # seq_id -> request, running or waiting
        self.counters = BatcherCounters()

    @property
    def has_work(self) -> bool:
        return bool(self.requests)

    def check_fits(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Refuse a request that can never run: an empty prompt, one the context cannot hold, or
        one whose prompt and reply would need more KV blocks than the whole pool has."""
        self.engine.check_prompt(prompt_ids)
        allocator = self.engine.allocator
        most = min(len(prompt_ids) + params.max_new_tokens, self.engine.max_context)
        if allocator.blocks_needed(most) > allocator.num_blocks:
            raise ContextOverflowError(
                f"the request needs up to {most} tokens ({len(prompt_ids)} of prompt and "
                f"{params.max_new_tokens} new) but the KV cache holds {allocator.capacity_tokens}; "
                f"lower max_tokens or shorten the prompt")

    def add(self, index: int, prompt_ids: Seq[int], params: SamplingParams, result: RequestResult,
            sink: Callable[[TokenEvent], None], *, kept: Optional[KeptSequence] = None,
            on_logits: LogitsObserver = ignore_logits) -> Request:
        """Queue a request (checked with check_fits); it joins the running batch at a later step.
        `result` (made by the caller, its clock started) fills in as it runs; `sink` gets its events."""
        self.check_fits(prompt_ids, params)
        seq = self._new_sequence(list(prompt_ids), params, kept)
        request = Request(index, seq, TextStream(self.engine.tokenizer, params.stop), result, sink, on_logits)
        self.requests[seq.seq_id] = request
        self.scheduler.add(seq)
        return request

    def abort(self, request: Request) -> None:
        """Take a request out now (its blocks go back to the pool); it gets no further events."""
        if self.requests.pop(request.seq.seq_id, None) is None:
            return
        self.scheduler.finish(request.seq)
        request.seq.finish_reason = request.result.finish_reason = FinishReason.ABORT
        request.result.finished_s = time.perf_counter()
        self.counters.num_aborted += 1

    def step(self) -> None:
        """One step: schedule, run the model, sample, and hand each request its event."""
        out = self.scheduler.schedule()
        for seq in out.admitted:
            self._admitted(self.requests[seq.seq_id])
        for seq in out.preempted:
            self.requests[seq.seq_id].result.num_preemptions += 1
            self.counters.num_preemptions += 1
        if not out.steps:
            if self.scheduler.waiting and not self.scheduler.running:
                raise ContextOverflowError("no waiting request fits in the KV cache")  # check_fits prevents it
            return
        sampling = [step.seq for step in out.steps if step.completes_prompt]  # before run() advances them
        logits = self.engine.runner.run(out.steps)
        for step in out.steps:
            self.scheduler.register_computed(step.seq)
        if sampling:
            self._sample(sampling, logits)

    def _admitted(self, request: Request) -> None:
        if request.admitted:
            return  # a preempted request coming back: its prompt counted once
        request.admitted = True
        cached = request.seq.num_cached
        request.result.cached_tokens = cached
        request.result.prefilled_tokens = request.result.prompt_tokens - cached
        self.counters.prompt_tokens += request.result.prompt_tokens
        self.counters.prefix_queried_tokens += request.result.prompt_tokens
        self.counters.prefix_hit_tokens += cached

    def _sample(self, sampling: list[Sequence], logits: torch.Tensor) -> None:
        requests = [self.requests[seq.seq_id] for seq in sampling]
        for observer in {id(r.on_logits): r.on_logits for r in requests}.values():
            if observer is ignore_logits:
                continue
            rows = [row for row, r in enumerate(requests) if r.on_logits is observer]
            observer([requests[row].index for row in rows], logits[rows])
        vocab = logits.shape[-1]
        rows = [(seq.params, seq.generator, self._seen(seq, vocab)) for seq in sampling]
        next_tokens = sample_next(logits, rows, self.engine.decoder.device)
        now = time.perf_counter()
        for row, (request, token) in enumerate(zip(requests, next_tokens)):
            event = self._accept(request, token, now)
            top = request.seq.params.logprobs
            if top is not None:
                logprob, pairs = token_logprobs(logits[row], token, top)
                event = TokenEvent(event.request_index, token, event.text, event.finish_reason, logprob, pairs)
            request.sink(event)

    def _new_sequence(self, prompt_ids: list[int], params: SamplingParams,
                      kept: Optional[KeptSequence]) -> Sequence:
        engine = self.engine
        if kept is None:
            seq = Sequence(engine.new_seq_id(), prompt_ids, params, engine.max_context)
        else:
            # Reuse the cached prefix, but always run at least one token to get logits.
            common = min(common_prefix_len(kept.cached_ids, prompt_ids), len(prompt_ids) - 1)
            if engine.decoder.rope_variant(len(kept.cached_ids)) != engine.decoder.rope_variant(len(prompt_ids)):
                common = 0  # cached under the other RoPE table (LongRoPE): recompute it all
            common = engine.allocator.truncate(kept.seq_id, common)
            kept.cached_ids = prompt_ids[:common]
            seq = Sequence(kept.seq_id, prompt_ids, params, engine.max_context, num_cached=common)
            seq.kept = kept
        seq.generator = make_generator(params, engine.decoder.device)
        return seq

    def _seen(self, seq: Sequence, vocab: int):
        """The sequence's mask of seen ids for the repetition penalty, marking only the ids that
        arrived since the last step (None without a penalty)."""
        if seq.params.repetition_penalty == 1.0:
            return None
        if seq.seen is None:
            seq.seen = torch.zeros(vocab, dtype=torch.bool, device=self.engine.decoder.device)
        ids = seq.all_ids
        if seq.num_seen < len(ids):
            seq.seen[torch.tensor(ids[seq.num_seen:], dtype=torch.long, device=self.engine.decoder.device)] = True
            seq.num_seen = len(ids)
        return seq.seen

    def _accept(self, request: Request, token: int, now: float) -> TokenEvent:
        seq, result, stream = request.seq, request.result, request.stream
        seq.output_ids.append(token)
        result.tokens.append(token)
        self.counters.generated_tokens += 1
        if result.first_token_s is None:
            result.first_token_s = now
        text, reason = "", None
        if token in self.engine.eos_ids:
            reason = FinishReason.EOS
        else:
            text, stopped = stream.push(token)
            if stopped:
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= seq.max_total_tokens:
                reason = FinishReason.LENGTH
        if reason is None and self._rope_switched(seq):
            seq.num_cached = 0  # K/V were rotated with the other LongRoPE table: run the sequence again
            self.engine.allocator.truncate(seq.seq_id, 0)  # its prefill chunks grow it back
        if reason is not None:
            if reason is not FinishReason.STOP:
                text += stream.flush()
            seq.finish_reason = reason
            result.finish_reason, result.finished_s = reason, now
            self.scheduler.finish(seq)
            del self.requests[seq.seq_id]
            self.counters.num_finished += 1
        result.text += text
        return TokenEvent(request.index, token, text, reason)

    def _rope_switched(self, seq: Sequence) -> bool:
        """Whether the token just added moves the sequence to another RoPE table (LongRoPE passing
        its original context), which transformers' Phi-3 generation handles by recomputing."""
        return self.engine.decoder.rope_variant(seq.num_tokens) != self.engine.decoder.rope_variant(seq.num_tokens - 1)


def common_prefix_len(a: Seq[int], b: Seq[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
