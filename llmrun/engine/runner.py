"""ModelRunner: turns one scheduled step into a decoder forward over the paged cache, and logits."""

from __future__ import annotations

from typing import Optional

import torch

from llmrun.engine.graphs import StaticDecode
from llmrun.engine.scheduler import ScheduledSeq
from llmrun.kv.block_allocator import BlockAllocator
from llmrun.kv.metadata import SeqStep, build_metadata
from llmrun.kv.paged_cache import PagedKVCache


class ModelRunner:
    def __init__(self, decoder, weights, cache: PagedKVCache, allocator: BlockAllocator,
                 static: Optional[StaticDecode] = None):
        self.decoder = decoder
        self.weights = weights
        self.cache = cache
        self.allocator = allocator
        self.device = decoder.device
        self.static = static  # decode steps of static shape (CUDA graphs), where enabled

    @torch.inference_mode()
    def run(self, steps: list[ScheduledSeq]) -> torch.Tensor:
        """Run a step; returns logits [num_sampling_seqs, vocab] for the steps that complete a prompt.

        Every scheduled sequence's `num_cached` advances by its `num_new`.
        """
        if self.static is not None and self.static.handles(steps):
            tables = [self.allocator.block_table(step.seq.seq_id) for step in steps]
            # a per-layer progress hook is Python a graph would skip: such steps run the same forward eagerly
            return self.static.run(steps, tables, replay=getattr(self.weights, "on_step_layer", None) is None)
        input_ids, positions, seq_steps, last_rows = [], [], [], []
        for step in steps:
            seq, start = step.seq, step.seq.num_cached
            input_ids.extend(seq.all_ids[start : start + step.num_new])
            positions.extend(range(start, start + step.num_new))
            seq_steps.append(SeqStep(self.allocator.block_table(seq.seq_id), start, step.num_new, seq.num_tokens))
            if step.completes_prompt:
                last_rows.append(len(input_ids) - 1)
        meta = build_metadata(seq_steps, self.cache.shape.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.decoder.forward(self.weights, ids, pos, meta, self.cache)
        for step in steps:
            step.seq.num_cached += step.num_new
        logits = hidden.new_empty((0, 0))
        if last_rows:
            rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
            logits = self.decoder.logits(self.weights, hidden.index_select(0, rows))
        progress = getattr(self.weights, "on_step_layer", None)
        if progress is not None:
            progress(None)
        return logits
