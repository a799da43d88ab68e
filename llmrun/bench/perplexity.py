"""Perplexity of a loaded model on a text: every token scored teacher-forced, through the engine's own
decoder, weights and paged cache (so a quantized model is measured on the path it runs).

The text is split into windows of the planned context; each window starts with an empty cache and is
run in prompt chunks; every token after a window's first is scored by the logits before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from llmrun.errors import UsageError
from llmrun.kv.metadata import SeqStep, build_metadata
from llmrun.options import PERPLEXITY_CHUNK

CHUNK_TOKENS = PERPLEXITY_CHUNK  # prompt rows per forward (logits of a chunk: 512 x vocab float32)
_SEQ_ID = 1 << 40  # the one sequence perplexity runs; no generation runs beside it


@dataclass(frozen=True)
class PerplexityResult:
    num_tokens: int  # tokens of the text
    num_scored: int  # tokens predicted (each window's first is not)
    mean_nll: float  # nats per scored token
    num_forwards: int  # forwards the decoder ran (chunks of every window)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def read_text(file: Path, purpose: str = "perplexity needs a text to score") -> str:
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {file}: {reason}") from None
    if not text.strip():
        raise UsageError(f"{file} is empty: {purpose}")
    return text


def perplexity(engine, token_ids: list[int], chunk: int = CHUNK_TOKENS) -> PerplexityResult:
    """Score `token_ids` with `engine` (nothing else may run on it meanwhile)."""
    if len(token_ids) < 2:
        raise UsageError("the text is a single token: perplexity needs at least two")
    total, scored, forwards = 0.0, 0, 0
    for _, part in context_windows(engine, token_ids):
        if len(part) >= 2:
            nll, count, runs = _window_nll(engine, part, chunk)
            total, scored, forwards = total + nll, scored + count, forwards + runs
    return PerplexityResult(len(token_ids), scored, total / scored, forwards)


def context_windows(engine, token_ids: list[int]) -> Iterator[tuple[int, list[int]]]:
    """(first position, ids) of each window of the engine's context a long text is scored in."""
    window = engine.max_context
    for first in range(0, len(token_ids), window):
        yield first, token_ids[first : first + window]


@torch.inference_mode()
def _window_nll(engine, ids: list[int], chunk: int) -> tuple[float, int, int]:
    """Summed negative log-likelihood of ids[1:] given what precedes each, from an empty cache; the
    tokens scored and the forwards run."""
    total, count, forwards = 0.0, 0, 0
    for start, hidden in window_forwards(engine, ids, chunk):
        forwards += 1
        targets = ids[start + 1 : start + hidden.shape[0] + 1]  # the last row of the last chunk predicts nothing
        if not targets:  # a last chunk of that one row
            continue
        logits = engine.decoder.logits(engine.weights, hidden[: len(targets)]).float()  # [rows, vocab]
        total += F.cross_entropy(logits, torch.tensor(targets, device=hidden.device), reduction="sum").item()
        count += len(targets)
    return total, count, forwards


def window_forwards(engine, ids: list[int], chunk: int = CHUNK_TOKENS, weights=None) -> Iterator[tuple[int, torch.Tensor]]:
    """Run `ids` (at most the engine's context) as one sequence from an empty cache, `chunk` tokens a
    forward, teacher-forced: yields (first position, final hidden rows) of each chunk. `weights`
    (default: the engine's) is what the decoder reads its layers from."""
    decoder, allocator, device = engine.decoder, engine.allocator, engine.decoder.device
    weights = engine.weights if weights is None else weights
    allocator.add_sequence(_SEQ_ID)
    try:
        allocator.grow(_SEQ_ID, len(ids))
        table = allocator.block_table(_SEQ_ID)
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            meta = build_metadata([SeqStep(table, start, len(piece), len(ids))], allocator.block_size, device)
            with torch.inference_mode():
                hidden = decoder.forward(weights, torch.tensor(piece, device=device),
                                         torch.arange(start, start + len(piece), device=device), meta, engine.cache)
            yield start, hidden
    finally:
        allocator.free_sequence(_SEQ_ID)
