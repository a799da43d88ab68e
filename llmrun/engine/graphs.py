"""Decode steps of static shape, captured once as CUDA graphs and replayed.

At batch 1 on a GPU a decode step is some 25 small kernels a layer around four matmuls, and
launching them from Python costs far more than running them (Phi-3-mini on an H200: 20 tok/s
against a memory bound of ~550). So a decode step runs here on tensors whose addresses never
change: the step's token ids, positions, new-K/V slots, context lengths and block tables are
copied into one staging buffer, and a graph captured once for that shape replays the whole
forward, the logits included.

Shapes: one graph per (rows, block bucket, RoPE variant). A bucket is the sequences' block count
rounded up to a power of two (capped at the context's), so a sequence growing to 4,096 tokens
meets at most log2(blocks) + 1 graphs; attention reads the bucket's slots under a mask of the
real ones. Graphs are captured on first need (a warm-up forward, then the capture, ~0.1 s each)
and share one memory pool, as only one replays at a time.

Every decode step on CUDA runs this static-shape forward, so that all GPU placements compute
attention alike (kernels/gpu_kernels.py reads the pools through these slots and masks) and give the
same tokens; it is captured and replayed where every weight is resident on the GPU, unless
LLMRUN_NO_CUDA_GRAPHS=1 (streamed layers run Python between layers: their steps stay eager).
On the CPU, `StaticDecode(capture=False)` is how tests check the static forward against the
dynamic one, which CPU decoding keeps (its SDPA gives transformers' bits).
"""

from __future__ import annotations

from typing import Optional

import torch

from llmrun import settings
from llmrun.kv.metadata import static_decode_metadata

SCALARS = 4  # staging columns before the block table: token id, position, new slot, context length


def static_decode_for(decoder, weights, cache, max_rows: int, max_context: int) -> Optional["StaticDecode"]:
    """The static decode path of an engine on CUDA (captured where `graphs_enabled`); None on a CPU."""
    if decoder.device.type != "cuda":
        return None
    return StaticDecode(decoder, weights, cache, max_rows, max_context, capture=graphs_enabled(decoder.device, weights))


def graphs_enabled(device: torch.device, weights) -> bool:
    """Whether decode steps on `device` can be captured: CUDA, all weights resident, not disabled."""
    return (device.type == "cuda" and not settings.LLMRUN_NO_CUDA_GRAPHS.is_on()
            and weights.fully_resident())


def bucket(num_blocks: int, max_blocks: int) -> int:
    """num_blocks rounded up to a power of two, at most max_blocks."""
    return min(max_blocks, 1 << max(0, num_blocks - 1).bit_length())


class StaticDecode:
    """Runs decode steps of up to `max_rows` sequences through fixed buffers (see module doc)."""

    def __init__(self, decoder, weights, cache, max_rows: int, max_context: int, capture: bool):
        self.decoder, self.weights, self.cache = decoder, weights, cache
        self.block_size = cache.shape.block_size
        self.max_rows = max_rows
        self.max_blocks = -(-max_context // self.block_size)
        self.capture = capture
        width = SCALARS + self.max_blocks
        device = decoder.device
        self.staging = torch.zeros((max_rows, width), dtype=torch.long, pin_memory=device.type == "cuda")
        self.staging_rows = self.staging.numpy()  # written through numpy: no torch op per value
        self.inputs = torch.zeros((max_rows, width), dtype=torch.long, device=device)
        self.graphs: dict[tuple, tuple] = {}  # key -> (graph or None, logits buffer)
        self.pool = None

    def handles(self, steps) -> bool:
        """Whether this step is all decode (one new token per sequence) within the buffers' rows,
        its sequences on one RoPE variant."""
        if not 0 < len(steps) <= self.max_rows:
            return False
        if any(step.num_new != 1 or not step.completes_prompt for step in steps):
            return False
        return len({self.decoder.rope_variant(step.seq.num_tokens) for step in steps}) == 1

    def run(self, steps, block_tables, replay: bool = True) -> torch.Tensor:
        """Logits [rows, vocab] of a decode step (a copy: the graph's buffer is reused); `replay`
        False runs the forward eagerly even where a graph could be captured."""
        rows = len(steps)
        needed = 0
        staging = self.staging_rows
        for row, (step, table) in enumerate(zip(steps, block_tables)):
            seq = step.seq
            position = seq.num_cached
            blocks = -(-(position + 1) // self.block_size)
            needed = max(needed, blocks)
            staging[row, 0] = seq.all_ids[position]
            staging[row, 1] = position
            staging[row, 2] = table[position // self.block_size] * self.block_size + position % self.block_size
            staging[row, 3] = position + 1
            staging[row, SCALARS : SCALARS + blocks] = table[:blocks]
        self.inputs[:rows].copy_(self.staging[:rows])
        seq_lens = tuple(step.seq.num_tokens for step in steps)
        key = (rows, bucket(needed, self.max_blocks), self.decoder.rope_variant(seq_lens[0]))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._prepare(key, seq_lens) if self.capture and replay else (None, None)
            self.graphs[key] = entry
        graph, logits = entry
        if graph is None or not replay:
            logits = self._forward(key, seq_lens)
        else:
            graph.replay()
        for step in steps:
            step.seq.num_cached += 1
        return logits.clone()

    def _forward(self, key: tuple, seq_lens: tuple[int, ...]) -> torch.Tensor:
        """The static-shape forward: reads only self.inputs (rows × bucket), returns logits."""
        rows, blocks, _ = key
        inputs = self.inputs[:rows]
        meta = static_decode_metadata(inputs[:, SCALARS : SCALARS + blocks], inputs[:, 3], inputs[:, 2].contiguous(),
                                      self.block_size, seq_lens)
        hidden = self.decoder.forward(self.weights, inputs[:, 0].contiguous(), inputs[:, 1].contiguous(),
                                      meta, self.cache)
        return self.decoder.logits(self.weights, hidden)

    def _prepare(self, key: tuple, seq_lens: tuple[int, ...]) -> tuple[Optional[object], Optional[torch.Tensor]]:
        """Capture the graph for `key`. The warm-up forward writes this step's K/V to its slots,
        which the replay after capture writes again, identically."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(key, seq_lens)  # cuBLAS and allocator warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(key, seq_lens)
        return graph, logits
