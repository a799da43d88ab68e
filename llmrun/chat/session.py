"""ChatSession: a conversation bound to an engine, its KV blocks kept in the cache between turns."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from llmrun.chat.budget import reply_reserve, turns_to_drop
from llmrun.chat.conversation import Conversation, Turn
from llmrun.errors import ContextOverflowError, UsageError


@dataclass(frozen=True)
class PreparedTurn:
    """A user turn ready to generate: its prompt ids, after any oldest turns were dropped."""

    prompt_ids: list[int]
    dropped_turns: int = 0


@dataclass(frozen=True)
class Reply:
    """One finished (or interrupted) reply and what it cost."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefilled_tokens: int       # prompt tokens run through the model
    reused_tokens: int          # prompt tokens whose K/V came from the cache
    finish_reason: Optional[str]
    interrupted: bool
    ttft_s: float
    decode_tok_s: float


@dataclass
class SessionTotals:
    num_replies: int = 0
    num_generated: int = 0
    num_prefilled: int = 0
    num_reused: int = 0
    num_dropped_turns: int = 0
    last: Optional[Reply] = None


def _tok_s_so_far(result) -> float:
    """Decode speed of a reply stopped early (the engine times only finished ones)."""
    elapsed = time.perf_counter() - (result.first_token_s or time.perf_counter())
    return (len(result.tokens) - 1) / elapsed if len(result.tokens) > 1 and elapsed > 0 else 0.0


class ChatSession:
    """Turns go in, replies come out; the conversation's KV blocks stay cached (a kept sequence).

    Every prompt is the whole conversation rendered with the chat template; the engine prefills
    only what follows the longest common prefix with what is cached, so output equals a fresh run.
    """

    def __init__(self, engine, params, system: Optional[str] = None):
        from llmrun.engine.prompt import has_chat_template

        if not has_chat_template(engine.tokenizer):
            raise UsageError("this model has no chat template, which chat needs; "
                             "use `llmrun run --raw` to send plain text")
        self.engine = engine
        self.params = params
        self.conversation = Conversation(system=system or None)
        self.kept = engine.keep_sequence()
        self.totals = SessionTotals()

    @property
    def ctx(self) -> int:
        return self.engine.max_context

    @property
    def cached_tokens(self) -> int:
        return len(self.kept.cached_ids)

    @property
    def held_blocks(self) -> int:
        allocator = self.engine.allocator
        return len(allocator.block_table(self.kept.seq_id)) if allocator.has_sequence(self.kept.seq_id) else 0

    def prompt_ids(self, first_turn: int = 0) -> list[int]:
        """The conversation (from `first_turn` on) rendered with the chat template, tokenized."""
        from llmrun.engine.prompt import chat_prompt_ids

        try:
            return chat_prompt_ids(self.engine.tokenizer, self.conversation.messages(first_turn))
        except UsageError:  # the template's own refusal, already one line
            raise
        except Exception as err:  # jinja2 TemplateError: e.g. a template without a system role
            if isinstance(err, (KeyboardInterrupt, MemoryError)):
                raise
            raise UsageError(f"the model's chat template rejected the conversation: {err}") from err

    def add_user(self, text: str) -> PreparedTurn:
        """Append a user turn and fit the conversation in the context (dropping the oldest turns)."""
        self.conversation.turns.append(Turn(text))
        try:
            counts: dict[int, list[int]] = {}

            def prompt_tokens(first_turn: int) -> int:
                counts[first_turn] = self.prompt_ids(first_turn)
                return len(counts[first_turn])

            reserve = reply_reserve(self.params.max_new_tokens, self.ctx)
            num_dropped = turns_to_drop(len(self.conversation.turns), prompt_tokens, self.ctx, reserve)
        except BaseException:
            self.conversation.turns.pop()
            raise
        if num_dropped is None:
            self.conversation.turns.pop()
            raise ContextOverflowError(
                f"this message needs {len(counts[max(counts)])} tokens with the system prompt, "
                f"plus {reserve} for the reply, but the context holds {self.ctx} (raise --ctx or "
                f"shorten it)")
        self.conversation.drop_oldest(num_dropped)
        self.totals.num_dropped_turns += num_dropped
        return PreparedTurn(counts[num_dropped], num_dropped)

    def reply(self, turn: PreparedTurn, on_text: Callable[[str], None],
              should_stop: Callable[[], bool] = lambda: False) -> Reply:
        """Generate the reply to the last user turn, streaming text to `on_text`.

        `should_stop()` (checked after each token) or a KeyboardInterrupt stops it early: the
        partial reply stays in the conversation, marked interrupted (dropped if it is empty).
        """
        engine, pending = self.engine, self.conversation.turns[-1]
        interrupted = False
        generation = engine.generate([turn.prompt_ids], self.params, kept=[self.kept])
        try:
            for event in generation:
                on_text(event.text)
                if event.finish_reason is None and should_stop():
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            self.conversation.turns.pop()
            raise
        finally:
            generation.close()  # a kept sequence keeps the K/V computed so far
        return self._record(pending, turn, generation.results, interrupted)

    def _record(self, pending: Turn, turn: PreparedTurn, results: list, interrupted: bool) -> Reply:
        """The reply from the generation's results: none when it stopped before the engine started it."""
        text = results[0].text if results else ""
        if interrupted and not text.strip():
            self.conversation.turns.pop()  # nothing said yet: forget the question too
        else:
            pending.assistant, pending.interrupted = text, interrupted
        if not results:  # stopped before the engine started this request
            reply = Reply(text, [], len(turn.prompt_ids), 0, 0, None, interrupted, 0.0, 0.0)
        else:
            result = results[0]
            reply = Reply(
                text, list(result.tokens), result.prompt_tokens, result.prefilled_tokens,
                result.prompt_tokens - result.prefilled_tokens,
                result.finish_reason.value if result.finish_reason else None, interrupted,
                result.ttft_s, result.decode_tok_s if result.finished_s else _tok_s_so_far(result),
            )
        totals = self.totals
        totals.num_replies += 1
        totals.num_generated += len(reply.tokens)
        totals.num_prefilled += reply.prefilled_tokens
        totals.num_reused += reply.reused_tokens
        totals.last = reply
        return reply

    def reset(self, conversation: Optional[Conversation] = None) -> None:
        """Start over (keeping the system prompt), or continue `conversation`; frees the blocks."""
        self.engine.release(self.kept)
        self.kept = self.engine.keep_sequence()
        self.conversation = conversation or Conversation(system=self.conversation.system)

    def close(self) -> None:
        self.engine.release(self.kept)
