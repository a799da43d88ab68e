"""The conversation: system prompt and turns, the messages the model sees, JSON save and load."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llmrun.errors import UsageError

FORMAT = "llmrun-chat"
VERSION = 1


@dataclass
class Turn:
    """One user message and the reply to it (None while it is being generated)."""

    user: str
    assistant: Optional[str] = None
    interrupted: bool = False      # the user stopped the reply: `assistant` holds what came before


@dataclass
class Conversation:
    system: Optional[str] = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self, first_turn: int = 0, *, marked: bool = False) -> list[dict]:
        """Chat-template messages: the system prompt, then the turns from `first_turn` on.

        The model sees an interrupted reply as the text it had produced; `marked` adds
        "interrupted": true to it (for the saved transcript).
        """
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns[first_turn:]:
            messages.append({"role": "user", "content": turn.user})
            if turn.assistant is not None:
                reply = {"role": "assistant", "content": turn.assistant}
                messages.append({**reply, "interrupted": True} if marked and turn.interrupted else reply)
        return messages

    def drop_oldest(self, num_turns: int) -> list[Turn]:
        """Forget the `num_turns` oldest turns (the system prompt always stays); returns them."""
        dropped, self.turns = self.turns[:num_turns], self.turns[num_turns:]
        return dropped

    def to_json(self, model: Optional[str] = None) -> dict:
        data = {"format": FORMAT, "version": VERSION}
        if model:
            data["model"] = model
        data["messages"] = self.messages(marked=True)
        return data

    @classmethod
    def from_json(cls, data, source: str = "the conversation") -> "Conversation":
        """Read `to_json` output, or a bare list of {"role", "content"} messages."""
        messages = data.get("messages") if isinstance(data, dict) else data
        if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
            raise UsageError(f"{source} is not a chat: expected a list of messages with a role and a "
                             f"text content")
        conversation = cls()
        if messages and messages[0]["role"] == "system":
            conversation.system = messages.pop(0)["content"]
        roles = [m["role"] for m in messages]
        if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(roles)):
            raise UsageError(f"{source}: after an optional system message, messages must alternate "
                             f"user, assistant, user, ...")
        if len(roles) % 2:
            raise UsageError(f"{source} ends with a user message that has no reply")
        for user, reply in zip(messages[::2], messages[1::2]):
            conversation.turns.append(Turn(user["content"], reply["content"], bool(reply.get("interrupted"))))
        return conversation


def _is_message(message) -> bool:
    return (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
            and isinstance(message.get("content"), str))


def save_conversation(conversation: Conversation, path: Path, model: Optional[str] = None) -> Path:
    """Write the conversation as JSON, atomically (a temporary file renamed over `path`)."""
    path = Path(path).expanduser()
    text = json.dumps(conversation.to_json(model), indent=2, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as err:
        raise UsageError(f"cannot save to {path}: {err.strerror or err}") from err
    return path


def load_conversation(path: Path) -> Conversation:
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from err
    return Conversation.from_json(data, str(path))
