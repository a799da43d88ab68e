"""The chat loop: read inputs, run slash commands, stream replies (Rich on a TTY, plain in a pipe)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Optional

from llmrun.chat.commands import Command, apply_set, help_rows, parse_input, settings_rows
from llmrun.chat.conversation import load_conversation, save_conversation
from llmrun.chat.session import ChatSession, Reply
from llmrun.chat.terminal import InputReader
from llmrun.errors import LlmrunError
from llmrun.interrupt import StopOnInterrupt, keys_not_echoed


def run_chat(opened, params, *, system: Optional[str] = None, quiet: bool = False) -> int:
    """Chat until /exit, Ctrl-D, Ctrl-C at an empty prompt, or the end of piped input; returns the
    exit status: 1 when piped input had an input refused (each was reported and skipped), else 0."""
    from llmrun.display import chat_line
    from llmrun.paths import history_file

    interactive = sys.stdin is not None and sys.stdin.isatty()
    session = ChatSession(opened.engine, params, system)
    loop = ChatLoop(session, opened.name, live=sys.stdout.isatty(), interactive=interactive, quiet=quiet)
    reader = InputReader(interactive, history_file() if interactive else None)
    if interactive:
        chat_line(f"{opened.name}, context {session.ctx} tokens. /help for commands, "
                  f"Ctrl-D or /exit to leave.")
    try:
        while (text := reader.read()) is not None:
            if not loop.handle(text):
                break
    finally:
        reader.save_history()
        session.close()
    return 1 if loop.num_refused and not interactive else 0


def format_reply_stats(reply: Reply) -> str:
    """The dim line after a reply: its speed, and how much of the prompt the cache saved."""
    parts = [f"{len(reply.tokens)} tokens", f"{reply.decode_tok_s:.1f} tok/s",
             f"first token {reply.ttft_s:.2f} s",
             f"prompt: {reply.prefilled_tokens} prefilled, {reply.reused_tokens} reused"]
    if reply.interrupted:
        parts.append("interrupted")
    elif reply.finish_reason == "length":
        parts.append("hit max tokens")
    return " · ".join(parts)


class ChatLoop:
    """Handles one input at a time; an input that fails is reported on stderr and the chat goes on,
    at a terminal and in a pipe alike (a script's later turns are still answered)."""

    def __init__(self, session: ChatSession, model_name: str, *, live: bool, interactive: bool,
                 quiet: bool = False):
        self.session = session
        self.model_name = model_name
        self.live = live
        self.interactive = interactive
        self.quiet = quiet
        self.num_replies_shown = 0
        self.num_refused = 0  # inputs that ended in an error

    def handle(self, text: str) -> bool:
        """Run one input; False when the chat should end."""
        from llmrun.display import chat_error

        if not text.strip():
            return True
        try:
            parsed = parse_input(text)
            if isinstance(parsed, Command):
                return self.run_command(parsed)
            self.send(parsed)
        except LlmrunError as err:
            self.num_refused += 1
            chat_error(str(err))
        return True

    def send(self, text: str) -> None:
        from llmrun.display import ReplyView, chat_line, chat_warning, print_stats

        turn = self.session.add_user(text)
        if turn.dropped_turns:
            chat_warning(f"the conversation outgrew the context ({self.session.ctx} tokens): dropped "
                         f"the {_oldest_turns(turn.dropped_turns)}, kept the system prompt")
        if self.num_replies_shown and not self.live:
            sys.stdout.write("\n")  # replies in a pipe are separated by a blank line
        # At a terminal Ctrl-C stops the reply; in a pipe it ends everything, as in any pipeline.
        # A live view (stdout a terminal, even with piped input) must not have ^C echoed into it.
        quiet_keys = keys_not_echoed() if self.live else nullcontext()
        stop = StopOnInterrupt() if self.interactive else nullcontext(lambda: False)
        with quiet_keys, stop as should_stop, ReplyView(self.live) as view:
            reply = self.session.reply(turn, view.write, should_stop)
        if reply.interrupted and not self.interactive:
            raise KeyboardInterrupt
        self.num_replies_shown += 1
        if reply.interrupted:
            chat_line("[interrupted]" if reply.text.strip() else
                      "[interrupted before the reply began: the message was not kept]")
        if not self.quiet:
            print_stats(format_reply_stats(reply))
        if self.interactive:
            chat_line("")  # air before the next prompt

    def run_command(self, command: Command) -> bool:
        """Run a slash command; False for /exit."""
        if command.name == "exit":
            return False
        handlers = {"help": self._help, "set": self._set, "system": self._system, "reset": self._reset,
                    "save": self._save, "load": self._load, "stats": self._stats}
        handlers[command.name](command.argument)
        return True

    def _help(self, argument: str) -> None:
        from llmrun.display import chat_rows

        chat_rows(help_rows())

    def _set(self, argument: str) -> None:
        from llmrun.display import chat_line, chat_rows

        if not argument:
            chat_rows(settings_rows(self.session.params))
            return
        self.session.params, change = apply_set(self.session.params, argument)
        chat_line(change)

    def _system(self, argument: str) -> None:
        from llmrun.display import chat_line

        conversation = self.session.conversation
        if not argument:
            chat_line(conversation.system or "(none set; the chat template may add its own)")
            return
        conversation.system = argument
        chat_line("system prompt set" + (" (the next turn reads the conversation again)"
                                         if conversation.turns else ""))

    def _reset(self, argument: str) -> None:
        from llmrun.display import chat_line

        self.session.reset()
        kept = " (the system prompt stays)" if self.session.conversation.system else ""
        chat_line(f"conversation cleared{kept}")

    def _save(self, argument: str) -> None:
        from llmrun.display import chat_line

        conversation = self.session.conversation
        path = save_conversation(conversation, argument, self.model_name)
        chat_line(f"saved {_turns(len(conversation.turns))} to {path}")

    def _load(self, argument: str) -> None:
        from llmrun.display import chat_line

        loaded = load_conversation(argument)
        self.session.reset(loaded)
        chat_line(f"loaded {_turns(len(loaded.turns))} from {argument}")

    def _stats(self, argument: str) -> None:
        from llmrun.display import chat_rows

        chat_rows(stats_rows(self.session, self.model_name))


def _turns(count: int) -> str:
    return f"{count} turn" + ("" if count == 1 else "s")


def _oldest_turns(count: int) -> str:
    return "oldest turn" if count == 1 else f"{count} oldest turns"


def stats_rows(session: ChatSession, model_name: str) -> list[tuple[str, str]]:
    """/stats: the model, what the cache holds, totals so far, the last reply, sampling."""
    engine, totals = session.engine, session.totals
    allocator = engine.allocator
    rows = [
        ("model", f"{model_name} ({engine.plan.dtype} on {engine.decoder.device.type})"),
        ("context", f"{session.cached_tokens} of {session.ctx} tokens cached in {session.held_blocks} "
                    f"KV blocks ({allocator.num_free_blocks} of {allocator.num_blocks} free)"),
        ("turns", f"{len(session.conversation.turns)} in the conversation"
                  + (f", {totals.num_dropped_turns} dropped to fit" if totals.num_dropped_turns else "")),
        ("replies", f"{totals.num_replies}, {totals.num_generated} tokens generated"),
        ("prompts", f"{totals.num_prefilled} tokens prefilled, {totals.num_reused} reused from the cache"),
    ]
    if totals.last is not None:
        rows.append(("last reply", format_reply_stats(totals.last)))
    rows.append(("sampling", ", ".join(f"{name} {value}" for name, value in settings_rows(session.params))))
    return rows
