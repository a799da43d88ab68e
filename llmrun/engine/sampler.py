"""Turning logits into next tokens (greedy = argmax, else filtered sampling) under SamplingParams."""

from __future__ import annotations

import os
from typing import Optional

import torch

from llmrun.engine.params import SamplingParams


def make_generator(params: SamplingParams, device) -> Optional[torch.Generator]:
    """A seeded generator for one sequence (None for greedy decoding)."""
    if params.is_greedy:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on a [vocab] row for the tokens already in prompt or output (`seen`: a
    bool [vocab] mask, kept by the engine as tokens arrive)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering of one float32 row [vocab]."""
    scaled = logits / params.temperature
    # A temperature (or repetition penalty) tiny enough to overflow the best logit to +inf, or to
    # round to 0 in float32, would make softmax nan: its limit is greedy, so only the best is kept.
    # The same bits whenever the best scaled logit is finite.
    best = logits.max()
    logits = torch.where(torch.isfinite(scaled.max()), scaled,
                         torch.where(logits == best, 0.0, float("-inf")))
    if params.top_k:
        k = min(params.top_k, logits.numel())
        kth = torch.topk(logits, k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > params.top_p  # keep the token crossing p
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    if params.min_p:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def token_logprobs(logits_row: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log probability of `token` under a [vocab] row of raw logits (float32 log-softmax), and
    the `top` most likely (token, log probability) pairs, most likely first."""
    logprobs = logits_row.float().log_softmax(-1)
    if not top:
        return float(logprobs[token]), ()
    best = torch.topk(logprobs, min(top, logprobs.numel()))
    return float(logprobs[token]), tuple(zip(best.indices.tolist(), best.values.tolist()))


def sample_next(logits: torch.Tensor, rows: list, device) -> list[int]:
    """Next token per row of logits [num_rows, vocab]; `rows` are (params, generator, seen) with
    `seen` the row's bool [vocab] mask of ids for the repetition penalty (or None). The tokens
    stay on the device until all rows are sampled: one host sync a step."""
    logits = logits.float()
    greedy = all(params.is_greedy and params.repetition_penalty == 1.0 for params, _, _ in rows)
    if greedy:
        return logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (params, generator, seen) in enumerate(rows):
        scores = logits[row]
        if params.repetition_penalty != 1.0 and seen is not None:
            scores = apply_repetition_penalty(scores, seen, params.repetition_penalty)
        if params.is_greedy:
            tokens.append(scores.argmax().view(1))
            continue
        probs = filter_logits(scores, params).softmax(-1)
        tokens.append(torch.multinomial(probs, 1, generator=generator))
    return torch.cat(tokens).tolist()
