"""The Engine: a planned, loaded model; generate() gives a Generation of TokenEvents and per-request results."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence as Seq

import torch

from llmrun.engine.detokenize import TextStream
from llmrun.engine.graphs import static_decode_for
from llmrun.engine.runner import ModelRunner
from llmrun.engine.sampler import SamplingParams, make_generator, sample_next
from llmrun.engine.scheduler import Scheduler
from llmrun.engine.sequence import FinishReason, Sequence
from llmrun.errors import ContextOverflowError
from llmrun.kv.block_allocator import BlockAllocator
from llmrun.plan.make import PlanReport
from llmrun.weights.observer import NO_STEP_OBSERVER, StepObserver


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request (the request's index in the generate() call)."""

    request_index: int
    token_id: int
    text: str                              # newly settled text (may be empty)
    finish_reason: Optional[FinishReason]  # set on the request's last event


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
    prompt_tokens: int
    prefilled_tokens: int = 0              # prompt tokens run through the model (the rest was cached)
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: Optional[FinishReason] = None
    started_s: float = 0.0
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None

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


class Generation:
    """One generate() call: iterate it for TokenEvents; once exhausted, `results[i]` holds request i's
    text, tokens and timing. Closing it early (or leaving its `with`) frees its sequences."""

    def __init__(self, events: Iterator[TokenEvent], results: list[RequestResult]):
        self._events = events
        self.results = results

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def run_to_end(self) -> list[RequestResult]:
        """Generate every remaining token; the per-request results."""
        for _ in self:
            pass
        return self.results

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine:
    """A loaded model with its paged KV cache, able to generate for several prompts at once.

    Everything comes through the constructor: the plan it was loaded by (context, batch and KV
    blocks), the process's RSS before the weights were loaded, and the step observer the weights
    report layers to (one that watches layers turns CUDA graph replay off: see ModelRunner).
    `close()` (or leaving `with Engine(...)`) releases the weights provider.
    """

    def __init__(self, decoder, weights, tokenizer, eos_ids: Seq[int], *, plan: PlanReport,
                 rss_before_weights_bytes: int, step_observer: StepObserver = NO_STEP_OBSERVER,
                 max_prefill_tokens: int = 2048):
        from llmrun.kv.paged_cache import KVCacheShape, PagedKVCache

        cfg, placement = decoder.config, plan.placement
        self.decoder = decoder
        self.weights = weights
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_ids)
        self.plan = plan
        self.rss_before_weights_bytes = rss_before_weights_bytes
        self.max_context = placement.ctx
        self.allocator = BlockAllocator(placement.num_kv_blocks, placement.block_size)
        shape = KVCacheShape(cfg.num_hidden_layers, placement.num_kv_blocks, placement.block_size,
                             cfg.num_key_value_heads, cfg.head_dim)
        self.cache = PagedKVCache(shape, decoder.dtype, decoder.device)
        static = static_decode_for(decoder, weights, self.cache, placement.batch, placement.ctx)
        self.runner = ModelRunner(decoder, weights, self.cache, self.allocator, static, step_observer)
        self.max_num_seqs = placement.batch
        self.max_prefill_tokens = max_prefill_tokens
        self._next_seq_id = 0
        self._closed = False

    def close(self) -> None:
        """Release the weights provider (its streamer thread, staging buffers, open files); once."""
        if not self._closed:
            self._closed = True
            self.weights.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_prompt(self, prompt_ids: Seq[int]) -> None:
        if not prompt_ids:
            raise ContextOverflowError("the prompt is empty after tokenization")
        if len(prompt_ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the context window is "
                f"{self.max_context} tokens (leave room for the reply; raise --ctx if the model allows)"
            )

    def keep_sequence(self) -> KeptSequence:
        """A handle whose KV blocks outlive generate() calls; give it back with release()."""
        kept = KeptSequence(self._next_seq_id)
        self._next_seq_id += 1
        self.allocator.add_sequence(kept.seq_id)
        return kept

    def release(self, kept: KeptSequence) -> None:
        if self.allocator.has_sequence(kept.seq_id):
            self.allocator.free_sequence(kept.seq_id)
        kept.cached_ids = []

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 on_logits: Optional[Callable] = None,
                 kept: Optional[Seq[Optional[KeptSequence]]] = None) -> Generation:
        """Generate for every prompt together: a Generation that yields events as tokens are sampled
        and holds each request's result once exhausted. Nothing runs until it is iterated.

        `on_logits(request_indices, logits)` observes each step's logits before sampling.
        `kept[i]`, when given, continues request i in that kept sequence's cached prefix.
        """
        results: list[RequestResult] = []
        per_request = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        handles = list(kept) if kept is not None else [None] * len(prompts)
        return Generation(self._events(prompts, per_request, on_logits, handles, results), results)

    def _events(self, prompts, per_request, on_logits, kept, results: list[RequestResult]) -> Iterator[TokenEvent]:
        scheduler = Scheduler(self.allocator, self.max_num_seqs, self.max_prefill_tokens)
        started = time.perf_counter()
        seqs, streams = {}, {}
        for index, (prompt_ids, p, handle) in enumerate(zip(prompts, per_request, kept)):
            self.check_prompt(prompt_ids)
            seq = self._new_sequence(list(prompt_ids), p, handle)
            seqs[seq.seq_id] = index
            streams[seq.seq_id] = TextStream(self.tokenizer, p.stop)
            results.append(RequestResult(len(prompt_ids), len(prompt_ids) - seq.num_cached, started_s=started))
            scheduler.add(seq)
        try:
            while scheduler.has_work:
                yield from self._step(scheduler, seqs, streams, on_logits, results)
        finally:
            for seq in list(scheduler.running):
                scheduler.finish(seq)

    def _new_sequence(self, prompt_ids: list[int], params: SamplingParams,
                      kept: Optional[KeptSequence]) -> Sequence:
        if kept is None:
            seq = Sequence(self._next_seq_id, prompt_ids, params, self.max_context)
            self._next_seq_id += 1
        else:
            # Reuse the cached prefix, but always run at least one token to get logits.
            common = min(common_prefix_len(kept.cached_ids, prompt_ids), len(prompt_ids) - 1)
            if self.decoder.rope_variant(len(kept.cached_ids)) != self.decoder.rope_variant(len(prompt_ids)):
                common = 0  # cached under the other RoPE table (LongRoPE): recompute it all
            self.allocator.truncate(kept.seq_id, common)
            kept.cached_ids = prompt_ids[:common]
            seq = Sequence(kept.seq_id, prompt_ids, params, self.max_context, num_cached=common)
            seq.kept = kept
        seq.generator = make_generator(params, self.decoder.device)
        return seq

    def _step(self, scheduler: Scheduler, seqs: dict, streams: dict, on_logits,
              results: list[RequestResult]) -> Iterator[TokenEvent]:
        steps = scheduler.schedule()
        sampling = [s.seq for s in steps if s.completes_prompt]  # before run() advances them
        logits = self.runner.run(steps)
        if not sampling:
            return
        if on_logits is not None:
            on_logits([seqs[seq.seq_id] for seq in sampling], logits)
        rows = [(seq.params, seq.generator, self._seen(seq, logits.shape[-1])) for seq in sampling]
        next_tokens = sample_next(logits, rows, self.decoder.device)
        now = time.perf_counter()
        for seq, token in zip(sampling, next_tokens):
            index = seqs[seq.seq_id]
            yield self._accept(seq, token, now, scheduler, index, streams[seq.seq_id], results[index])

    def _seen(self, seq: Sequence, vocab: int):
        """The sequence's mask of seen ids for the repetition penalty, marking only the ids that
        arrived since the last step (None without a penalty)."""
        if seq.params.repetition_penalty == 1.0:
            return None
        if seq.seen is None:
            seq.seen = torch.zeros(vocab, dtype=torch.bool, device=self.decoder.device)
        ids = seq.all_ids
        if seq.num_seen < len(ids):
            seq.seen[torch.tensor(ids[seq.num_seen:], dtype=torch.long, device=self.decoder.device)] = True
            seq.num_seen = len(ids)
        return seq.seen

    def _accept(self, seq, token, now, scheduler, index, stream, result: RequestResult) -> TokenEvent:
        seq.output_ids.append(token)
        result.tokens.append(token)
        if result.first_token_s is None:
            result.first_token_s = now
        text, reason = "", None
        if token in self.eos_ids:
            reason = FinishReason.EOS
        else:
            text, stopped = stream.push(token)
            if stopped:
                reason = FinishReason.STOP
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.num_tokens >= seq.max_total_tokens:
                reason = FinishReason.LENGTH
        if reason is None and self._rope_switched(seq):
            seq.num_cached = 0  # K/V were rotated with the other LongRoPE table: run the sequence again
            self.allocator.truncate(seq.seq_id, 0)  # its prefill chunks grow it back
        if reason is not None:
            if reason is not FinishReason.STOP:
                text += stream.flush()
            seq.finish_reason = reason
            result.finish_reason, result.finished_s = reason, now
            scheduler.finish(seq)
        result.text += text
        return TokenEvent(index, token, text, reason)

    def _rope_switched(self, seq: Sequence) -> bool:
        """Whether the token just added moves the sequence to another RoPE table (LongRoPE passing
        its original context), which transformers' Phi-3 generation handles by recomputing."""
        return self.decoder.rope_variant(seq.num_tokens) != self.decoder.rope_variant(seq.num_tokens - 1)


def common_prefix_len(a: Seq[int], b: Seq[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
