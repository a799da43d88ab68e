"""Conversation messages, dropping turns, and JSON save/load (atomic, validated)."""

import json
import os

import pytest

from llmrun.chat.budget import reply_reserve, turns_to_drop
from llmrun.chat.conversation import Conversation, Turn, load_conversation, save_conversation
from llmrun.errors import UsageError


def sample() -> Conversation:
    return Conversation("Be brief.", [Turn("Hi", "Hello!"), Turn("Tell a story", "Once upon", True),
                                      Turn("Again?", "Sure.")])


def test_messages_put_the_system_first_and_send_interrupted_text_unmarked():
    messages = sample().messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * 3
    assert messages[4] == {"role": "assistant", "content": "Once upon"}
    assert sample().messages(first_turn=2) == [messages[0], *messages[5:]]
    assert Conversation(None, [Turn("pending")]).messages() == [{"role": "user", "content": "pending"}]


def test_dropping_turns_never_drops_the_system_prompt():
    conversation = sample()
    dropped = conversation.drop_oldest(2)
    assert [t.user for t in dropped] == ["Hi", "Tell a story"]
    assert conversation.system == "Be brief."
    assert conversation.messages()[0]["role"] == "system"
    assert [t.user for t in conversation.turns] == ["Again?"]


def test_save_and_load_round_trip(tmp_path):
    path = save_conversation(sample(), tmp_path / "deep" / "chat.json", model="smollm2")
    data = json.loads(path.read_text())
    assert data["format"] == "llmrun-chat" and data["model"] == "smollm2"
    assert data["messages"][4] == {"role": "assistant", "content": "Once upon", "interrupted": True}
    assert load_conversation(path) == sample()
    assert os.listdir(path.parent) == ["chat.json"]  # no temporary file left behind


def test_save_replaces_a_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "chat.json"
    save_conversation(sample(), path)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: 1 / 0)  # fail while serialising
    with pytest.raises(ZeroDivisionError):
        save_conversation(Conversation(), path)
    assert load_conversation(path) == sample()
    monkeypatch.undo()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(UsageError, match="cannot save to .*No space left"):
        save_conversation(Conversation(), path)
    assert load_conversation(path) == sample() and os.listdir(tmp_path) == ["chat.json"]


def test_load_accepts_a_bare_message_list(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]))
    assert load_conversation(path) == Conversation(None, [Turn("a", "b")])


@pytest.mark.parametrize("content, message", [
    ("not json", "is not valid JSON"),
    ('{"messages": 3}', "is not a chat"),
    ('[{"role": "robot", "content": "x"}]', "is not a chat"),
    ('[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]', "must alternate"),
    ('[{"role": "user", "content": "x"}]', "ends with a user message"),
])
def test_load_rejects_what_is_not_a_conversation(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        load_conversation(path)
    with pytest.raises(UsageError, match="cannot read"):
        load_conversation(tmp_path / "missing.json")


# --- token budgeting -------------------------------------------------------------------------

def lengths(system: int, turns: list[int]):
    """prompt_tokens(k) for a system prompt and turns of the given token counts."""
    return lambda k: system + sum(turns[k:])


def test_a_prompt_that_fits_drops_nothing():
    assert turns_to_drop(3, lengths(10, [20, 20, 20]), ctx=100, reserve=25) == 0  # 70 + 25 <= 100


def test_an_overflow_drops_the_oldest_turns_down_to_half_the_context():
    # limit 200 - 50 = 150; half the context is 100
    assert turns_to_drop(4, lengths(10, [60, 30, 30, 30]), ctx=200, reserve=50) == 1  # 160 -> 100
    assert turns_to_drop(4, lengths(10, [40, 40, 40, 40]), ctx=200, reserve=50) == 2  # 170 -> 130 -> 90


def test_the_newest_turn_stays_even_when_half_is_not_reachable():
    assert turns_to_drop(3, lengths(10, [20, 20, 120]), ctx=200, reserve=50) == 2  # 130 <= 150
    assert turns_to_drop(3, lengths(10, [5, 5, 150]), ctx=200, reserve=50) is None
    assert turns_to_drop(1, lengths(10, [150]), ctx=200, reserve=50) is None


def test_the_reply_reserve_is_capped_at_a_quarter_of_the_context():
    assert reply_reserve(512, 4096) == 512
    assert reply_reserve(512, 256) == 64
    assert reply_reserve(8, 256) == 8
    assert reply_reserve(100, 2) == 1
