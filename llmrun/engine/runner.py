"""ModelRunner: turns one scheduled step into a decoder forward over the paged cache, and logits."""

from __future__ import annotations

from typing import Optional

import torch

from llmrun.engine.graphs import StaticDecode
from llmrun.engine.scheduler import ScheduledSeq
from llmrun.kernels.interface import CHECK_ROWS
from llmrun.kernels.row_check import compressed_rows_alone, rows_alone
from llmrun.kv.block_allocator import BlockAllocator
from llmrun.kv.metadata import SeqStep, build_metadata
from llmrun.kv.paged_cache import PagedKVCache
from llmrun.weights.observer import StepObserver

MAX_DECODE_ROWS = CHECK_ROWS[-1]  # decode rows one forward takes at most (the fused CPU kernels' checked rows)


class ModelRunner:
    def __init__(self, decoder, weights, cache: PagedKVCache, allocator: BlockAllocator,
                 static: Optional[StaticDecode], step_observer: StepObserver):
        self.decoder = decoder
        self.weights = weights
        self.cache = cache
        self.allocator = allocator
        self.device = decoder.device
        self.static = static  # decode steps of static shape (CUDA graphs), where enabled
        self.step_observer = step_observer
        # a per-layer observer is Python a graph would skip: static steps then run the same forward eagerly
        self.replay_graphs = not step_observer.watches_layers
        self._rows_checked: dict[int, bool] = {}  # decode rows per matmul -> each row gets its bits alone
        self._compressed: Optional[frozenset] = None  # layer matrices the row check leaves out (asked once)

    @torch.inference_mode()
    def run(self, steps: list[ScheduledSeq]) -> torch.Tensor:
        """Run a step; returns logits [num_sampling_seqs, vocab] for the steps that complete a
        prompt, in the order of `steps`.

        Every scheduled sequence's `num_cached` advances by its `num_new`. A sequence's bits do not
        depend on the step's other sequences: each prompt chunk runs in a forward of its own, and
        decode rows share a forward only where the matmuls give each row its bits alone
        (kernels/row_check.py); elsewhere they too run one by one. The step's forwards run in
        lockstep, layer by layer (`decoder.forward_many`), so a layer's weights are fetched, and a
        compressed one dequantized, once a step. On CUDA the decode rows run the static-shape step
        (engine/graphs.py) whatever prompt chunks run beside them.
        """
        rows = [step for step in steps if step.num_new == 1]
        chunks = [step for step in steps if step.num_new > 1]
        parts: list[tuple[list[ScheduledSeq], torch.Tensor]] = []
        if rows and self.static is not None and self.static.handles(rows):
            tables = [self.allocator.block_table(step.seq.seq_id) for step in rows]
            parts.append((rows, self.static.run(rows, tables, replay=self.replay_graphs)))
            rows = []
        forwards = self._groups(rows) + [[chunk] for chunk in chunks]
        if forwards:
            parts.extend(self._forward_lockstep(forwards))
            self.step_observer.step_done()
        return self._in_step_order(steps, parts)

    @staticmethod
    def _in_step_order(steps, parts) -> torch.Tensor:
        sampled = [(step, row) for group, logits in parts if logits.numel()
                   for step, row in zip(group, logits.split(1))]  # row: [1, vocab]
        if not sampled:
            return parts[0][1]
        order = {id(step): index for index, step in enumerate(steps)}
        sampled.sort(key=lambda pair: order[id(pair[0])])
        return torch.cat([logits for _, logits in sampled]) if len(sampled) > 1 else sampled[0][1]

    def _groups(self, rows: list[ScheduledSeq]) -> list[list[ScheduledSeq]]:
        """Decode rows (one token each) in forwards of their own: together up to MAX_DECODE_ROWS
        where that many rows pass the row check, else one by one."""
        if len(rows) <= 1:
            return [rows] if rows else []
        groups = [rows[i : i + MAX_DECODE_ROWS] for i in range(0, len(rows), MAX_DECODE_ROWS)]
        return [part for group in groups for part in ([group] if self._rows_alone(len(group)) else
                                                      [[step] for step in group])]

    def _rows_alone(self, num_rows: int) -> bool:
        """Whether one matmul over `num_rows` rows gives each row its bits alone (checked once per count)."""
        if num_rows not in self._rows_checked:
            if self._compressed is None and num_rows > 1:
                self._compressed = compressed_rows_alone(self.decoder, self.weights)
            self._rows_checked[num_rows] = num_rows == 1 or rows_alone(self.decoder, num_rows, self._compressed)
        return self._rows_checked[num_rows]

    def _forward_lockstep(self, groups: list[list[ScheduledSeq]]) -> list[tuple[list[ScheduledSeq], torch.Tensor]]:
        """One decoder forward per group, run in lockstep layer by layer (each group's ops are its own
        forward's; a layer's weights are fetched once for all): (the group's sequences that complete
        their prompt, their logits) per group."""
        inputs = [self._inputs(group) for group in groups]
        sampling = [[step for step in group if step.completes_prompt] for group in groups]  # before advancing
        hiddens = self.decoder.forward_many(self.weights, [(ids, pos, meta) for ids, pos, meta, _ in inputs],
                                            self.cache)
        out = []
        for group, chosen, hidden, (_, _, _, last_rows) in zip(groups, sampling, hiddens, inputs):
            for step in group:
                step.seq.num_cached += step.num_new
            if not last_rows:
                out.append((chosen, hidden.new_empty((0, 0))))
                continue
            rows = torch.tensor(last_rows, dtype=torch.long, device=self.device)
            out.append((chosen, self.decoder.logits(self.weights, hidden.index_select(0, rows))))
        return out

    def _inputs(self, steps: list[ScheduledSeq]):
        """A forward's token ids, positions, attention metadata, and the rows of the sequences that
        complete their prompt (their logits are sampled)."""
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
        return ids, pos, meta, last_rows
