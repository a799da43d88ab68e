"""The Engine: a planned, loaded model; generate() gives a Generation of TokenEvents and per-request results."""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator, Optional, Sequence as Seq

from llmrun.engine.batcher import Batcher, LogitsObserver, ignore_logits
from llmrun.engine.events import KeptSequence, RequestResult, TokenEvent
from llmrun.engine.graphs import static_decode_for
from llmrun.engine.runner import ModelRunner
from llmrun.engine.sampler import SamplingParams
from llmrun.errors import ContextOverflowError
from llmrun.kv.block_allocator import BlockAllocator
from llmrun.plan.make import PlanReport
from llmrun.weights.observer import NO_STEP_OBSERVER, StepObserver


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
                 rss_before_weights_bytes: int, step_observer: StepObserver = NO_STEP_OBSERVER):
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
        self._next_seq_id = 0
        self._max_prefill_tokens = placement.prefill_chunk  # the chunk the plan's workspace holds
        self.batcher = Batcher(self, self.max_num_seqs)  # generate()'s requests; EngineLoop has its own
        self._closed = False

    @property
    def max_prefill_tokens(self) -> int:
        """Prompt tokens a step runs at most; a prompt's chunks end at its multiples."""
        return self._max_prefill_tokens

    @max_prefill_tokens.setter
    def max_prefill_tokens(self, value: int) -> None:
        self._max_prefill_tokens = value
        self.batcher.scheduler.max_prefill_tokens = value

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
        kept = KeptSequence(self.new_seq_id())
        self.allocator.add_sequence(kept.seq_id)
        return kept

    def release(self, kept: KeptSequence) -> None:
        if self.allocator.has_sequence(kept.seq_id):
            self.allocator.free_sequence(kept.seq_id)
        kept.cached_ids = []

    def new_seq_id(self) -> int:
        """A sequence id no other sequence of this engine has (kept ones included)."""
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        return seq_id

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 on_logits: Optional[LogitsObserver] = None,
                 kept: Optional[Seq[Optional[KeptSequence]]] = None) -> Generation:
        """Generate for every prompt: a Generation that yields events as tokens are sampled and
        holds each request's result once exhausted. Nothing runs until it is iterated. At most
        `max_num_seqs` (the plan's batch) run at once; the others join as soon as one finishes.

        The requests go through the engine's Batcher, the continuous-batching core EngineLoop
        also drives (engine/loop.py); here the caller's thread runs its steps.
        `on_logits(request_indices, logits)` observes each step's logits before sampling.
        `kept[i]`, when given, continues request i in that kept sequence's cached prefix.
        """
        results: list[RequestResult] = []
        per_request = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        handles = list(kept) if kept is not None else [None] * len(prompts)
        return Generation(self._events(prompts, per_request, on_logits, handles, results), results)

    def _events(self, prompts, per_request, on_logits, kept, results: list[RequestResult]) -> Iterator[TokenEvent]:
        for prompt_ids, p in zip(prompts, per_request):
            self.batcher.check_fits(prompt_ids, p)
        events: deque[TokenEvent] = deque()
        requests = []
        try:
            started = time.perf_counter()
            for index, (prompt_ids, p, handle) in enumerate(zip(prompts, per_request, kept)):
                results.append(RequestResult(len(prompt_ids), started_s=started))
                requests.append(self.batcher.add(index, prompt_ids, p, results[-1], events.append, kept=handle,
                                                 on_logits=on_logits or ignore_logits))
            while any(r.result.finish_reason is None for r in requests):
                self.batcher.step()
                while events:
                    yield events.popleft()
        finally:
            for request in requests:
                self.batcher.abort(request)  # those not finished: their blocks go back now
