"""Fitting a conversation in the context window: how many of the oldest turns to drop (pure)."""

from __future__ import annotations

from typing import Callable, Optional


def reply_reserve(max_new_tokens: int, ctx: int) -> int:
    """Tokens kept free for the reply: the reply limit, but at most a quarter of the context."""
    return max(1, min(max_new_tokens, ctx // 4))


def turns_to_drop(num_turns: int, prompt_tokens: Callable[[int], int], ctx: int,
                  reserve: int) -> Optional[int]:
    """How many of the oldest turns to drop so the prompt plus `reserve` fits in `ctx` tokens.

    `prompt_tokens(k)` is the prompt's length without the k oldest turns; the newest turn (the
    question being asked) is never dropped. When dropping is needed, the prompt is cut to at most
    half the context where possible, so the next turns reuse the cache instead of each dropping
    again (every drop changes the history, and re-prefills it). None: even the newest turn alone
    does not fit.
    """
    limit = ctx - reserve
    if prompt_tokens(0) <= limit:
        return 0
    target = min(limit, ctx // 2)
    for num_dropped in range(1, num_turns):
        if prompt_tokens(num_dropped) <= target:
            return num_dropped
    last = max(num_turns - 1, 0)
    return last if last and prompt_tokens(last) <= limit else None
